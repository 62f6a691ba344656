"""Load a trainer checkpoint with its data, run it, and gather what every MoE layer decided.

Shapes: B batch, S tokens per example (sequence, or class token + patches), T = B*S tokens,
K experts and J groups chosen per token, E experts, G groups.

The data is the validation split of the run's own data config (the embedded corpus, digits, or the
files it was trained on); ``data`` replaces its path. A text checkpoint reads a text file or folder
(a ``.bin`` file as nanoGPT-style uint16 token ids); an image checkpoint reads a folder of MNIST IDX
files or CIFAR-10 batches, whichever it finds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from dualroute.data.image_files import find_cifar10_batches
from dualroute.layer import MoEAux, MoEConfig, MoELayer
from dualroute.train.checkpoint import META_FILE, Checkpoint, latest_checkpoint, load_weights
from dualroute.train.presets import TEXT_KINDS, RunConfig, run_config_from_dict
from dualroute.train.tasks import make_task
from dualroute.train.tasks.base import RoutedRows, single_stream_rows, to_device

from .stats import LayerRouting


@dataclass
class Inspected:
    """One checkpoint, the data it was run on, and its routing of that data."""

    path: Path  # the checkpoint directory
    checkpoint: Checkpoint
    config: RunConfig  # as saved, with the data override applied
    task: Any  # the run's Task (LMTask, ImageTask, TranslationTask, ...)
    model: nn.Module
    data_label: str  # what data was read, in words
    layers: list[LayerRouting]  # one per MoE layer, in order (real tokens only: padding left out)
    rows: list[RoutedRows]  # per layer: what its inspected rows are (label, position, stream, name)

    @property
    def moe(self) -> MoEConfig:
        return self.config.model.moe

    @property
    def is_lm(self) -> bool:
        return self.config.is_lm

    @property
    def token_labels(self) -> bool:
        """Rows labelled by their token id (text, translation), not by a class (images)."""
        return self.config.task_type.labels == "tokens"

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    @property
    def labels_T(self) -> np.ndarray:
        """int64: the first layer's labels (every layer's, where all route one stream): the class of each
        token's image, or the token id itself."""
        return self.rows[0].labels_T if self.rows else np.empty(0, np.int64)

    @property
    def positions_T(self) -> np.ndarray:
        """int64: the first layer's positions in the sequence (0 = the class token of an image)."""
        return self.rows[0].positions_T if self.rows else np.empty(0, np.int64)

    @property
    def streams(self) -> list[str]:
        """The distinct token streams the layers route, in order ([""] for one unnamed stream)."""
        return list(dict.fromkeys(r.stream for r in self.rows))

    def layer_name(self, i: int) -> str:
        """Layer ``i`` in tables: its index, or the task's name for it (``enc 0``, ``dec 2``)."""
        return self.rows[i].name or str(i)

    def layer_title(self, i: int) -> str:
        """Layer ``i`` in figure titles: ``layer 0``, or the task's name for it."""
        return self.rows[i].name or f"layer {i}"


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory at ``path``, or the newest one of a run directory; clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or run directory at {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a dualroute checkpoint directory")
    newest = latest_checkpoint(path)
    if newest is not None:
        return newest
    if not (path / META_FILE).is_file():
        raise ValueError(f"{path} is not a dualroute checkpoint (no {META_FILE}) nor a run directory "
                         "(no ckpt-* folder)")
    return path


def open_checkpoint(path: str | Path, data: str | Path | None = None, batches: int = 8,
                    device: str | torch.device = "cpu") -> Inspected:
    """The checkpoint at ``path`` (or a run directory's newest) with its task and data; not yet routed."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive int, got {batches!r}")
    ckpt_path = resolve_checkpoint(path)
    ckpt = load_weights(ckpt_path)
    if not isinstance(ckpt.extra.get("config"), dict):
        raise ValueError(f"{ckpt_path} holds no run config: not a checkpoint written by the dualroute trainer")
    try:
        cfg = run_config_from_dict(ckpt.extra["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{ckpt_path}: the saved run config does not load: {_one_line(e)}") from e
    if cfg.model.moe is None:
        raise ValueError(f"{ckpt_path} is a dense model (no MoE layers): there is no routing to inspect")
    cfg = _with_data(cfg, data, batches)
    data_label = _data_label(cfg, data)
    try:
        task = make_task(cfg, ckpt.extra)
    except (ValueError, OSError, ImportError) as e:
        raise ValueError(f"data {data_label} does not fit checkpoint {ckpt_path}: {_one_line(e)}") from e
    model = task.build_model()
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        raise ValueError(f"{ckpt_path}: weights do not match the saved config: {_one_line(e)}") from e
    return Inspected(ckpt_path, ckpt, task.run_config, task, model.to(device).eval(), data_label, [], [])


def load(path: str | Path, data: str | Path | None = None, batches: int = 8,
         device: str | torch.device = "cpu") -> Inspected:
    """Open the checkpoint at ``path`` and route ``batches`` validation batches of its data."""
    inspected = open_checkpoint(path, data, batches, device)
    return route(inspected, inspected)


def check_comparable(a: Inspected, b: Inspected) -> None:
    """Two checkpoints whose routing of the same tokens can be compared: same MoE shape, same tokens."""
    def shape(x: Inspected) -> tuple:
        m = x.moe
        return (len(list(_moe_layers(x.model))), m.num_experts, m.num_groups, m.experts_per_token,
                m.groups_per_token)

    if shape(a) != shape(b):
        raise ValueError(f"cannot compare {b.path} with {a.path}: (MoE layers, E, G, K, J) = {shape(b)} "
                         f"vs {shape(a)}")
    if a.config.task_type.name != b.config.task_type.name or a.num_labels != b.num_labels \
            or any(a.checkpoint.extra.get(k) != b.checkpoint.extra.get(k) for k in ("tokenizer", "pair_tokenizer")):
        raise ValueError(f"cannot compare {b.path} with {a.path}: they read different data "
                         "(task, tokenizer or vocabulary differ)")


def _moe_layers(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, MoELayer))


def route(target: Inspected, source: Inspected) -> Inspected:
    """``target``'s model run on ``source``'s data (the same batches, so two checkpoints can be compared)."""
    try:
        batches = spread(source.task.eval_batches(), source.config.train.eval_batches)
        layers, rows = gather_rows(target.model, batches, source.task)
    except ValueError as e:
        raise ValueError(f"data {source.data_label} does not fit checkpoint {target.path}: {_one_line(e)}") from e
    return dataclasses.replace(target, layers=layers, rows=rows, data_label=source.data_label)


def spread(batches: Iterable[Any], n: int) -> list[Any]:
    """``n`` of ``batches`` spread evenly from the first to the last (all of them when there are at most ``n``).

    Text and image tasks give exactly the ``train.eval_batches`` asked for; a translation task gives its whole
    validation split, sorted by length, so taking its first ``n`` would inspect only the shortest sentences.
    """
    batches = list(batches)
    if len(batches) <= n:
        return batches
    return [batches[i] for i in np.linspace(0, len(batches) - 1, n).round().astype(int)]


@torch.no_grad()
def gather_rows(model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]],
                task: Any) -> tuple[list[LayerRouting], list[RoutedRows]]:
    """Every MoE layer's routing of the real tokens of ``batches``, and what those rows are.

    ``task`` runs the model (``task.forward``) and says what each layer's rows are (``task.routed_rows``);
    rows it marks as padding are left out of every layer's routing and labels.
    """
    device = next(model.parameters()).device
    pieces: list[list[dict[str, np.ndarray]]] = []
    kept: list[list[RoutedRows]] = []
    for x, y in batches:
        out = task.forward(model, to_device(x, device))
        if not out.aux:
            raise ValueError("the model has no MoE layers")
        rows = task.routed_rows(x, y, out)
        if len(rows) != len(out.aux):
            raise ValueError(f"the task described {len(rows)} MoE layers' rows, the model gave {len(out.aux)}")
        pieces = pieces or [[] for _ in out.aux]
        kept = kept or [[] for _ in out.aux]
        for i, (aux, r) in enumerate(zip(out.aux, rows)):
            T = aux.routing.expert_ids_TK.shape[0]
            if not len(r.labels_T) == len(r.positions_T) == len(r.keep_T) == T:
                raise ValueError(f"MoE layer {i} routed {T} rows; the task labelled {len(r.labels_T)}")
            keep_T = np.asarray(r.keep_T, bool)
            pieces[i].append(_to_numpy(aux, keep_T))
            kept[i].append(RoutedRows(np.asarray(r.labels_T, np.int64)[keep_T],
                                      np.asarray(r.positions_T, np.int64)[keep_T], keep_T[keep_T], r.stream, r.name))
    if not kept:
        raise ValueError("the data gave no batches")
    merged = [RoutedRows(np.concatenate([r.labels_T for r in k]), np.concatenate([r.positions_T for r in k]),
                         np.concatenate([r.keep_T for r in k]), k[0].stream, k[0].name) for k in kept]
    return [_concat(p) for p in pieces], merged


class _OneStream:
    """What ``gather`` needs of a task, for a model on one unpadded stream: ``model(x)``, token or class labels."""

    def __init__(self, token_labels: bool) -> None:
        self.token_labels = token_labels

    def forward(self, model: nn.Module, x: Any):
        return model(x)

    def routed_rows(self, x: Any, y: torch.Tensor, out) -> list[RoutedRows]:
        return single_stream_rows(x, y, out, self.token_labels)


def gather(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
           is_lm: bool) -> tuple[list[LayerRouting], np.ndarray, np.ndarray]:
    """Every MoE layer's routing of every token of ``batches`` (one stream, no padding), and each token's
    label (its id when ``is_lm``, else its example's class) and position."""
    layers, rows = gather_rows(model, batches, _OneStream(is_lm))
    return layers, rows[0].labels_T, rows[0].positions_T


def _to_numpy(aux: MoEAux, keep_T: np.ndarray) -> dict[str, np.ndarray]:
    """One batch of a layer's routing, rows ``keep_T`` only. The layer's own counts are kept as it gave them:
    a layer that was handed the padding mask already left padding out of them."""
    r = aux.routing
    return {
        "expert_ids_TK": r.expert_ids_TK.cpu().numpy()[keep_T],
        "weights_TK": r.weights_TK.float().cpu().numpy()[keep_T],
        "group_ids_TJ": r.group_ids_TJ.cpu().numpy()[keep_T],
        "tokens_per_expert_E": aux.tokens_per_expert_E.cpu().numpy(),
        "tokens_per_group_G": aux.tokens_per_group_G.cpu().numpy(),
        "num_dropped": np.asarray(int(aux.num_dropped)),
        "entropy_T": _entropy(r.probs_TE)[keep_T],
        "group_entropy_T": _entropy(r.group_probs_TG)[keep_T],
    }


def _entropy(probs_TE: torch.Tensor) -> np.ndarray:
    """``-sum_i p_i ln p_i`` per token, as ``dualroute.losses.router_entropy`` averages it."""
    probs_TE = probs_TE.double()
    return (-torch.special.xlogy(probs_TE, probs_TE).sum(-1)).cpu().numpy()


def _concat(pieces: list[dict[str, np.ndarray]]) -> LayerRouting:
    summed = ("tokens_per_expert_E", "tokens_per_group_G")
    fields = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0] if k not in (*summed, "num_dropped")}
    fields.update({k: np.sum([p[k] for p in pieces], axis=0).astype(np.int64) for k in summed})
    return LayerRouting(num_dropped=int(sum(p["num_dropped"] for p in pieces)), **fields)


# ------------------------------------------------------------------------------------------------ data


def _with_data(cfg: RunConfig, data: str | Path | None, batches: int) -> RunConfig:
    train = dataclasses.replace(cfg.train, eval_batches=batches)
    if data is None:
        return dataclasses.replace(cfg, train=train)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"no data file or folder at {path}")
    kind = _data_kind(cfg, path)
    return dataclasses.replace(cfg, train=train, data=dataclasses.replace(cfg.data, kind=kind, path=str(path)))


def _data_kind(cfg: RunConfig, path: Path) -> str:
    """What ``path`` holds, among the kinds the checkpoint's model can read."""
    if cfg.is_lm:
        return "tokens" if path.suffix == ".bin" else "text"
    if cfg.task_type.name == "translation":
        return "parallel"  # a folder of train/val files, 'SRC,TGT' files or a TSV file (dualroute.data.parallel)
    if path.is_dir():
        if any((d / "train-images-idx3-ubyte").is_file() or (d / "train-images-idx3-ubyte.gz").is_file()
               for d in (path, path / "MNIST" / "raw")):
            return "mnist"
        try:
            find_cifar10_batches(path, "test")  # the python or the binary version
            return "cifar10"
        except FileNotFoundError:
            pass
    raise ValueError(f"data {path}: an image checkpoint reads a folder of MNIST IDX files or CIFAR-10 batches; "
                     "found neither")


def _data_label(cfg: RunConfig, data: str | Path | None) -> str:
    if data is not None:
        return str(data)
    if cfg.data.path is not None:
        return f"{cfg.data.path} ({cfg.data.kind})"
    if cfg.data.kind == "stdlib":
        return "the Python standard library's source (data.kind=stdlib)"
    return "the embedded corpus" if cfg.data.kind in TEXT_KINDS else f"the bundled {cfg.data.kind} dataset"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
