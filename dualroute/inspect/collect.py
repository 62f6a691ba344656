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

from .stats import LayerRouting


@dataclass
class Inspected:
    """One checkpoint, the data it was run on, and its routing of that data."""

    path: Path  # the checkpoint directory
    checkpoint: Checkpoint
    config: RunConfig  # as saved, with the data override applied
    task: Any  # LMTask or ImageTask
    model: nn.Module
    data_label: str  # what data was read, in words
    layers: list[LayerRouting]  # one per MoE layer, in order
    labels_T: np.ndarray  # int64: the class of each token's image, or the token id itself
    positions_T: np.ndarray  # int64: position in the sequence (0 = the class token of an image)

    @property
    def moe(self) -> MoEConfig:
        return self.config.model.moe

    @property
    def is_lm(self) -> bool:
        return self.config.is_lm

    @property
    def num_labels(self) -> int:
        m = self.config.model
        return m.vocab_size if self.is_lm else m.num_classes


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
    return Inspected(ckpt_path, ckpt, task.run_config, task, model.to(device).eval(), data_label, [],
                     np.empty(0, np.int64), np.empty(0, np.int64))


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
    if a.is_lm != b.is_lm or a.checkpoint.extra.get("tokenizer") != b.checkpoint.extra.get("tokenizer") \
            or a.num_labels != b.num_labels:
        raise ValueError(f"cannot compare {b.path} with {a.path}: they read different data "
                         "(task, tokenizer or vocabulary differ)")


def _moe_layers(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, MoELayer))


def route(target: Inspected, source: Inspected) -> Inspected:
    """``target``'s model run on ``source``'s data (the same batches, so two checkpoints can be compared)."""
    try:
        layers, labels_T, positions_T = gather(target.model, source.task.eval_batches(), target.is_lm)
    except ValueError as e:
        raise ValueError(f"data {source.data_label} does not fit checkpoint {target.path}: {_one_line(e)}") from e
    return dataclasses.replace(target, layers=layers, labels_T=labels_T, positions_T=positions_T,
                               data_label=source.data_label)


@torch.no_grad()
def gather(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
           is_lm: bool) -> tuple[list[LayerRouting], np.ndarray, np.ndarray]:
    """Every MoE layer's routing of every token of ``batches``, and each token's label and position."""
    device = next(model.parameters()).device
    pieces: list[list[dict[str, np.ndarray]]] = []
    labels, positions = [], []
    for x, y in batches:
        out = model(x.to(device))
        if not out.aux:
            raise ValueError("the model has no MoE layers")
        B = x.shape[0]
        S = out.aux[0].routing.expert_ids_TK.shape[0] // B
        labels.append((x if is_lm else y[:, None].expand(B, S)).reshape(-1).numpy())
        positions.append(np.tile(np.arange(S), B))
        pieces = pieces or [[] for _ in out.aux]
        for layer, aux in zip(pieces, out.aux):
            layer.append(_to_numpy(aux))
    if not labels:
        raise ValueError("the data gave no batches")
    return [_concat(p) for p in pieces], np.concatenate(labels).astype(np.int64), np.concatenate(positions)


def _to_numpy(aux: MoEAux) -> dict[str, np.ndarray]:
    r = aux.routing
    return {
        "expert_ids_TK": r.expert_ids_TK.cpu().numpy(),
        "weights_TK": r.weights_TK.float().cpu().numpy(),
        "group_ids_TJ": r.group_ids_TJ.cpu().numpy(),
        "tokens_per_expert_E": aux.tokens_per_expert_E.cpu().numpy(),
        "tokens_per_group_G": aux.tokens_per_group_G.cpu().numpy(),
        "num_dropped": np.asarray(int(aux.num_dropped)),
        "entropy_T": _entropy(r.probs_TE),
        "group_entropy_T": _entropy(r.group_probs_TG),
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
