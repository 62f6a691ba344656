"""The language-model task: next-token prediction on text (a file or folder, the embedded corpus, the
standard library's source) or on a uint16 token file; the model is ``TransformerLM``."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from dualroute.data import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    TokenDataset,
    Tokenizer,
    default_corpus,
    encode_array,
    load_stdlib_corpus,
    read_text,
    read_token_bin,
)
from dualroute.models import LMConfig, TransformerLM, dense_twin
from dualroute.train.presets import (TEXT_KINDS, DataConfig, RunConfig, TrainConfig, named_run, preset_moe,
                                     register_preset)
from dualroute.train.registry import ModelType, TaskType, register_model, register_task
from dualroute.train.tasks.base import Batch, Task, tokenizer_from_record, tokenizer_record


def _make_tokenizer(kind: str, text: str, bpe_vocab_size: int) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_text(text)
    return BPETokenizer.train(text, bpe_vocab_size)


class LMTask(Task):
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
        self.flops_seq_len = cfg.train.seq_len
        self.can_sample = self.tokenizer is not None  # token-file runs have no tokenizer

    @classmethod
    def from_saved(cls, cfg: RunConfig, saved: dict[str, Any]) -> "LMTask":
        record = saved.get("tokenizer")
        return cls(cfg, None if record is None else tokenizer_from_record(record))

    def state_extra(self) -> dict[str, Any]:
        return {"tokenizer": None if self.tokenizer is None else tokenizer_record(self.tokenizer)}

    def _bytes_per_token(self) -> float | None:
        if self.tokenizer is None:
            return None
        if isinstance(self.tokenizer, ByteTokenizer):
            return 1.0
        val = self.dataset.split_tokens("val")
        return len(self.tokenizer.decode(val.tolist()).encode("utf-8")) / max(1, len(val))

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


def _check(cfg: RunConfig) -> None:
    if cfg.data.kind == "stdlib" and cfg.data.path is not None:
        raise ValueError(f"data kind 'stdlib' reads this Python's standard library; it takes no data.path "
                         f"(got {cfg.data.path!r}; for your own text use data.kind=text data.path=...)")
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")


register_model(ModelType("lm", LMConfig, TransformerLM, task="lm"))
register_task(TaskType("lm", data_kinds=TEXT_KINDS, make=LMTask.from_saved, labels="tokens", check=_check))


# ------------------------------------------------------------------------------------------ presets

# The presets from issue #14's search for where sparsity pays on the clock (docs/results.md, "Where sparsity
# pays on this machine"). Byte-level on the standard library's source (data.kind=stdlib, 10.3 MB of training
# files), D=128, 4 layers. Each MoE layer is one always-on shared expert of width F=512 plus E=16 routed swiglu
# experts of F=512 with K=1, weighted by their probability (renormalising one weight would make it 1 and leave
# the router without a gradient); lm-dual routes in two levels, G=4 groups and J=2 of them per token (J=2
# learned faster than J=1 in the search). The dense twin's FFN is 1,024 wide (shared + one routed expert).
# lr 1.4e-3 is the dense twin's best of 1e-3 to 3e-3; the MoE models were best at 1e-3, found after the
# three-seed comparison ran at 1.4e-3 (see the docs). 1,500 steps of 16 x 128 bytes (about 3M
# bytes, under a third of a pass over the training files) take about 5.5 minutes on two idle CPU cores.
_LM = dict(vocab_size=256, dim=128, n_layers=4, n_heads=4, max_seq_len=128)
_LM_F = 512
_DUAL_J = 2
_LM_TRAIN = TrainConfig(steps=1500, batch_size=16, seq_len=128, lr=1.4e-3, warmup_steps=30, eval_every=50,
                        eval_batches=8, log_every=10, save_every=500)


def _lm(groups: int, groups_per_token: int) -> LMConfig:
    moe = preset_moe(_LM["dim"], _LM_F, groups, groups_per_token, num_experts=16, experts_per_token=1,
                     num_shared_experts=1, renormalize=False)
    return LMConfig(**_LM, ffn_hidden=2 * _LM_F, moe=moe)


_STDLIB = DataConfig(kind="stdlib")
register_preset("lm-dual", lambda: named_run("lm-dual", _lm(4, _DUAL_J), _STDLIB, _LM_TRAIN))
register_preset("lm-flat", lambda: named_run("lm-flat", _lm(1, 1), _STDLIB, _LM_TRAIN))
register_preset("lm-dense", lambda: named_run("lm-dense", dense_twin(_lm(4, _DUAL_J)), _STDLIB, _LM_TRAIN))

# The small case (the lm presets before that search): byte-level on the embedded corpus (CPython's help text,
# about 465K bytes), D=128, 4 layers; each MoE layer has E=8 swiglu experts of width F=128 and K=2 active, so
# the dense twin's FFN is 256 wide. 1000 steps of 16 x 128 bytes take about 2.5-3.5 minutes on two idle CPU
# cores and reach ~1.2 nats/byte over the validation split (unigram baseline 3.25).
_SMALL_F = 128
_SMALL_TRAIN = TrainConfig(steps=1000, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=30, eval_every=50,
                           eval_batches=8, log_every=10, save_every=250)


def _lm_small(groups: int, groups_per_token: int) -> LMConfig:
    return LMConfig(**_LM, ffn_hidden=2 * _SMALL_F, moe=preset_moe(_LM["dim"], _SMALL_F, groups, groups_per_token))


_TEXT = DataConfig(kind="text")
register_preset("lm-dual-small", lambda: named_run("lm-dual-small", _lm_small(4, 2), _TEXT, _SMALL_TRAIN))
register_preset("lm-flat-small", lambda: named_run("lm-flat-small", _lm_small(1, 1), _TEXT, _SMALL_TRAIN))
register_preset("lm-dense-small", lambda: named_run("lm-dense-small", dense_twin(_lm_small(4, 2)), _TEXT,
                                                    _SMALL_TRAIN))
