"""Models built from the MoE layer: a decoder-only language model and a ViT image classifier."""

from __future__ import annotations

import dataclasses
from typing import Any

from .common import ModelOutput, flops_per_token, param_counts, replace_moe_with_dense
from .blocks import KVCache
from .lm import LMConfig, TransformerLM
from .vision import ImageConfig, ViTClassifier


def dense_twin(cfg: Any) -> Any:
    """The dense config with the same active parameters per token as the MoE config ``cfg``: any model config
    with ``moe`` and ``dense_twin_of`` fields (each model builds a dense FFN as wide as K experts where
    ``dense_twin_of`` is set; see ``common.replace_moe_with_dense``)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
            and {"moe", "dense_twin_of"} <= {f.name for f in dataclasses.fields(cfg)}):
        raise TypeError(f"dense_twin expects a model config with moe and dense_twin_of fields, "
                        f"got {type(cfg).__name__}")
    return replace_moe_with_dense(cfg)


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
