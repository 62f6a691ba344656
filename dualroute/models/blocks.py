"""The pre-norm Transformer block both models stack: ``x += attn(norm(x)); x += ffn(norm(x))``.

Shapes: B batch, S query positions, L key positions (cached + new), D model dim,
H heads, d head dim (D = H * d), h = d / 2 rotary frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoEAux, MoELayer

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos_Sh, sin_Sh) for the positions being computed


class KVCache:
    """Keys and values of every layer, preallocated to ``max_seq_len``; positions ``[0, pos)`` are filled.

    The model advances ``pos`` after each forward, once every layer has written its keys.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, max_seq_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_heads, max_seq_len, head_dim)
        self.k_BHLd = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v_BHLd = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.pos = 0

    def update(self, layer: int, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys / values at ``[pos, pos + S)``; return all of ``[0, pos + S)``."""
        end = self.pos + k_BHSd.shape[2]
        self.k_BHLd[layer][:, :, self.pos : end] = k_BHSd
        self.v_BHLd[layer][:, :, self.pos : end] = v_BHSd
        return self.k_BHLd[layer][:, :, :end], self.v_BHLd[layer][:, :, :end]

    def reset(self) -> None:
        self.pos = 0

    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep rows ``index_B`` of every layer, in that order (beam search follows its surviving beams)."""
        self.k_BHLd = [k.index_select(0, index_B) for k in self.k_BHLd]
        self.v_BHLd = [v.index_select(0, index_B) for v in self.v_BHLd]
        self.batch_size = index_B.shape[0]


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> Rope:
    """cos / sin of ``position * theta^(-2i/d)`` for every position, in float32 (computed in float64)."""
    inv_freq_h = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_Sh = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq_h)
    return angles_Sh.cos().float(), angles_Sh.sin().float()


def apply_rope(x_BHSd: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate each pair ``(x_i, x_{i+h})`` by its position's angle (the rotate-half layout)."""
    cos_Sh, sin_Sh = rope
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_Sh - x2 * sin_Sh, x1 * sin_Sh + x2 * cos_Sh], dim=-1)
    return rotated.type_as(x_BHSd)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``; causal for the LM."""

    def __init__(self, dim: int, n_heads: int, causal: bool, dropout: float = 0.0, layer_idx: int = 0) -> None:
        super().__init__()
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.causal, self.dropout, self.layer_idx = causal, dropout, layer_idx
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: Rope | None = None, cache: KVCache | None = None,
                key_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask_BL`` (bool, True = a real key) hides padded keys: the encoder of a padded batch."""
        B, S, D = x_BSD.shape
        qkv_3BHSd = self.qkv(x_BSD).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q_BHSd, k_BHSd, v_BHSd = qkv_3BHSd.unbind(0)
        if rope is not None:
            q_BHSd, k_BHSd = apply_rope(q_BHSd, rope), apply_rope(k_BHSd, rope)
        k_BHLd, v_BHLd, mask_SL, is_causal = k_BHSd, v_BHSd, None, self.causal
        if cache is not None:  # the new keys join the cached ones
            k_BHLd, v_BHLd = cache.update(self.layer_idx, k_BHSd, v_BHSd)
            mask_SL, is_causal = causal_mask(S, k_BHLd.shape[2], x_BSD.device)
        if key_mask_BL is not None:
            mask_SL, is_causal = _with_key_mask(mask_SL, is_causal, key_mask_BL, S)
        y_BHSd = F.scaled_dot_product_attention(
            q_BHSd, k_BHLd, v_BHLd, attn_mask=mask_SL, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y_BHSd.transpose(1, 2).reshape(B, S, D))


def _with_key_mask(mask_SL: torch.Tensor | None, is_causal: bool, key_mask_BL: torch.Tensor, S: int
                   ) -> tuple[torch.Tensor, bool]:
    """One boolean mask (B, 1, S, L) from a causal / explicit mask and a key padding mask."""
    mask_B1SL = key_mask_BL[:, None, None, :]
    if is_causal:
        L = key_mask_BL.shape[1]
        mask_SL = torch.ones(S, L, dtype=torch.bool, device=key_mask_BL.device).tril(L - S)
    return (mask_B1SL if mask_SL is None else mask_B1SL & mask_SL), False


def causal_mask(S: int, L: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """``(mask_SL, is_causal)`` for S new queries at positions ``L-S .. L-1`` over L keys.

    SDPA's ``is_causal`` aligns the triangle top-left, right only when nothing is cached (S == L);
    one new query sees every key; several new queries after a cache need the explicit mask.
    """
    if S == L:
        return None, True
    if S == 1:
        return None, False
    query_pos_S1 = torch.arange(L - S, L, device=device).unsqueeze(1)
    return torch.arange(L, device=device).unsqueeze(0) <= query_pos_S1, False


class Block(nn.Module):
    """Pre-norm residual block; ``ffn`` is a ``MoELayer`` (returns its ``MoEAux``) or a dense FFN."""

    def __init__(self, dim: int, n_heads: int, ffn: nn.Module, causal: bool, dropout: float = 0.0,
                 norm_eps: float = 1e-5, layer_idx: int = 0) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, n_heads, causal, dropout, layer_idx)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BSD: torch.Tensor, rope: Rope | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, MoEAux | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD), rope, cache))
        h_BSD, aux = self._ffn(self.ffn_norm(x_BSD))
        return x_BSD + self.drop(h_BSD), aux

    def _ffn(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEAux | None]:
        if isinstance(self.ffn, MoELayer):
            return self.ffn(x_BSD)
        return self.ffn(x_BSD), None
