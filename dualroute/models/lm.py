"""A decoder-only Transformer language model whose FFNs are dual-routed MoE layers (or dense ones).

Shapes: B batch, S sequence, D model dim, V vocabulary; H heads, d head dim, L cached positions.

Layer i is an MoE layer when ``i >= dense_first`` and ``(i - dense_first) % moe_every == 0``.
Rotary positions, RMSNorm, pre-norm blocks, tied input/output embeddings by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoEConfig
from .blocks import Block, KVCache, rope_tables  # KVCache: re-exported here too
from .common import (ModelOutput, build_ffn, check_dropout, check_moe, check_positive_float, run_decoder_blocks,
                     check_positive_ints, replace_moe_with_dense)

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    ffn_hidden: int = 256  # width of the dense (swiglu) FFN of non-MoE layers
    moe: MoEConfig | None = None  # None: every layer dense
    moe_every: int = 1
    dense_first: int = 0  # the first layers stay dense
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    dense_twin_of: MoEConfig | None = None  # set by dense_twin(): MoE slots become dense FFNs as wide as K experts

    def __post_init__(self) -> None:
        check_positive_ints(self, ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_hidden",
                                   "moe_every"))
        if isinstance(self.dense_first, bool) or not isinstance(self.dense_first, int) \
                or not 0 <= self.dense_first <= self.n_layers:
            raise ValueError(f"dense_first must be an int in [0, n_layers={self.n_layers}], got {self.dense_first!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dim dim / n_heads = {self.dim} / {self.n_heads} = {self.head_dim} must be even "
                             "for rotary embeddings")
        check_positive_float("rope_theta", self.rope_theta)
        check_positive_float("norm_eps", self.norm_eps)
        check_dropout(self.dropout)
        check_moe(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def is_moe_slot(self, i: int) -> bool:
        return i >= self.dense_first and (i - self.dense_first) % self.moe_every == 0


def dense_twin(cfg: LMConfig) -> LMConfig:
    """The dense LM with the MoE model's active parameters per token (see ``replace_moe_with_dense``):
    each MoE layer becomes a dense FFN of width ``(K + num_shared_experts) * F``, same expert kind."""
    if not isinstance(cfg, LMConfig):
        raise TypeError(f"expected an LMConfig, got {type(cfg).__name__}")
    return replace_moe_with_dense(cfg)


class TransformerLM(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_len = cfg.max_seq_len
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, build_ffn(cfg.dim, cfg.ffn_hidden, cfg.is_moe_slot(i), cfg.moe,
                                                  cfg.dense_twin_of),
                  causal=True, dropout=cfg.dropout, norm_eps=cfg.norm_eps, layer_idx=i)
            for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)  # small logits at init with a tied head: loss ~ ln V
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        cos_Sh, sin_Sh = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos_Sh", cos_Sh, persistent=False)
        self.register_buffer("rope_sin_Sh", sin_Sh, persistent=False)

    def new_cache(self, batch_size: int) -> KVCache:
        cfg, weight = self.cfg, self.tok_emb.weight
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.head_dim, cfg.max_seq_len, weight.device,
                       weight.dtype)

    def forward(self, idx_BS: torch.Tensor, cache: KVCache | None = None) -> ModelOutput:
        """Logits for every position (float32). With ``cache``, ``idx_BS`` continues the cached tokens."""
        S = self._check_input(idx_BS, cache)
        start = 0 if cache is None else cache.pos
        rope = (self.rope_cos_Sh[start : start + S], self.rope_sin_Sh[start : start + S])
        x_BSD, aux = run_decoder_blocks(self.blocks, self.drop(self.tok_emb(idx_BS)), rope, cache)
        logits_BSV = self.head(self.norm(x_BSD)).float()
        return ModelOutput(logits_BSV, aux)

    @torch.no_grad()
    def generate(self, idx_BS: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens; returns ``(B, S + max_new_tokens)``.

        ``temperature == 0`` is greedy. ``top_k`` keeps the k likeliest tokens, ``top_p`` the smallest
        set whose probability reaches p (the likeliest token always stays). With the cache the whole
        sequence must fit in ``max_seq_len`` (ValueError otherwise); without it the context is cropped
        to the last ``max_seq_len`` tokens, nanoGPT-style. Call ``eval()`` first: dropout and a
        training capacity factor would otherwise apply.
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        cache = None
        if use_cache:
            total = idx_BS.shape[-1] + max_new_tokens
            if total > self.cfg.max_seq_len:
                raise ValueError(f"prompt + max_new_tokens = {total} tokens exceeds max_seq_len "
                                 f"({self.cfg.max_seq_len}); shorten them or use use_cache=False to crop")
            cache = self.new_cache(idx_BS.shape[0])
        out_BS, new_BS = idx_BS, idx_BS  # new_BS: tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if cache is None:
                new_BS = out_BS[:, -self.cfg.max_seq_len :]
            logits_BV = self(new_BS, cache).logits[:, -1]
            new_BS = sample_next(logits_BV, temperature, top_k, top_p, generator)
            out_BS = torch.cat([out_BS, new_BS], dim=1)
        return out_BS

    def _check_input(self, idx_BS: torch.Tensor, cache: KVCache | None) -> int:
        if not isinstance(idx_BS, torch.Tensor) or idx_BS.dtype not in _INT_DTYPES:
            got = idx_BS.dtype if isinstance(idx_BS, torch.Tensor) else type(idx_BS).__name__
            raise TypeError(f"token ids must be an integer tensor, got {got}")
        if idx_BS.dim() != 2 or idx_BS.shape[1] == 0:
            raise ValueError(f"token ids must have shape (B, S) with S >= 1, got {tuple(idx_BS.shape)}")
        B, S = idx_BS.shape
        lo, hi = torch.stack(torch.aminmax(idx_BS)).tolist()  # one host read (a GPU synchronisation)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={self.cfg.vocab_size}), got min {lo}, max {hi}")
        start = 0 if cache is None else cache.pos
        if start + S > self.cfg.max_seq_len:
            cached = "" if cache is None else f" ({start} cached + {S} new)"
            raise ValueError(f"sequence length {start + S}{cached} exceeds max_seq_len ({self.cfg.max_seq_len})")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache holds batch size {cache.batch_size}, input has batch size {B}")
        return S


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row, ``(B, 1)``: greedy at temperature 0, else sampled after top-k / top-p."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits_BV = _nucleus(logits_BV, top_p)
    return torch.multinomial(F.softmax(logits_BV, dim=-1), 1, generator=generator)


def _nucleus(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop every token whose likelier tokens already hold ``top_p`` of the probability."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = F.softmax(sorted_BV, dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # 0 for the top token: always kept
    drop_BV = torch.zeros_like(mass_before_BV, dtype=torch.bool).scatter(1, order_BV, mass_before_BV >= top_p)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
