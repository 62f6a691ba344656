"""A small Vision Transformer classifier (digits 1x8x8, MNIST 1x28x28, CIFAR 3x32x32) with MoE FFNs.

Shapes: B batch, C channels, H x W image, h x w patch grid, P = h * w patches, S = P + 1 tokens
(class token first), D model dim, Y classes.

Patches are embedded by a Conv2d with stride = kernel = patch size, positions are learned, and the
class token's final state is classified. Layer i is an MoE layer when ``i % moe_every == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layer import MoEAux, MoEConfig
from ..routing import deferred_finite_checks
from .common import (ModelOutput, check_dropout, check_images, check_moe, check_positive_ints, encoder_blocks,
                     replace_moe_with_dense)


@dataclass(frozen=True)
class ImageConfig:
    image_size: int = 8  # square images, image_size x image_size
    channels: int = 1
    patch_size: int = 2
    num_classes: int = 10
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int = 128  # width of the dense (swiglu) FFN of non-MoE layers
    moe: MoEConfig | None = None  # None: every layer dense
    moe_every: int = 1
    dropout: float = 0.0
    dense_twin_of: MoEConfig | None = None  # set by dense_twin(): MoE slots become dense FFNs as wide as K experts

    def __post_init__(self) -> None:
        check_positive_ints(self, ("image_size", "channels", "patch_size", "num_classes", "dim", "n_layers",
                                   "n_heads", "ffn_hidden", "moe_every"))
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        check_dropout(self.dropout)
        check_moe(self)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_slot(self, i: int) -> bool:
        return i % self.moe_every == 0


def dense_twin(cfg: ImageConfig) -> ImageConfig:
    """The dense ViT with the MoE model's active parameters per token (see ``replace_moe_with_dense``)."""
    if not isinstance(cfg, ImageConfig):
        raise TypeError(f"expected an ImageConfig, got {type(cfg).__name__}")
    return replace_moe_with_dense(cfg)


class ViTClassifier(nn.Module):
    def __init__(self, cfg: ImageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_len = cfg.num_patches + 1
        self.patch_emb = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token_11D = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_emb_1SD = nn.Parameter(torch.randn(1, self.context_len, cfg.dim) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = encoder_blocks(cfg)
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, images_BCHW: torch.Tensor) -> ModelOutput:
        self._check_input(images_BCHW)
        x_BDhw = self.patch_emb(images_BCHW)
        x_BPD = x_BDhw.flatten(2).transpose(1, 2)
        cls_B1D = self.cls_token_11D.expand(x_BPD.shape[0], -1, -1)
        x_BSD = self.drop(torch.cat([cls_B1D, x_BPD], dim=1) + self.pos_emb_1SD)
        aux: list[MoEAux] = []
        with deferred_finite_checks():  # the routers' NaN/Inf checks share one host read
            for block in self.blocks:
                x_BSD, block_aux = block(x_BSD)
                if block_aux is not None:
                    aux.append(block_aux)
        logits_BY = self.head(self.norm(x_BSD[:, 0])).float()
        return ModelOutput(logits_BY, aux)

    def _check_input(self, images_BCHW: torch.Tensor) -> None:
        check_images(images_BCHW, self.cfg.channels, self.cfg.image_size)
