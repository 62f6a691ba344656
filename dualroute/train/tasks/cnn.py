"""The CNN image classifier with convolutional experts (``dualroute.models.cnn``), trained by the image task.

Registers the model type ``cnn`` and its presets: ``cnn-dual`` (G=4 groups, J=2 kept, K=2 of E=8 conv experts),
``cnn-flat`` (one group, K=2 of 8) and ``cnn-dense`` (the dense twin: a conv block of K*F hidden channels) on
the bundled 8x8 digits; ``cnn-mnist-dual`` / ``cnn-mnist-dense`` and ``cnn-cifar10-dual`` / ``cnn-cifar10-dense``
on local MNIST / CIFAR-10 files (``--data.path=<folder>``). Each image is routed once, from its pooled features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dualroute.models.cnn import CNNClassifier, CNNConfig, dense_twin
from dualroute.train.presets import DataConfig, RunConfig, TrainConfig, named_run, preset_moe, register_preset
from dualroute.train.registry import ModelType, register_model

register_model(ModelType("cnn", CNNConfig, CNNClassifier, task="image"))


# ------------------------------------------------------------------------------------------ presets

# Digits 8x8: stem 32 channels; stage 1 (8x8): one dense block; stage 2 (4x4, 64 channels): two MoE blocks,
# E=8 conv experts of F=32 hidden channels each, K=2. The dense twin's MoE blocks are 64 -> 64 -> 64 blocks.
_CNN = dict(widths=(32, 64), depths=(1, 2), moe_blocks=(1, 2))
_CNN_F = 32
_CNN_TRAIN = TrainConfig(steps=400, batch_size=64, lr=2e-3, warmup_steps=20, eval_every=50, eval_batches=8,
                         log_every=10, save_every=200, threads=1)  # tiny 4x4 maps: one thread was faster
_FILES_TRAIN = dataclasses.replace(_CNN_TRAIN, threads=None)  # larger maps: torch's default threads


def _cnn(groups: int, groups_per_token: int, **size: Any) -> CNNConfig:
    fields = {"image_size": 8, "channels": 1, "num_classes": 10, **_CNN, **size}
    return CNNConfig(**fields, moe=preset_moe(fields["widths"][-1], _CNN_F, groups, groups_per_token,
                                              expert_kind="conv"))


def _digits(name: str, model: CNNConfig) -> RunConfig:
    return named_run(name, model, DataConfig(kind="digits"), _CNN_TRAIN)


# MNIST 28x28 -> 14x14 -> 7x7 and CIFAR-10 32x32 -> 16x16 -> 8x8: three stages, MoE blocks in the last.
_MNIST = dict(image_size=28, widths=(32, 64, 64), depths=(1, 1, 2), moe_blocks=(2, 3))
_CIFAR = dict(image_size=32, channels=3, widths=(32, 64, 64), depths=(1, 1, 2), moe_blocks=(2, 3))

register_preset("cnn-dual", lambda: _digits("cnn-dual", _cnn(4, 2)))
register_preset("cnn-flat", lambda: _digits("cnn-flat", _cnn(1, 1)))
register_preset("cnn-dense", lambda: _digits("cnn-dense", dense_twin(_cnn(4, 2))))
for _name, _data, _size in (("mnist", "mnist", _MNIST), ("cifar10", "cifar10", _CIFAR)):
    register_preset(f"cnn-{_name}-dual", lambda n=_name, d=_data, s=_size: named_run(
        f"cnn-{n}-dual", _cnn(4, 2, **s), DataConfig(kind=d), _FILES_TRAIN))
    register_preset(f"cnn-{_name}-dense", lambda n=_name, d=_data, s=_size: named_run(
        f"cnn-{n}-dense", dense_twin(_cnn(4, 2, **s)), DataConfig(kind=d), _FILES_TRAIN))
