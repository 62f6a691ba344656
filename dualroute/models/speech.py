"""A keyword classifier over log-mel spectrograms: a small convolutional front end, a Transformer encoder with
MoE feed-forward blocks, and a mean over time to the classes.

Shapes: B batch, M mel bands, T frames, C conv channels, S = T / 4 tokens (rounded up: two stride-2
convolutions), D model dim, Y classes.

The front end turns (B, M, T) into S tokens of D features; positions are learned. Layer
i is an MoE layer when ``i % moe_every == 0``. The encoder attends both ways (no mask: every clip has the
same length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layer import MoEAux, MoEConfig
from ..routing import deferred_finite_checks
from .common import ModelOutput, check_dropout, check_moe, check_positive_ints, encoder_blocks


def _halved(n: int) -> int:
    """Length after a stride-2, kernel-3, padding-1 convolution."""
    return (n - 1) // 2 + 1


@dataclass(frozen=True)
class SpeechConfig:
    n_mels: int = 40
    frames: int = 101  # spectrogram frames per clip (1 + samples // hop)
    num_classes: int = 16
    channels: int = 64  # between the front end's two convolutions
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int = 128  # width of the dense (swiglu) FFN of non-MoE layers
    moe: MoEConfig | None = None  # None: every layer dense
    moe_every: int = 1
    dropout: float = 0.0
    dense_twin_of: MoEConfig | None = None  # set by dense_twin(): MoE slots become dense FFNs as wide as K experts

    def __post_init__(self) -> None:
        check_positive_ints(self, ("n_mels", "frames", "num_classes", "channels", "dim", "n_layers", "n_heads",
                                   "ffn_hidden", "moe_every"))
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        check_dropout(self.dropout)
        check_moe(self)

    @property
    def tokens(self) -> int:
        return _halved(_halved(self.frames))

    def is_moe_slot(self, i: int) -> bool:
        return i % self.moe_every == 0


class ConvFrontEnd(nn.Module):
    """Two stride-2 convolutions over time (kernel 3) with the mel bands as input channels: (B, M, T) -> (B, S, D).

    One-dimensional: a 2-D convolution with a single input channel is slow to train on the CPU (its weight
    gradient), and keyword spotters commonly convolve over time alone."""

    def __init__(self, n_mels: int, channels: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(n_mels, channels, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv1d(channels, dim, 3, stride=2, padding=1), nn.GELU())

    def forward(self, feats_BMT: torch.Tensor) -> torch.Tensor:
        return self.conv(feats_BMT).transpose(1, 2)


class SpeechClassifier(nn.Module):
    def __init__(self, cfg: SpeechConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_len = cfg.tokens
        self.front = ConvFrontEnd(cfg.n_mels, cfg.channels, cfg.dim)
        self.pos_emb_1SD = nn.Parameter(torch.randn(1, cfg.tokens, cfg.dim) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = encoder_blocks(cfg)
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, feats_BMT: torch.Tensor) -> ModelOutput:
        self._check_input(feats_BMT)
        x_BSD = self.drop(self.front(feats_BMT) + self.pos_emb_1SD)
        aux: list[MoEAux] = []
        with deferred_finite_checks():  # the routers' NaN/Inf checks share one host read
            for block in self.blocks:
                x_BSD, block_aux = block(x_BSD)
                if block_aux is not None:
                    aux.append(block_aux)
        logits_BY = self.head(self.norm(x_BSD).mean(dim=1)).float()
        return ModelOutput(logits_BY, aux)

    def _check_input(self, feats_BMT: torch.Tensor) -> None:
        if not isinstance(feats_BMT, torch.Tensor) or not feats_BMT.is_floating_point():
            got = feats_BMT.dtype if isinstance(feats_BMT, torch.Tensor) else type(feats_BMT).__name__
            raise TypeError(f"spectrograms must be a floating-point tensor, got {got}")
        want = (self.cfg.n_mels, self.cfg.frames)
        if feats_BMT.dim() != 3 or tuple(feats_BMT.shape[1:]) != want:
            raise ValueError(f"expected log-mel spectrograms of shape (B, n_mels, frames) = (B, {want[0]}, "
                             f"{want[1]}), got {tuple(feats_BMT.shape)}")
