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
                entropies[i].append(router_entropy(aux.routing.probs_TE))
        model.train(was_training)
        if count == 0:
            raise ValueError("the validation split gave no batches")
        return EvalResult(self.metrics(loss_sum / count, correct / count), counts,
                          [float(np.mean(e)) for e in entropies])

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        raise NotImplementedError

    def write_eval_artifacts(self, model: nn.Module, result: EvalResult, device: torch.device,
                             out_dir: Path) -> list[Path]:
        """Files ``dualroute eval`` writes into ``out_dir`` beside its printout (a classifier's confusion
        matrix, say); returns their paths. None by default."""
        return []


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
