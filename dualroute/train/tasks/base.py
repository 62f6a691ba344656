"""The task interface: what a run learns. A task loads its data, builds its model and scores its outputs.

The trainer, ``compare``, ``eval`` and ``inspect`` drive every task through ``Task``:

- ``build_model()``; ``train_batch(generator)`` and ``eval_batches()`` give ``(x, y)`` batches of CPU
  tensors (``x`` may be a tuple of tensors, e.g. source and target prefix); ``forward(model, x)`` runs the
  model on a batch already on the device (default ``model(x)``); ``loss(out, batch)``, the mean
  cross-entropy; ``units(batch)``, what throughput counts;
- ``evaluate(model, device)`` -> metrics, expert loads and router entropy; ``baseline_loss``;
- ``state_extra()``: what the task saves in a checkpoint (a tokenizer, say), handed back to
  ``TaskType.make(cfg, saved)`` when the checkpoint is read;
- ``write_eval_artifacts(model, result, device, out_dir)``: files ``dualroute eval`` writes (none by default);
- ``routed_rows(x, y, out)``: for ``dualroute inspect``, what each MoE layer's routed rows of a batch are (their
  label, position and whether they are real tokens); ``num_labels`` and ``label_decoder(stream)`` name the labels;
- ``flops_seq_len`` (attention length for the FLOP count, None without attention over a sequence) and
  ``sample(...)`` where the task can generate text (``can_sample``).

Each task module registers its ``TaskType``, its model types and its presets (``dualroute.train.registry``).

Shapes: B batch, S sequence, T predictions (B*S tokens, or B images), V vocabulary or classes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualroute.data import Tokenizer, load_tokenizer
from dualroute.losses import router_entropy
from dualroute.train import registry
from dualroute.train.presets import RunConfig

Batch = tuple[Any, torch.Tensor]  # (x: a tensor or a tuple of tensors, y: the targets)


@dataclass
class EvalResult:
    metrics: dict[str, float]  # val_loss, and val_ppl / val_bpb (text) or val_acc (images)
    expert_counts: list[torch.Tensor]  # per MoE layer: routed rows per expert (int64, E)
    router_entropy: list[float]  # per MoE layer: mean routing entropy in nats


@dataclass(frozen=True)
class RoutedRows:
    """What one MoE layer's T routed rows of a batch are, for ``dualroute inspect`` (numpy, length T)."""

    labels_T: np.ndarray  # int64: the row's token id, or the class of its image
    positions_T: np.ndarray  # int64: position in its sequence (0 = the first token, or an image's class token)
    keep_T: np.ndarray  # bool: a real token; False rows (padding) are left out of the inspection
    stream: str = ""  # the token stream the layer routes ("" where there is one; "source" / "target")
    name: str | None = None  # the layer's name in reports (None: its index among the MoE layers)


class Task:
    unit = "items"  # what throughput counts
    can_sample = False  # True where ``sample(model, prompt, n, ...)`` generates text
    flops_seq_len: int | None = None  # attention length for ``flops_per_token``; None: no sequence attention

    def __init__(self, cfg: RunConfig) -> None:
        self.run_config = cfg  # the config as resolved by the task (e.g. the vocabulary of its tokenizer)

    @classmethod
    def from_saved(cls, cfg: RunConfig, saved: dict[str, Any]) -> "Task":
        """The task for ``cfg``, restoring what ``state_extra()`` saved (``saved``: a checkpoint's extra, or {})."""
        return cls(cfg)

    @property
    def model_config(self):
        return self.run_config.model

    def build_model(self) -> nn.Module:
        return registry.build_model(self.model_config)

    def state_extra(self) -> dict[str, Any]:
        return {}

    def forward(self, model: nn.Module, x: Any):
        return model(x)

    def train_batch(self, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def eval_batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    @property
    def baseline_loss(self) -> float:
        raise NotImplementedError

    def loss(self, out, batch: Batch) -> torch.Tensor:
        logits = out.logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[1].reshape(-1))

    def units(self, batch: Batch) -> int:
        """Tokens (text) or images (images) in a batch, for throughput."""
        return batch[1].numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        """Summed loss / accuracy and expert loads over ``eval_batches()``; the model is left as it was."""
        was_training = model.training
        model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        counts: list[torch.Tensor] = []
        entropies: list[list[float]] = []
        for x, y in self.eval_batches():
            x, y = to_device(x, device), y.to(device)
            out = self.forward(model, x)
            logits_TV = out.logits.reshape(-1, out.logits.shape[-1]).float()
            loss_sum += F.cross_entropy(logits_TV, y.reshape(-1), reduction="sum").item()
            correct += int((logits_TV.argmax(-1) == y.reshape(-1)).sum())
            count += y.numel()
            if not counts:
                counts = [torch.zeros_like(a.tokens_per_expert_E, device="cpu") for a in out.aux]
                entropies = [[] for _ in out.aux]
            for i, aux in enumerate(out.aux):
                counts[i] += aux.tokens_per_expert_E.cpu()
                entropies[i].append(router_entropy(aux.routing.probs_TE, aux.mask_T))  # padding left out
        model.train(was_training)
        if count == 0:
            raise ValueError("the validation split gave no batches")
        return EvalResult(self.metrics(loss_sum / count, correct / count), counts,
                          [float(np.mean(e)) for e in entropies])

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        raise NotImplementedError

    # --------------------------------------------------------------------------- for dualroute inspect

    @property
    def num_labels(self) -> int:
        """How many label values ``routed_rows`` gives: the vocabulary (token labels) or the classes."""
        m = self.model_config
        return m.vocab_size if self.run_config.task_type.labels == "tokens" else m.num_classes

    def routed_rows(self, x: Any, y: torch.Tensor, out) -> list[RoutedRows]:
        """Per MoE layer (in the order of ``out.aux``), what its routed rows of the batch ``(x, y)`` are.

        Default: one stream of B equal-length examples shared by every layer, none of it padding; a row is
        labelled by its token id (``x``, token-labelled tasks) or by its example's class (``y``).
        """
        return single_stream_rows(x, y, out, self.run_config.task_type.labels == "tokens")

    def label_decoder(self, stream: str = ""):
        """``ids -> text`` for the token labels of ``stream`` (the task's tokenizer), or None without one."""
        tok = getattr(self, "tokenizer", None)
        return None if tok is None else tok.decode

    def write_eval_artifacts(self, model: nn.Module, result: EvalResult, device: torch.device,
                             out_dir: Path) -> list[Path]:
        """Files ``dualroute eval`` writes into ``out_dir`` beside its printout (a classifier's confusion
        matrix, say); returns their paths. None by default."""
        return []


def single_stream_rows(x: torch.Tensor, y: torch.Tensor, out, token_labels: bool) -> list[RoutedRows]:
    """``Task.routed_rows`` of one stream of B equal-length examples seen by every MoE layer, no padding: rows
    labelled by their token id (``x``, when ``token_labels``) or by their example's class (``y``)."""
    rows: list[RoutedRows] = []
    for aux in out.aux:
        B = y.shape[0]
        S = aux.routing.expert_ids_TK.shape[0] // B
        labels_BS = x if token_labels else y[:, None].expand(B, S)
        labels_T = labels_BS.reshape(-1).cpu().numpy().astype(np.int64)
        rows.append(RoutedRows(labels_T, np.tile(np.arange(S), B), np.ones(len(labels_T), bool)))
    return rows


def to_device(x: Any, device: torch.device) -> Any:
    """A tensor, or a tuple of tensors, on ``device``."""
    if isinstance(x, tuple):
        return tuple(to_device(v, device) for v in x)
    return x.to(device)


def make_task(cfg: RunConfig, saved: dict[str, Any] | Tokenizer | None = None) -> Task:
    """The task of ``cfg``'s data kind. ``saved``: the ``extra`` of the checkpoint being read (or a tokenizer,
    the form this took before there were other tasks)."""
    if saved is None:
        saved = {}
    elif not isinstance(saved, dict):
        saved = {"tokenizer": tokenizer_record(saved)}
    return cfg.task_type.make(cfg, saved)


def tokenizer_record(tokenizer: Tokenizer) -> dict[str, Any]:
    """The JSON object ``tokenizer.save`` writes, so a checkpoint can carry its tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(path)
        return json.loads(path.read_text(encoding="utf-8"))


def tokenizer_from_record(record: dict[str, Any]) -> Tokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        return load_tokenizer(path)
