"""Tasks: what a run learns. A task loads its data, builds its model and scores its outputs.

Both tasks share one small interface: ``build_model()``, ``train_batch(generator)``, ``eval_batches()``,
``loss(out, batch)`` (mean cross-entropy), ``evaluate(model, device)`` -> metrics and expert loads,
and ``baseline_loss``; ``LMTask`` adds ``sample``. Batches are ``(x, y)`` CPU tensors; the trainer moves
them to its device.

Shapes: B batch, S sequence, T predictions (B*S tokens, or B images), V vocabulary or classes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualroute.data import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    TokenDataset,
    Tokenizer,
    default_corpus,
    encode_array,
    load_image_dataset,
    load_stdlib_corpus,
    load_tokenizer,
    read_text,
    read_token_bin,
)
from dualroute.losses import router_entropy
from dualroute.models import TransformerLM, ViTClassifier
from dualroute.train.presets import RunConfig

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EvalResult:
    metrics: dict[str, float]  # val_loss, and val_ppl / val_bpb (text) or val_acc (images)
    expert_counts: list[torch.Tensor]  # per MoE layer: routed rows per expert (int64, E)
    router_entropy: list[float]  # per MoE layer: mean routing entropy in nats


class _Task:
    unit = "items"  # what throughput counts

    def __init__(self, cfg: RunConfig) -> None:
        self.run_config = cfg  # the config as resolved by the task (e.g. the vocabulary of its tokenizer)

    @property
    def model_config(self):
        return self.run_config.model

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
            x, y = x.to(device), y.to(device)
            out = model(x)
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


# ------------------------------------------------------------------------------------------- text


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


def _make_tokenizer(kind: str, text: str, bpe_vocab_size: int) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_text(text)
    return BPETokenizer.train(text, bpe_vocab_size)


class LMTask(_Task):
    """Next-token prediction on a text corpus or a token file.

    For text, the vocabulary is the tokenizer's: ``model.vocab_size`` is replaced by it. Pass the
    ``tokenizer`` a checkpoint was trained with to evaluate or sample from it.
    """

    unit = "tokens"

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer | None = None) -> None:
        data = cfg.data
        if data.kind == "tokens":
            self.tokenizer = None
            tokens = read_token_bin(data.path, vocab_size=cfg.model.vocab_size)
            self.dataset = TokenDataset(tokens, data.val_fraction)
        elif data.kind == "stdlib":  # split by file: the tokenizer learns from the training files only
            corpus = load_stdlib_corpus(data.val_fraction)
            if os.environ.get("RANK", "0") == "0":
                print(corpus.describe(), file=sys.stderr)
            self.tokenizer = tokenizer or _make_tokenizer(data.tokenizer, corpus.train, data.bpe_vocab_size)
            self.dataset = TokenDataset.from_parts(encode_array(self.tokenizer, corpus.train),
                                                   encode_array(self.tokenizer, corpus.val))
        else:
            text = default_corpus() if data.path is None else read_text(data.path)
            self.tokenizer = tokenizer or _make_tokenizer(data.tokenizer, text, data.bpe_vocab_size)
            self.dataset = TokenDataset(encode_array(self.tokenizer, text), data.val_fraction)
        if self.tokenizer is not None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size))
        super().__init__(cfg)
        self.bytes_per_token = self._bytes_per_token()

    def _bytes_per_token(self) -> float | None:
        if self.tokenizer is None:
            return None
        if isinstance(self.tokenizer, ByteTokenizer):
            return 1.0
        val = self.dataset.split_tokens("val")
        return len(self.tokenizer.decode(val.tolist()).encode("utf-8")) / max(1, len(val))

    def build_model(self) -> nn.Module:
        return TransformerLM(self.model_config)

    def train_batch(self, generator: torch.Generator) -> Batch:
        t = self.run_config.train
        return self.dataset.get_batch("train", t.batch_size, t.seq_len, generator)

    def eval_batches(self) -> Iterator[Batch]:
        t = self.run_config.train
        return self.dataset.iter_eval_batches("val", t.batch_size, t.seq_len, max_batches=t.eval_batches)

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        out = {"val_loss": mean_loss, "val_ppl": math.exp(min(mean_loss, 700.0))}
        if self.bytes_per_token is not None:
            out["val_bpb"] = mean_loss / math.log(2) / self.bytes_per_token
        return out

    @property
    def baseline_loss(self) -> float:
        """Validation cross-entropy of a unigram model of the training tokens (add-one smoothed)."""
        vocab = self.model_config.vocab_size
        counts_V = np.bincount(self.dataset.split_tokens("train"), minlength=vocab)[:vocab] + 1.0
        log_p_V = np.log(counts_V / counts_V.sum())
        return float(-log_p_V[self.dataset.split_tokens("val")].mean())

    @torch.no_grad()
    def sample(self, model: nn.Module, prompt: str, n: int, *, temperature: float = 0.8, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0) -> str:
        """``prompt`` followed by ``n`` sampled tokens, decoded (its own RNG: training randomness is untouched)."""
        if self.tokenizer is None:
            raise ValueError("sampling needs a tokenizer; token-file (data.kind=tokens) runs have none")
        ids = self.tokenizer.encode(prompt or "\n")
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = model.training
        model.eval()
        idx_BS = torch.tensor([ids], dtype=torch.long, device=device)
        fits = len(ids) + n <= self.model_config.max_seq_len  # else crop the context, without the KV cache
        out_BS = model.generate(idx_BS, max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator, use_cache=fits)
        model.train(was_training)
        return self.tokenizer.decode(out_BS[0].tolist())


# ----------------------------------------------------------------------------------------- images


class ImageTask(_Task):
    """Image classification; the model's image size, channels and classes must match the data."""

    unit = "images"

    def __init__(self, cfg: RunConfig) -> None:
        data, model = cfg.data, cfg.model
        if data.kind != "digits" and not data.path:
            raise ValueError(f"data kind {data.kind!r} is read from local files: pass --data.path=<folder>")
        self.dataset = load_image_dataset(data.kind, data.path, data.val_fraction, seed=0)
        c, h, w = self.dataset.image_shape
        want = (model.channels, model.image_size, model.image_size, model.num_classes)
        if want != (c, h, w, self.dataset.num_classes):
            raise ValueError(f"model expects {want[0]}x{want[1]}x{want[2]} images in {want[3]} classes, "
                             f"data {data.kind!r} has {c}x{h}x{w} in {self.dataset.num_classes}")
        super().__init__(cfg)

    def build_model(self) -> nn.Module:
        return ViTClassifier(self.model_config)

    def train_batch(self, generator: torch.Generator) -> Batch:
        return self.dataset.get_batch("train", self.run_config.train.batch_size, generator)

    def eval_batches(self) -> Iterator[Batch]:
        t = self.run_config.train
        return itertools.islice(self.dataset.iter_batches("val", t.batch_size), t.eval_batches)

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        return {"val_loss": mean_loss, "val_acc": accuracy}

    @property
    def baseline_loss(self) -> float:
        """Cross-entropy of a uniform guess."""
        return math.log(self.model_config.num_classes)


def make_task(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> LMTask | ImageTask:
    return LMTask(cfg, tokenizer) if cfg.is_lm else ImageTask(cfg)
