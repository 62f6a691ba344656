"""What every model shares: its output, parameter and FLOP counts, config checks, the dense twin.

The dense twin of an MoE model swaps every MoE layer for a dense FFN as wide as the experts one token
uses, so both models spend the same matmul parameters per token (the fair baseline).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..experts import Experts
from ..layer import DenseFFN, MoEAux, MoEConfig, MoELayer
from ..routing import deferred_finite_checks
from .blocks import Block, SelfAttention

C = TypeVar("C")


@dataclass
class ModelOutput:
    logits: torch.Tensor  # float32
    aux: list[MoEAux]  # one per MoE block, in layer order; empty for dense models


# ------------------------------------------------------------------------------------------ counting


def run_decoder_blocks(blocks: nn.ModuleList, x_BSD: torch.Tensor, rope: Any, cache: Any
                       ) -> tuple[torch.Tensor, list[MoEAux]]:
    """Run a decoder's blocks in order (each ``block(x, rope, cache) -> (x, aux or None)``), collect the
    MoE layers' aux results, and advance the KV cache by the sequence length. The routers' NaN/Inf
    checks share one host read (``deferred_finite_checks``)."""
    aux: list[MoEAux] = []
    with deferred_finite_checks():
        for block in blocks:
            x_BSD, block_aux = block(x_BSD, rope, cache)
            if block_aux is not None:
                aux.append(block_aux)
    if cache is not None:
        cache.pos += x_BSD.shape[1]
    return x_BSD, aux


def param_counts(model: nn.Module) -> tuple[int, int]:
    """``(total, active per token)`` parameters; shared (tied) parameters count once.

    Active = total minus, for every ``MoELayer``, the routed expert weights of the ``E - K`` experts a
    token does not use. Embedding tables count as parameters here (a token reads one row, but the
    table is still model state); ``flops_per_token`` leaves table lookups out.
    """
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    for layer in _moe_layers(model):
        E, K = layer.cfg.num_experts, layer.cfg.experts_per_token
        unused += _numel(layer.experts) // E * (E - K)  # every expert has the same shapes
    return total, total - unused


def flops_per_token(model: nn.Module, seq_len: int | None = None) -> int:
    """Approximate forward FLOPs per token: ``2 * matmul params + 4 * n_attn_layers * seq_len * D``.

    The PaLM / Chinchilla convention (forward ``2N``, so training ``6N``): a matmul weight costs one
    multiply-add per token. Counted: the parameters of ``nn.Linear`` and ``nn.Conv2d`` modules (a
    tied LM head counts; it is a matmul), dense FFNs, and for each MoE layer only K of its E experts
    (the router counts in full). Embedding lookups, position tables, norms and the softmax are left
    out. Attention adds ``QK^T`` and ``AV``, ``2 * 2 * seq_len * D`` per layer, over the full
    ``seq_len`` window even for a causal model, as PaLM counts it (the causal mask would halve it).
    ``seq_len`` defaults to ``model.context_len`` (the LM's max_seq_len, the ViT's token count).
    A model whose FLOPs this rule cannot see (a CNN: a conv's weights act at every pixel) counts its own,
    per example, in a ``flops_per_example()`` method, which is returned instead.
    """
    own = getattr(model, "flops_per_example", None)
    if callable(own):
        return int(own())
    if seq_len is None:
        seq_len = getattr(model, "context_len", None)
        if seq_len is None:
            raise TypeError(f"{type(model).__name__} has no context_len; pass seq_len")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    routed = set()
    matmul = 0.0
    for layer in _moe_layers(model):
        matmul += _numel(layer.experts) * layer.cfg.experts_per_token / layer.cfg.num_experts
        routed.add(id(layer.experts))
    attention = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) or (isinstance(module, Experts) and id(module) not in routed):
            matmul += _numel(module)
        elif isinstance(module, SelfAttention):
            attention += 2 * 2 * seq_len * module.dim
    return int(round(2 * matmul + attention))


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------- configs, twin


def active_hidden(moe: MoEConfig) -> int:
    """Width of the dense FFN with the same per-token matmul parameters as one MoE layer."""
    return moe.experts_per_token * moe.hidden + moe.shared_width


def build_ffn(dim: int, ffn_hidden: int, moe_slot: bool, moe: MoEConfig | None,
              dense_twin_of: MoEConfig | None) -> nn.Module:
    """The FFN of one block: the MoE layer, its dense twin, or the plain dense (swiglu) FFN."""
    if moe_slot and moe is not None:
        return MoELayer(moe)
    if moe_slot and dense_twin_of is not None:
        t = dense_twin_of
        return DenseFFN(dim, active_hidden(t), t.expert_kind, t.activation, t.expert_bias)
    return DenseFFN(dim, ffn_hidden, "swiglu")


def replace_moe_with_dense(cfg: C) -> C:
    """The config with ``moe`` moved to ``dense_twin_of``: same layers, dense where MoE was.

    The twin matches the MoE model's active parameters up to the router (``D * (E + G)`` weights
    plus biases per MoE layer, tiny) and any shared-expert gate, so the MoE model is a hair larger.
    (With ``expert_bias`` the K experts carry ``K`` output biases where the twin has one.)
    A config without MoE layers is returned as it is.
    """
    if cfg.moe is None:
        return cfg
    return dataclasses.replace(cfg, moe=None, dense_twin_of=cfg.moe)


def check_positive_ints(cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_dropout(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {value!r}")


def check_moe(cfg: Any) -> None:
    """``moe`` / ``dense_twin_of``: at most one, MoEConfig, with the model's dim in and out."""
    if cfg.moe is not None and cfg.dense_twin_of is not None:
        raise ValueError("set at most one of moe and dense_twin_of (dense_twin() sets the latter)")
    for name in ("moe", "dense_twin_of"):
        moe = getattr(cfg, name)
        if moe is None:
            continue
        if not isinstance(moe, MoEConfig):
            raise TypeError(f"{name} must be a MoEConfig or None, got {type(moe).__name__}")
        if moe.dim != cfg.dim:
            raise ValueError(f"{name}.dim ({moe.dim}) must equal the model dim ({cfg.dim})")
        if moe.out_dim not in (None, cfg.dim):
            raise ValueError(f"{name}.out_dim ({moe.out_dim}) must be None or the model dim ({cfg.dim})")


def check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def encoder_blocks(cfg: Any) -> nn.ModuleList:
    """``cfg.n_layers`` bidirectional blocks (the ViT's, the speech encoder's), an MoE FFN where
    ``cfg.is_moe_slot(i)`` (a dense one as wide as K experts in a dense twin)."""
    return nn.ModuleList(
        Block(cfg.dim, cfg.n_heads, build_ffn(cfg.dim, cfg.ffn_hidden, cfg.is_moe_slot(i), cfg.moe, cfg.dense_twin_of),
              causal=False, dropout=cfg.dropout, layer_idx=i)
        for i in range(cfg.n_layers)
    )


def check_images(images_BCHW: Any, channels: int, image_size: int) -> None:
    """A floating-point ``(B, channels, image_size, image_size)`` tensor, or a TypeError / ValueError naming it."""
    if not isinstance(images_BCHW, torch.Tensor) or not images_BCHW.is_floating_point():
        got = images_BCHW.dtype if isinstance(images_BCHW, torch.Tensor) else type(images_BCHW).__name__
        raise TypeError(f"images must be a floating-point tensor, got {got}")
    want = (channels, image_size, image_size)
    if images_BCHW.dim() != 4 or tuple(images_BCHW.shape[1:]) != want:
        raise ValueError(f"expected images of shape (B, C, H, W) = (B, {', '.join(map(str, want))}), "
                         f"got {tuple(images_BCHW.shape)}")
