"""Learning-rate schedules as multipliers of the base learning rate."""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def _check_args(warmup_steps: int, total_steps: int, min_ratio: float) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps`` (and after).

    Warmup is ``(step + 1) / warmup_steps`` so the first step already trains; it reaches 1.0 at
    ``step = warmup_steps - 1`` and the cosine starts from 1.0 at ``step = warmup_steps``.
    """
    _check_args(warmup_steps, total_steps, min_ratio)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> LambdaLR:
    """A ``LambdaLR`` applying ``warmup_cosine``; call ``scheduler.step()`` after each optimizer step.

    The multiplier is a ``functools.partial``: its state dict holds no schedule parameters, so a run
    resumed with a new ``total_steps`` uses the new value.
    """
    _check_args(warmup_steps, total_steps, min_ratio)
    multiplier = functools.partial(
        warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio
    )
    return LambdaLR(optimizer, multiplier)
