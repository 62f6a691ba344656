"""A small residual CNN image classifier whose MoE blocks route each image to K of E conv experts.

Shapes: B batch, C channels, H x W feature map, Y classes.

stem conv3x3 -> stages (each but the first starts with a stride-2 conv3x3) of pre-norm residual blocks
``x + body(norm(x))`` -> norm, activation, global average pool -> linear head. A block's body is a
``ConvMoELayer`` where the block is listed in ``moe_blocks`` (indices over all blocks, stage by stage) and
``moe`` is set; its dense twin where ``dense_twin_of`` is set (``ConvFFN`` of width K*F, the same
multiply-adds per image as K experts); else a dense ``ConvFFN`` as wide as the stage. Norms are GroupNorm
over each image (no batch statistics, so an expert's batch is just its images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..conv_experts import ConvFFN, ConvMoELayer, check_conv_moe
from ..layer import MoEAux, MoEConfig
from ..routing import deferred_finite_checks
from .common import ModelOutput, active_hidden, check_images, check_positive_ints, replace_moe_with_dense

_ACTIVATIONS = ("gelu", "relu", "silu")


@dataclass(frozen=True)
class CNNConfig:
    image_size: int = 8  # square images, image_size x image_size
    channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64)  # channels of each stage; stages after the first halve H and W
    depths: tuple[int, ...] = (1, 2)  # residual blocks per stage
    moe_blocks: tuple[int, ...] = (1, 2)  # which blocks (0-based, over all stages) route to experts
    activation: str = "gelu"  # stem, dense blocks and the head's pre-pool activation
    moe: MoEConfig | None = None  # expert_kind 'conv', dim = the width of the MoE blocks' stage
    dense_twin_of: MoEConfig | None = None  # set by dense_twin(): MoE blocks become ConvFFNs as wide as K experts

    def __post_init__(self) -> None:
        check_positive_ints(self, ("image_size", "channels", "num_classes"))
        for name in ("widths", "depths"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not values or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {values!r}")
        if len(self.widths) != len(self.depths):
            raise ValueError(f"widths {self.widths} and depths {self.depths} must have one entry per stage")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {_ACTIVATIONS}")
        n = sum(self.depths)
        if not isinstance(self.moe_blocks, tuple) or len(set(self.moe_blocks)) != len(self.moe_blocks) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in self.moe_blocks):
            raise ValueError(f"moe_blocks must be distinct block indices in [0, {n}), got {self.moe_blocks!r}")
        if self.moe is not None and self.dense_twin_of is not None:
            raise ValueError("set at most one of moe and dense_twin_of (dense_twin() sets the latter)")
        for name in ("moe", "dense_twin_of"):
            moe = getattr(self, name)
            if moe is None:
                continue
            check_conv_moe(moe)
            for i in self.moe_blocks:
                if moe.dim != self.block_width(i):
                    raise ValueError(f"{name}.dim ({moe.dim}) must equal the channels of MoE block {i} "
                                     f"({self.block_width(i)}, its stage's width)")

    def block_stage(self, i: int) -> int:
        """The stage block ``i`` belongs to."""
        return next(s for s in range(len(self.depths)) if i < sum(self.depths[: s + 1]))

    def block_width(self, i: int) -> int:
        return self.widths[self.block_stage(i)]

    def stage_size(self, s: int) -> int:
        """H (= W) of stage ``s``'s feature maps: each stride-2 conv (padding 1) maps n to ceil(n / 2)."""
        size = self.image_size
        for _ in range(s):
            size = (size + 1) // 2
        return size


def dense_twin(cfg: CNNConfig) -> CNNConfig:
    """The dense CNN with the MoE model's multiply-adds per image (see ``replace_moe_with_dense``)."""
    if not isinstance(cfg, CNNConfig):
        raise TypeError(f"expected a CNNConfig, got {type(cfg).__name__}")
    return replace_moe_with_dense(cfg)


class ResidualBlock(nn.Module):
    """``x + body(norm(x))``; returns the body's aux result (None for a dense body)."""

    def __init__(self, width: int, body: nn.Module) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, width)
        self.body = body

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, MoEAux | None]:
        h_BCHW = self.norm(x_BCHW)
        if isinstance(self.body, ConvMoELayer):
            y_BCHW, aux = self.body(h_BCHW)
            return x_BCHW + y_BCHW, aux
        return x_BCHW + self.body(h_BCHW), None


class CNNClassifier(nn.Module):
    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_len = 1  # no attention
        self.stem = nn.Conv2d(cfg.channels, cfg.widths[0], 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(cfg.widths[s - 1], cfg.widths[s], 3, stride=2, padding=1)
                                  for s in range(1, len(cfg.widths)))
        self.blocks = nn.ModuleList(ResidualBlock(cfg.block_width(i), self._body(i)) for i in range(sum(cfg.depths)))
        self.norm = nn.GroupNorm(1, cfg.widths[-1])
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes)

    def _body(self, i: int) -> nn.Module:
        cfg, width = self.cfg, self.cfg.block_width(i)
        if i in cfg.moe_blocks and cfg.moe is not None:
            return ConvMoELayer(cfg.moe)
        if i in cfg.moe_blocks and cfg.dense_twin_of is not None:
            t = cfg.dense_twin_of
            return ConvFFN(width, active_hidden(t), t.activation, t.expert_bias)
        return ConvFFN(width, width, cfg.activation)

    def forward(self, images_BCHW: torch.Tensor) -> ModelOutput:
        self._check_input(images_BCHW)
        cfg = self.cfg
        x_BCHW = self.stem(images_BCHW)
        aux: list[MoEAux] = []
        with deferred_finite_checks():  # the routers' NaN/Inf checks share one host read
            for i, block in enumerate(self.blocks):
                s = cfg.block_stage(i)
                if s > 0 and i == sum(cfg.depths[:s]):  # the stage's first block: downsample first
                    x_BCHW = self.down[s - 1](x_BCHW)
                x_BCHW, block_aux = block(x_BCHW)
                if block_aux is not None:
                    aux.append(block_aux)
        pooled_BC = _act(self.norm(x_BCHW), cfg.activation).mean(dim=(2, 3))
        return ModelOutput(self.head(pooled_BC).float(), aux)

    def flops_per_example(self) -> int:
        """Forward multiply-adds x 2 per image, weights only: every conv at its output's H x W, the K experts an
        image uses (of E) in each MoE block, the routers on the pooled vector, the head. Biases, norms,
        activations and pooling are left out (as ``torch.utils.flop_counter`` counts convs and matmuls)."""
        cfg = self.cfg
        total = _weights(self.stem) * cfg.stage_size(0) ** 2
        total += sum(_weights(d) * cfg.stage_size(s + 1) ** 2 for s, d in enumerate(self.down))
        for i, block in enumerate(self.blocks):
            pixels = cfg.stage_size(cfg.block_stage(i)) ** 2
            body = block.body
            if isinstance(body, ConvMoELayer):
                total += body.cfg.experts_per_token * body.experts.macs_per_pixel() * pixels
                total += sum(g.weight.numel() for g in (body.router.gate, body.router.group_gate) if g is not None)
            else:
                total += body.inner.macs_per_pixel() * pixels
        total += _weights(self.head)
        return 2 * total

    def _check_input(self, images_BCHW: torch.Tensor) -> None:
        check_images(images_BCHW, self.cfg.channels, self.cfg.image_size)


def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    return {"gelu": nn.functional.gelu, "relu": nn.functional.relu, "silu": nn.functional.silu}[activation](x)


def _weights(module: nn.Conv2d | nn.Linear) -> int:
    return module.weight.numel()
