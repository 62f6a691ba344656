"""Log-mel spectrograms (torch STFT + librosa's mel filter bank) and SpecAugment-style masking.

Shapes: B clips, L samples, M mel bands, Fq = window // 2 + 1 STFT bins, T frames = 1 + L // hop (centred).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 16000
    n_mels: int = 40
    window: int = 400  # samples per STFT window (and FFT size): 25 ms at 16 kHz
    hop: int = 160  # 10 ms at 16 kHz
    f_min: float = 20.0
    f_max: float | None = None  # None: sample_rate / 2

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_mels", "window", "hop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        f_max = self.sample_rate / 2 if self.f_max is None else self.f_max
        if not 0 <= self.f_min < f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={self.f_min}, "
                             f"f_max={self.f_max}, sample_rate={self.sample_rate}")

    def frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop


def mel_filters(cfg: FeatureConfig) -> torch.Tensor:
    """(M, Fq) Slaney-normalised mel filter bank from librosa."""
    try:
        import librosa
    except ImportError:
        raise ImportError("log-mel features need librosa: pip install 'dualroute[speech]'") from None
    fb_MF = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.window, n_mels=cfg.n_mels, fmin=cfg.f_min,
                                fmax=cfg.f_max)
    return torch.from_numpy(fb_MF).float()


class LogMel(nn.Module):
    """``log(mel power + eps)`` of float waveforms in [-1, 1]: (B, L) -> (B, M, T)."""

    def __init__(self, cfg: FeatureConfig, eps: float = 1e-6) -> None:
        super().__init__()
        self.cfg, self.eps = cfg, eps
        self.register_buffer("window_W", torch.hann_window(cfg.window), persistent=False)
        self.register_buffer("fb_MF", mel_filters(cfg), persistent=False)

    def forward(self, wave_BL: torch.Tensor) -> torch.Tensor:
        if not isinstance(wave_BL, torch.Tensor) or wave_BL.dim() != 2 or not wave_BL.is_floating_point():
            got = tuple(wave_BL.shape) if isinstance(wave_BL, torch.Tensor) else type(wave_BL).__name__
            raise ValueError(f"LogMel expects float waveforms of shape (B, L), got {got}")
        if wave_BL.shape[1] < self.cfg.window // 2 + 1:
            raise ValueError(f"clips of {wave_BL.shape[1]} samples are shorter than half the window "
                             f"({self.cfg.window})")
        spec_BFT = torch.stft(wave_BL.float(), self.cfg.window, self.cfg.hop, window=self.window_W, center=True,
                              pad_mode="reflect", return_complex=True)
        power_BFT = spec_BFT.real**2 + spec_BFT.imag**2
        return torch.log(torch.einsum("mf,bft->bmt", self.fb_MF, power_BFT) + self.eps)


@dataclass(frozen=True)
class MaskConfig:
    freq_masks: int = 2  # bands of mel bins zeroed per clip
    freq_width: int = 6  # each up to this many bins
    time_masks: int = 2
    time_width: int = 10  # frames

    def __post_init__(self) -> None:
        for name in ("freq_masks", "freq_width", "time_masks", "time_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def spec_augment(feats_BMT: torch.Tensor, cfg: MaskConfig, generator: torch.Generator) -> torch.Tensor:
    """SpecAugment's frequency and time masking (no warping): each clip gets ``freq_masks`` bands of up to
    ``freq_width`` mel bins and ``time_masks`` spans of up to ``time_width`` frames set to its mean."""
    B, M, T = feats_BMT.shape
    keep_BMT = torch.ones_like(feats_BMT, dtype=torch.bool)
    for size, count, width, dim in ((M, cfg.freq_masks, cfg.freq_width, 1), (T, cfg.time_masks, cfg.time_width, 2)):
        pos = torch.arange(size).view(*([1] * (dim)), size, *([1] * (2 - dim)))  # along ``dim``
        for _ in range(count):
            w_B = torch.randint(0, min(width, size) + 1, (B,), generator=generator)
            start_B = (torch.rand(B, generator=generator) * (size - w_B + 1)).long()
            lo = start_B.view(B, 1, 1)
            keep_BMT &= ~((pos >= lo) & (pos < lo + w_B.view(B, 1, 1)))
    mean_B11 = feats_BMT.mean(dim=(1, 2), keepdim=True)
    return torch.where(keep_BMT, feats_BMT, mean_B11)
