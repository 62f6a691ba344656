"""A decoder-only MoE language model laid out as Hugging Face's Mixtral, Qwen2-MoE, DeepSeek-V3 and OLMoE.

Shapes: B batch, S new positions, D model dim, V vocabulary.

Each MoE block is a dualroute ``MoELayer``; attention, norms and rotary embeddings mirror the
transformers implementation of the family (``attention.py``). ``ArchConfig`` is built from a
checkpoint's config.json by ``hf_config.arch_from_hf`` and keeps that dict, so the model can be
written back in the same format. Nothing here imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..layer import DenseFFN, MoEAux, MoEConfig, MoELayer
from ..models.common import ModelOutput, run_decoder_blocks
from ..models.lm import sample_next
from .attention import GroupedQueryAttention, KVCache, LatentAttention, MLAConfig, RMSNorm, RopeConfig, rope_tables


@dataclass(frozen=True)
class ArchConfig:
    """One decoder stack. ``moe_layers[i]`` says whether block i's FFN is the MoE layer or a dense SwiGLU."""

    model_type: str
    vocab_size: int
    dim: int  # D
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # grouped-query attention only
    dense_hidden: int  # width of the dense SwiGLU FFNs
    moe: MoEConfig | None
    moe_layers: tuple[bool, ...]
    norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False  # OLMoE
    clip_qkv: float | None = None  # OLMoE
    windows: tuple[int | None, ...] = ()  # sliding-window size per layer (None = full); () = all full
    mla: MLAConfig | None = None  # DeepSeek-V3: latent attention instead of grouped-query
    softmax_scale: float | None = None  # None: 1 / sqrt(query head dim)
    tie_embeddings: bool = False
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the source config.json

    def __post_init__(self) -> None:
        if len(self.moe_layers) != self.n_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.n_layers} layers")
        if self.windows and len(self.windows) != self.n_layers:
            raise ValueError(f"windows has {len(self.windows)} entries for {self.n_layers} layers")
        if any(self.moe_layers) and self.moe is None:
            raise ValueError("moe_layers marks MoE blocks but moe is None")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads "
                             f"({self.n_kv_heads})")

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.mla is None else self.mla.qk_rope_head_dim

    def window(self, i: int) -> int | None:
        return self.windows[i] if self.windows else None


class DecoderBlock(nn.Module):
    """``x += attn(norm(x)); x += ffn(norm(x))``; the FFN is a ``MoELayer`` or a dense SwiGLU."""

    def __init__(self, cfg: ArchConfig, i: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.mla is not None:
            scale = cfg.softmax_scale or cfg.mla.qk_head_dim ** -0.5
            self.attn = LatentAttention(cfg.dim, cfg.n_heads, cfg.mla, i, scale, cfg.rope.interleaved)
        else:
            self.attn = GroupedQueryAttention(
                cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, i, qkv_bias=cfg.qkv_bias,
                out_bias=cfg.out_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, clip_qkv=cfg.clip_qkv,
                window=cfg.window(i), interleaved=cfg.rope.interleaved)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoELayer(cfg.moe) if cfg.moe_layers[i] else DenseFFN(cfg.dim, cfg.dense_hidden, "swiglu")

    def forward(self, x_BSD: torch.Tensor, rope, cache: KVCache | None) -> tuple[torch.Tensor, MoEAux | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rope, cache)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            h_BSD, aux = self.ffn(h_BSD)
        else:
            h_BSD, aux = self.ffn(h_BSD), None
        return x_BSD + h_BSD, aux


class MoECausalLM(nn.Module):
    """``forward(idx_BS, cache) -> ModelOutput`` (float32 logits, one ``MoEAux`` per MoE block)."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def forward(self, idx_BS: torch.Tensor, cache: KVCache | None = None) -> ModelOutput:
        if not isinstance(idx_BS, torch.Tensor) or idx_BS.dim() != 2 or idx_BS.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token ids must be an integer tensor of shape (B, S), got {_describe(idx_BS)}")
        S = idx_BS.shape[1]
        start = 0 if cache is None else cache.pos
        x_BSD = self.embed(idx_BS)
        rope = rope_tables(self.cfg.rope, self.cfg.rope_dim, start, S, x_BSD.dtype, x_BSD.device)
        x_BSD, aux = run_decoder_blocks(self.layers, x_BSD, rope, cache)
        return ModelOutput(self.head(self.norm(x_BSD)).float(), aux)

    @torch.no_grad()
    def generate(self, idx_BS: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Append up to ``max_new_tokens`` tokens (greedy at temperature 0), with a KV cache.

        As transformers' ``generate``: a row that produced an end token is padded afterwards
        (``pad_token_id``, else the first end token), and generation stops once every row has ended.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        eos_E = torch.tensor(eos, dtype=idx_BS.dtype, device=idx_BS.device)
        cache = self.new_cache()
        out_BS, new_BS = idx_BS, idx_BS
        done_B = torch.zeros(idx_BS.shape[0], dtype=torch.bool, device=idx_BS.device)
        for _ in range(max_new_tokens):
            logits_BV = self(new_BS, cache).logits[:, -1]
            new_B1 = sample_next(logits_BV, temperature, top_k, top_p, generator)
            new_BS = torch.where(done_B[:, None], torch.full_like(new_B1, pad), new_B1)
            out_BS = torch.cat([out_BS, new_BS], dim=1)
            done_B |= torch.isin(new_BS[:, 0], eos_E)
            if bool(done_B.all()):
                break
        return out_BS


def _describe(x: object) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
