"""The image task: classification of digits, MNIST or CIFAR-10; the model is a ``ViTClassifier``."""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import torch

from dualroute.data import load_image_dataset
from dualroute.models import ImageConfig, ViTClassifier, dense_twin
from dualroute.train.presets import (IMAGE_KINDS, DataConfig, RunConfig, TrainConfig, named_run, preset_moe,
                                     register_preset)
from dualroute.train.registry import ModelType, TaskType, register_model, register_task
from dualroute.train.tasks.base import Batch, Task


class ImageTask(Task):
    """Image classification; the model's image size, channels and classes must match the data."""

    unit = "images"

    def __init__(self, cfg: RunConfig) -> None:
        data, model = cfg.data, cfg.model
        if data.kind != "digits" and not data.path:
            raise ValueError(f"data kind {data.kind!r} is read from local files: pass --data.path=<folder>")
        self.dataset = load_image_dataset(data.kind, data.path, data.val_fraction, seed=0)
        c, h, w = self.dataset.image_shape
        want = (model.channels, model.image_size, model.image_size, model.num_classes)
        if want != (c, h, w, self.dataset.num_classes):
            raise ValueError(f"model expects {want[0]}x{want[1]}x{want[2]} images in {want[3]} classes, "
                             f"data {data.kind!r} has {c}x{h}x{w} in {self.dataset.num_classes}")
        super().__init__(cfg)

    def train_batch(self, generator: torch.Generator) -> Batch:
        return self.dataset.get_batch("train", self.run_config.train.batch_size, generator)

    def eval_batches(self) -> Iterator[Batch]:
        t = self.run_config.train
        return itertools.islice(self.dataset.iter_batches("val", t.batch_size), t.eval_batches)

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        return {"val_loss": mean_loss, "val_acc": accuracy}

    @property
    def baseline_loss(self) -> float:
        """Cross-entropy of a uniform guess."""
        return math.log(self.model_config.num_classes)


register_task(TaskType("image", data_kinds=IMAGE_KINDS, make=ImageTask.from_saved, labels="classes"))
register_model(ModelType("vit", ImageConfig, ViTClassifier, task="image"))


# ------------------------------------------------------------------------------------------ presets

# 8x8 digits: 2x2 patches -> 16 tokens, D=64, 2 layers, E=8 experts of F=64, K=2.
_IMG = dict(image_size=8, channels=1, patch_size=2, num_classes=10, dim=64, n_layers=2, n_heads=4)
_IMG_F = 64
_IMG_TRAIN = TrainConfig(steps=400, batch_size=64, lr=2e-3, warmup_steps=20, eval_every=50, eval_batches=8,
                         log_every=10, save_every=200)


def _image(groups: int, groups_per_token: int, **size: Any) -> ImageConfig:
    fields = {**_IMG, **size}
    return ImageConfig(**fields, ffn_hidden=2 * _IMG_F,
                       moe=preset_moe(fields["dim"], _IMG_F, groups, groups_per_token))


def _digits(name: str, model: ImageConfig) -> RunConfig:
    return named_run(name, model, DataConfig(kind="digits"), _IMG_TRAIN)


register_preset("digits-dual", lambda: _digits("digits-dual", _image(4, 2)))
register_preset("digits-flat", lambda: _digits("digits-flat", _image(1, 1)))
register_preset("digits-dense", lambda: _digits("digits-dense", dense_twin(_image(4, 2))))
register_preset("mnist-dual", lambda: named_run("mnist-dual", _image(4, 2, image_size=28, patch_size=4),
                                                DataConfig(kind="mnist"), _IMG_TRAIN))
register_preset("cifar10-dual", lambda: named_run("cifar10-dual",
                                                  _image(4, 2, image_size=32, channels=3, patch_size=4, dim=128),
                                                  DataConfig(kind="cifar10"), _IMG_TRAIN))
