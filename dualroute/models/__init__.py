"""Models built from the MoE layer: a decoder-only language model and a ViT image classifier."""

from __future__ import annotations

from . import lm, vision
from .common import ModelOutput, flops_per_token, param_counts
from .lm import KVCache, LMConfig, TransformerLM
from .vision import ImageConfig, ViTClassifier


def dense_twin(cfg: LMConfig | ImageConfig) -> LMConfig | ImageConfig:
    """The dense config with the same active parameters per token as the MoE config ``cfg``."""
    if isinstance(cfg, LMConfig):
        return lm.dense_twin(cfg)
    if isinstance(cfg, ImageConfig):
        return vision.dense_twin(cfg)
    raise TypeError(f"dense_twin expects an LMConfig or ImageConfig, got {type(cfg).__name__}")


__all__ = [
    "ImageConfig",
    "KVCache",
    "LMConfig",
    "ModelOutput",
    "TransformerLM",
    "ViTClassifier",
    "dense_twin",
    "flops_per_token",
    "param_counts",
]
