"""Readers and writers for the MNIST (IDX) and CIFAR-10 (python and binary versions) file formats.

Readers return float32 images_NCHW in [0, 1] and int64 labels_N; writers exist so that tests and users
can build small fixture files in exactly the published formats. Nothing is downloaded, and nothing is
unpickled: CIFAR-10's python batches are pickles, read by walking their opcodes (pickle_reader.py).
"""

from __future__ import annotations

import gzip
import pickle  # only to write fixture batches; reading never unpickles
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from .pickle_reader import Refused, read_batch_pickle

ImageSplit = Literal["train", "test"]

_IDX_UBYTE = 0x08
_MNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_PIXELS = 3 * 32 * 32  # one image: 3 channel planes of 32x32 bytes


class LabeledImages(NamedTuple):
    images_NCHW: torch.Tensor  # float32 in [0, 1]
    labels_N: torch.Tensor  # int64


def _uint8_to_images(pixels_NCHW: np.ndarray, scale: float = 255.0) -> torch.Tensor:
    return torch.from_numpy(pixels_NCHW.astype(np.float32) / np.float32(scale))


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# ---- MNIST: IDX files -------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError
        raise ValueError(f"{path} is not a valid gzip file: {e}") from e


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file of `ndim` dimensions (magic 0x0000080<ndim>, big-endian sizes)."""
    path = Path(path)
    raw = _read_bytes(path)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than the {header_len}-byte "
                         f"IDX header")
    magic = int.from_bytes(raw[:4], "big")
    expected = (_IDX_UBYTE << 8) | ndim
    if magic != expected:
        raise ValueError(f"{path} has bad IDX magic 0x{magic:08x}, expected 0x{expected:08x} "
                         f"(unsigned bytes, {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n_expected, n_data = int(np.prod(shape)), len(raw) - header_len
    if n_data != n_expected:
        problem = "truncated" if n_data < n_expected else "longer than its header says"
        raise ValueError(f"{path} is {problem}: header shape {shape} needs {n_expected} data bytes, "
                         f"found {n_data}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file; a path ending in .gz is gzip-compressed."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX writer takes a uint8 array, got dtype {array.dtype} ndim {array.ndim}")
    header = ((_IDX_UBYTE << 8) | array.ndim).to_bytes(4, "big")
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
    return path


def _find_mnist_file(folder: Path, stem: str) -> Path:
    # torchvision keeps the same files under MNIST/raw, so a torchvision root works too.
    candidates = [d / name for d in (folder, folder / "MNIST" / "raw") for name in (stem, stem + ".gz")]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"MNIST file {stem} not found; looked for: "
                            + ", ".join(str(p) for p in candidates))


def read_mnist(folder: str | Path, split: ImageSplit = "train") -> LabeledImages:
    """Read MNIST-format IDX files (plain or .gz) from `folder`: images_N1HW float32 in [0, 1]."""
    _check_split(split)
    image_stem, label_stem = _MNIST_STEMS[split]
    image_path = _find_mnist_file(Path(folder), image_stem)
    label_path = _find_mnist_file(Path(folder), label_stem)
    pixels_NHW, labels_N = read_idx(image_path, ndim=3), read_idx(label_path, ndim=1)
    if len(pixels_NHW) != len(labels_N):
        raise ValueError(f"MNIST count mismatch: {image_path} has {len(pixels_NHW)} images but "
                         f"{label_path} has {len(labels_N)} labels")
    return LabeledImages(_uint8_to_images(pixels_NHW[:, None]), torch.from_numpy(labels_N.astype(np.int64)))


def write_mnist_idx(folder: str | Path, pixels_NHW: np.ndarray, labels_N: np.ndarray,
                    split: ImageSplit = "train", compress: bool = False) -> tuple[Path, Path]:
    """Write uint8 images and labels under the standard MNIST file names; returns both paths."""
    _check_split(split)
    labels_N = np.asarray(labels_N)
    if np.asarray(pixels_NHW).ndim != 3 or labels_N.ndim != 1:
        raise ValueError(f"need pixels_NHW (3-D) and labels_N (1-D), got shapes "
                         f"{np.shape(pixels_NHW)} and {labels_N.shape}")
    if labels_N.size and (labels_N.min() < 0 or labels_N.max() > 255):
        raise ValueError(f"MNIST labels must fit a byte, got range [{labels_N.min()}, {labels_N.max()}]")
    suffix = ".gz" if compress else ""
    image_stem, label_stem = _MNIST_STEMS[split]
    return (write_idx(Path(folder) / (image_stem + suffix), pixels_NHW),
            write_idx(Path(folder) / (label_stem + suffix), labels_N.astype(np.uint8)))


# ---- CIFAR-10: python batches (pickles, read without unpickling: pickle_reader) and binary batches ----


def _get(batch: dict, key: str) -> Any:
    # The published batches were pickled by Python 2, so their keys are bytes.
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"missing key {key!r}")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = read_batch_pickle(path.read_bytes())
    except Refused as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:  # genops' own errors too: unknown opcode, truncated data, no STOP
        raise ValueError(f"{path} is not a CIFAR-10 pickle batch: {e}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} holds a {type(batch).__name__}, expected a dict with data and labels")
    try:
        data, labels = _get(batch, "data"), _get(batch, "labels")
    except ValueError as e:
        raise ValueError(f"{path}: {e}; found keys {sorted(map(str, batch))}") from None
    data, labels_N = _as_array(data), _as_array(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise ValueError(f"{path}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels_N.shape != (len(data),) or not np.issubdtype(labels_N.dtype, np.integer):
        raise ValueError(f"{path}: need {len(data)} integer labels to match data, got labels of "
                         f"shape {labels_N.shape} dtype {labels_N.dtype}")
    return data, labels_N


def _as_array(value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged or oddly nested lists
        return np.empty((), dtype=object)


def _load_cifar_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    record = 1 + _CIFAR_PIXELS
    if not raw or len(raw) % record:
        raise ValueError(f"{path} is not a CIFAR-10 binary batch: its {len(raw)} bytes are not a whole, "
                         f"nonzero number of {record}-byte records (1 label byte + 3072 pixel bytes); "
                         f"truncated?")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels_N = records[:, 0]
    bad = np.flatnonzero(labels_N > 9)
    if len(bad):
        raise ValueError(f"{path}: record {bad[0]} has label {labels_N[bad[0]]}, not a CIFAR-10 class "
                         f"(0-9); CIFAR-100's binary records have two label bytes and are not read")
    return records[:, 1:], labels_N


_CIFAR_LAYOUTS = {  # layout: (subfolder of the published archive, file suffix, loader)
    "binary": ("cifar-10-batches-bin", ".bin", _load_cifar_bin_batch),
    "python": ("cifar-10-batches-py", "", _load_cifar_batch),
}


def find_cifar10_batches(folder: str | Path, split: ImageSplit = "train") -> tuple[str, list[Path]]:
    """Which CIFAR-10 layout `folder` holds and the batch files of `split`: ("python" | "binary", paths).

    Looks in `folder` itself and in the archives' subfolders cifar-10-batches-py (data_batch_1 ...
    data_batch_5, test_batch) and cifar-10-batches-bin (the same names with .bin). Where more than
    one holds batches, the first with every file of `split` wins, the binary version first.
    """
    _check_split(split)
    folder = Path(folder)
    found: list[tuple[str, list[Path]]] = []
    for layout, (subfolder, suffix, _) in _CIFAR_LAYOUTS.items():
        names = [name + suffix for names in _CIFAR_FILES.values() for name in names]
        for base in (folder / subfolder, folder):
            if any((base / name).is_file() for name in names):
                found.append((layout, [base / (name + suffix) for name in _CIFAR_FILES[split]]))
    for layout, paths in found:
        if all(p.is_file() for p in paths):
            return layout, paths
    if found:
        layout, paths = found[0]
        raise FileNotFoundError(f"CIFAR-10 {split} batches missing ({layout} version): "
                                + ", ".join(str(p) for p in paths if not p.is_file()))
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {folder}: looked for the python version (data_batch_1 ... data_batch_5, "
        f"test_batch) in {folder} and {folder / 'cifar-10-batches-py'}, and the binary version (the "
        f"same names with .bin) in {folder} and {folder / 'cifar-10-batches-bin'}")


def read_cifar10(folder: str | Path, split: ImageSplit = "train") -> LabeledImages:
    """Read CIFAR-10 batches from `folder`: the python version or the binary version, whichever is there.

    The folder may be the extracted cifar-10-batches-py or cifar-10-batches-bin, or hold one of them
    (see find_cifar10_batches). The binary version's records are read as bytes. The python version's
    batches are pickles, but nothing is unpickled: their opcodes are walked with pickletools.genops and
    only plain data and numeric numpy arrays are accepted (arrays are made with np.frombuffer; no
    global the file names is imported or called). Anything else (another global such as os.system,
    another opcode, an object dtype) is refused with a ValueError naming the file, so a crafted file
    cannot run code.
    """
    layout, paths = find_cifar10_batches(folder, split)
    load = _CIFAR_LAYOUTS[layout][2]
    batches = [load(p) for p in paths]
    pixels_NCHW = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels_N = np.concatenate([labels for _, labels in batches]).astype(np.int64)
    return LabeledImages(_uint8_to_images(pixels_NCHW), torch.from_numpy(labels_N))


def _check_cifar_arrays(pixels_NCHW: np.ndarray, labels_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels_NCHW, labels_N = np.asarray(pixels_NCHW), np.asarray(labels_N)
    if pixels_NCHW.dtype != np.uint8 or pixels_NCHW.shape[1:] != (3, 32, 32):
        raise ValueError(f"need uint8 pixels of shape (N, 3, 32, 32), got {pixels_NCHW.dtype} "
                         f"{pixels_NCHW.shape}")
    if len(labels_N) != len(pixels_NCHW):
        raise ValueError(f"got {len(pixels_NCHW)} images but {len(labels_N)} labels")
    return pixels_NCHW, labels_N


def write_cifar10_batch(path: str | Path, pixels_NCHW: np.ndarray, labels_N: np.ndarray,
                        protocol: int = 2) -> Path:
    """Write one python-version batch as published (a pickle: bytes keys, uint8 (N, 3072) rows).

    The published files are Python 2 pickles of protocol 2; `protocol` picks another for tests.
    """
    pixels_NCHW, labels_N = _check_cifar_arrays(pixels_NCHW, labels_N)
    batch = {b"batch_label": b"dualroute fixture", b"data": pixels_NCHW.reshape(len(pixels_NCHW), -1),
             b"labels": [int(v) for v in labels_N]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return path


def write_cifar10_bin_batch(path: str | Path, pixels_NCHW: np.ndarray, labels_N: np.ndarray) -> Path:
    """Write one binary-version batch: per image, 1 label byte then 3072 channel-major pixel bytes."""
    pixels_NCHW, labels_N = _check_cifar_arrays(pixels_NCHW, labels_N)
    if labels_N.size and (labels_N.min() < 0 or labels_N.max() > 9):
        raise ValueError(f"CIFAR-10 labels are 0-9, got range [{labels_N.min()}, {labels_N.max()}]")
    records = np.empty((len(pixels_NCHW), 1 + _CIFAR_PIXELS), dtype=np.uint8)
    records[:, 0] = labels_N
    records[:, 1:] = pixels_NCHW.reshape(len(pixels_NCHW), -1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(records.tobytes())
    return path
