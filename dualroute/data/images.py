"""Image classification data: bundled digits, MNIST/CIFAR-10 files, and a dataset that serves batches.

Shapes: N examples, B batch, C channels, H height, W width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from dualroute.data.image_files import LabeledImages, read_cifar10, read_mnist

Split = Literal["train", "val"]
IMAGE_DATASETS = ("digits", "mnist", "cifar10")
_NUM_CLASSES = 10  # all three datasets have ten classes


def load_digits_dataset() -> LabeledImages:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes); no download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn "
                          "(or pip install dualroute[data])") from e
    digits = load_digits()
    # Pixel values are counts 0..16 (an 8x8 grid of 4x4 bit blocks), hence the scale.
    images_N1HW = torch.from_numpy(digits.images.astype(np.float32)[:, None] / np.float32(16.0))
    return LabeledImages(images_N1HW, torch.from_numpy(digits.target.astype(np.int64)))


@dataclass
class ImageDataset:
    """Images and labels with a seeded train/val split and per-channel stats taken from train only."""

    images_NCHW: torch.Tensor = field(repr=False)
    labels_N: torch.Tensor = field(repr=False)
    val_fraction: float = 0.1
    seed: int = 0
    normalize: bool = True
    num_classes: int | None = None  # None: one more than the largest label
    train_index: torch.Tensor = field(init=False, repr=False)
    val_index: torch.Tensor = field(init=False, repr=False)
    mean_C: torch.Tensor = field(init=False, repr=False)
    std_C: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        n = len(self.labels_N)
        perm_N = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(n * self.val_fraction))
        self.val_index, self.train_index = perm_N[:n_val].sort().values, perm_N[n_val:].sort().values
        if len(self.train_index) == 0:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training images out of {n}")
        max_label = int(self.labels_N.max())
        if self.num_classes is None:
            self.num_classes = max_label + 1
        elif max_label >= self.num_classes:
            raise ValueError(f"label {max_label} does not fit num_classes={self.num_classes}")
        train_NCHW = self.images_NCHW[self.train_index]
        self.mean_C = train_NCHW.mean(dim=(0, 2, 3))
        std_C = train_NCHW.std(dim=(0, 2, 3))
        self.std_C = torch.where(std_C > 0, std_C, torch.ones_like(std_C))  # constant channel: no scaling

    def _validate(self) -> None:
        images, labels = self.images_NCHW, self.labels_N
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images_NCHW must be a 4-D float tensor, got shape {tuple(images.shape)} "
                             f"dtype {images.dtype}")
        if labels.ndim != 1 or labels.dtype != torch.int64 or len(labels) != len(images):
            raise ValueError(f"labels_N must be int64 of shape ({len(images)},), got shape "
                             f"{tuple(labels.shape)} dtype {labels.dtype}")
        if len(labels) == 0 or int(labels.min()) < 0:
            raise ValueError(f"need at least one image and labels >= 0, got {len(labels)} images")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images_NCHW.shape
        return c, h, w

    def split_index(self, split: Split) -> torch.Tensor:
        if split == "train":
            return self.train_index
        if split == "val":
            return self.val_index
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def _take(self, index_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_BCHW = self.images_NCHW[index_B]
        if self.normalize:
            x_BCHW = (x_BCHW - self.mean_C[:, None, None]) / self.std_C[:, None, None]
        return x_BCHW, self.labels_N[index_B]

    def _checked_index(self, split: Split, batch_size: int) -> torch.Tensor:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        index = self.split_index(split)
        if len(index) == 0:
            raise ValueError(f"{split} split is empty (val_fraction={self.val_fraction})")
        return index

    def get_batch(self, split: Split, batch_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch (with replacement) drawn with `generator`: x_BCHW float32, y_B int64."""
        index = self._checked_index(split, batch_size)
        pick_B = torch.randint(len(index), (batch_size,), generator=generator)
        return self._take(index[pick_B])

    def iter_batches(self, split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every example of the split once, in order; the last batch may be smaller."""
        index = self._checked_index(split, batch_size)
        for start in range(0, len(index), batch_size):
            yield self._take(index[start: start + batch_size])


def load_image_dataset(name: str, path: str | Path | None = None, val_fraction: float = 0.1,
                       seed: int = 0) -> ImageDataset:
    """`name` is digits (bundled), mnist or cifar10 (training files read from the folder `path`)."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    if name == "digits":
        images = load_digits_dataset()
    elif path is None:
        raise ValueError(f"the {name} dataset is read from local files: pass path=<folder holding "
                         f"the {name} files> (nothing is downloaded)")
    else:
        images = (read_mnist if name == "mnist" else read_cifar10)(path, "train")
    return ImageDataset(images.images_NCHW, images.labels_N, val_fraction, seed,
                        num_classes=_NUM_CLASSES)
