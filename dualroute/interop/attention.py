"""Attention as the Hugging Face MoE families compute it: grouped-query attention (Mixtral, Qwen2-MoE,
OLMoE) and multi-head latent attention (DeepSeek-V3), with their rotary embeddings and RMSNorm.

Shapes: B batch, S new positions, L key positions (cached + new), D model dim, H query heads,
Hk key/value heads, d head dim, r rotary dims (h = r / 2 frequencies), c latent (LoRA) rank.

The arithmetic follows transformers operation for operation (norms in float32 then cast back,
cos / sin in float32 cast to the activation dtype, the same rotation layout), so a loaded checkpoint
gives transformers' logits to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import causal_mask

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos_Sh, sin_Sh) in the activation dtype


@dataclass(frozen=True)
class RopeConfig:
    """Rotary frequencies: ``default``, ``linear`` (positions / factor) or ``yarn`` (DeepSeek-V3's long context)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_positions: int = 4096  # yarn: the pretraining context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # multiplies cos and sin (yarn)
    truncate: bool = True  # yarn: round the correction range outward
    interleaved: bool = False  # rotate pairs (x0, x1), (x2, x3), ... instead of (x_i, x_{i+h})

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "yarn"):
            raise ValueError(f"unsupported rope type {self.kind!r}; supported: 'default', 'linear', 'yarn'")

    def inv_freq(self, dim: int, device: torch.device | None = None) -> torch.Tensor:
        """``theta^(-2i/r)`` for i < r/2, in float32 (computed as transformers does), scaled per ``kind``."""
        wavelength_h = self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim)
        if self.kind == "linear":
            return 1.0 / wavelength_h / self.factor
        if self.kind == "yarn":
            return self._yarn(wavelength_h, dim)
        return 1.0 / wavelength_h

    def _yarn(self, wavelength_h: torch.Tensor, dim: int) -> torch.Tensor:
        # Low frequencies (many rotations in the original context) keep their value, high ones are
        # interpolated by 1/factor, with a linear ramp between the two correction dimensions.
        def correction_dim(rotations: float) -> float:
            return dim * math.log(self.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp_h = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep_h = (1 - ramp_h).to(wavelength_h.device)
        return 1.0 / (self.factor * wavelength_h) * (1 - keep_h) + 1.0 / wavelength_h * keep_h


def rope_tables(rope: RopeConfig, dim: int, start: int, length: int, dtype: torch.dtype,
                device: torch.device) -> Rope:
    """cos / sin for positions ``[start, start + length)``: angles in float32, then cast to ``dtype``."""
    inv_freq_h = rope.inv_freq(dim, device)
    positions_S = torch.arange(start, start + length, device=device, dtype=torch.int64).float()
    angles_Sh = positions_S[:, None] * inv_freq_h[None, :]
    cos_Sh, sin_Sh = angles_Sh.cos() * rope.attention_factor, angles_Sh.sin() * rope.attention_factor
    return cos_Sh.to(dtype), sin_Sh.to(dtype)


def rotate(x_BHSr: torch.Tensor, rope: Rope, interleaved: bool = False) -> torch.Tensor:
    """Rotate pairs by their position's angle; pairs are ``(x_i, x_{i+h})`` or, interleaved, ``(x_2i, x_2i+1)``.

    The interleaved output is de-interleaved (first members, then second members), as transformers
    returns it; attention scores are unchanged because q and k are permuted alike.
    """
    cos_Sh, sin_Sh = rope
    if interleaved:
        x1, x2 = x_BHSr[..., 0::2], x_BHSr[..., 1::2]
    else:
        x1, x2 = x_BHSr.chunk(2, dim=-1)
    return torch.cat([x1 * cos_Sh - x2 * sin_Sh, x2 * cos_Sh + x1 * sin_Sh], dim=-1)


class RMSNorm(nn.Module):
    """transformers' RMSNorm: normalise in float32, cast back, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Per layer, two growing tensors concatenated along dim 2 (keys / values, or MLA's latents)."""

    def __init__(self, n_layers: int) -> None:
        self.first: list[torch.Tensor | None] = [None] * n_layers
        self.second: list[torch.Tensor | None] = [None] * n_layers
        self.pos = 0  # positions already cached; the model advances it after each forward

    def update(self, layer: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first[layer] is not None:
            a = torch.cat([self.first[layer], a], dim=2)
            b = torch.cat([self.second[layer], b], dim=2)
        self.first[layer], self.second[layer] = a, b
        return a, b


def attend(q_BHSd: torch.Tensor, k_BHLd: torch.Tensor, v_BHLe: torch.Tensor, scale: float,
           window: int | None = None) -> torch.Tensor:
    """Causal SDPA for S new queries at the last S of L positions; ``window`` keeps keys with ``q - k < window``."""
    S, L = q_BHSd.shape[2], k_BHLd.shape[2]
    if window is None:
        mask_SL, is_causal = causal_mask(S, L, q_BHSd.device)
    else:
        q_S1 = torch.arange(L - S, L, device=q_BHSd.device)[:, None]
        k_1L = torch.arange(L, device=q_BHSd.device)[None, :]
        mask_SL, is_causal = (k_1L <= q_S1) & (k_1L > q_S1 - window), False
    return F.scaled_dot_product_attention(q_BHSd, k_BHLd, v_BHLe, attn_mask=mask_SL, is_causal=is_causal,
                                          scale=scale)


class GroupedQueryAttention(nn.Module):
    """Mixtral / Qwen2-MoE / OLMoE attention; parameter names are transformers' (``q_proj``, ...)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, layer_idx: int, *,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 clip_qkv: float | None = None, window: int | None = None, interleaved: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx, self.clip_qkv, self.window, self.interleaved = layer_idx, clip_qkv, window, interleaved
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        # OLMoE normalises the whole projection (all heads together), before splitting into heads.
        self.q_norm = RMSNorm(n_heads * head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(n_kv_heads * head_dim, norm_eps) if qk_norm else None

    def forward(self, x_BSD: torch.Tensor, rope: Rope, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q_BHSd = rotate(q.view(B, S, -1, self.head_dim).transpose(1, 2), rope, self.interleaved)
        k_BHSd = rotate(k.view(B, S, -1, self.head_dim).transpose(1, 2), rope, self.interleaved)
        v_BHSd = v.view(B, S, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k_BHSd, v_BHSd = cache.update(self.layer_idx, k_BHSd, v_BHSd)
        repeats = self.n_heads // self.n_kv_heads
        k_BHLd, v_BHLd = k_BHSd.repeat_interleave(repeats, dim=1), v_BHSd.repeat_interleave(repeats, dim=1)
        y_BHSd = attend(q_BHSd, k_BHLd, v_BHLd, self.head_dim ** -0.5, self.window)
        return self.o_proj(y_BHSd.transpose(1, 2).reshape(B, S, -1))


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek-V3 multi-head latent attention sizes (transformers' config names)."""

    q_lora_rank: int | None  # None: queries from one full projection
    kv_lora_rank: int  # c
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # r
    v_head_dim: int
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class LatentAttention(nn.Module):
    """DeepSeek-V3 MLA: keys and values come from one compressed latent (cached compressed) plus a shared
    rotary key; parameter names are transformers' (``kv_a_proj_with_mqa``, ``kv_b_proj``, ...)."""

    def __init__(self, dim: int, n_heads: int, mla: MLAConfig, layer_idx: int, scale: float,
                 interleaved: bool) -> None:
        super().__init__()
        self.n_heads, self.mla, self.layer_idx = n_heads, mla, layer_idx
        self.scale, self.interleaved = scale, interleaved
        qk = n_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, mla.q_lora_rank, bias=mla.bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank)  # default eps, as transformers builds it
            self.q_b_proj = nn.Linear(mla.q_lora_rank, qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=mla.bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, n_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * mla.v_head_dim, dim, bias=mla.bias)

    def forward(self, x_BSD: torch.Tensor, rope: Rope, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        m = self.mla
        q = self.q_proj(x_BSD) if m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_pass_BHSn, q_rot_BHSr = q.view(B, S, -1, m.qk_head_dim).transpose(1, 2).split(
            [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent_BSc, k_rot_BSr = self.kv_a_proj_with_mqa(x_BSD).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent_B1Sc = self.kv_a_layernorm(latent_BSc).view(B, 1, S, m.kv_lora_rank)
        q_rot_BHSr = rotate(q_rot_BHSr, rope, self.interleaved)
        k_rot_B1Sr = rotate(k_rot_BSr.view(B, 1, S, m.qk_rope_head_dim), rope, self.interleaved)
        if cache is not None:
            latent_B1Sc, k_rot_B1Sr = cache.update(self.layer_idx, latent_B1Sc, k_rot_B1Sr)
        L = latent_B1Sc.shape[2]
        kv_BHLe = self.kv_b_proj(latent_B1Sc).view(B, L, -1, m.qk_nope_head_dim + m.v_head_dim).transpose(1, 2)
        k_nope_BHLn, v_BHLv = kv_BHLe.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_BHLd = torch.cat([k_nope_BHLn, k_rot_B1Sr.expand(-1, self.n_heads, -1, -1)], dim=-1)
        q_BHSd = torch.cat([q_pass_BHSn, q_rot_BHSr], dim=-1)
        y_BHSv = attend(q_BHSd, k_BHLd, v_BHLv, self.scale)
        return self.o_proj(y_BHSv.transpose(1, 2).reshape(B, S, -1))
