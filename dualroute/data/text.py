"""Offline text corpora, nanoGPT-style token files, and a token dataset that samples (x, y) batches.

Shapes: B batch, S sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from dualroute.data.tokenizer import ByteTokenizer, Tokenizer

Split = Literal["train", "val"]
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


def default_corpus() -> str:
    """English documentation shipped with every CPython: the `pydoc_data.topics` help pages.

    Deterministic for a given Python version (topics joined in sorted-key order); about 0.45 MB on 3.11.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _text_files(folder: Path) -> list[Path]:
    # Hidden folders (.git, .venv) would swamp a corpus with tooling files, so they are skipped.
    files = [p for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not _is_hidden(p, folder)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 (bad byte at offset {e.start})") from e


def read_text(path: str | Path) -> str:
    """Read one UTF-8 text file, or every *.txt/*.md/*.rst/*.py file under a folder in sorted order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such text file or folder: {path}")
    if path.is_dir():
        texts = [_read_utf8(p) for p in _text_files(path)]
        text = "\n\n".join(t for t in texts if t)
    else:
        text = _read_utf8(path)
    if not text.strip():
        what = f"no non-empty {'/'.join(TEXT_SUFFIXES)} files" if path.is_dir() else "an empty file"
        raise ValueError(f"{path} holds no text ({what})")
    return text


def write_token_bin(path: str | Path, ids: Sequence[int] | np.ndarray,
                    dtype: type[np.integer] = np.uint16) -> None:
    """Write token ids as a flat binary array (nanoGPT's train.bin format)."""
    ids_T = np.asarray(ids)
    if ids_T.ndim != 1 or not np.issubdtype(ids_T.dtype, np.integer):
        raise ValueError(f"token ids must be a 1-D integer array, got shape {ids_T.shape} "
                         f"dtype {ids_T.dtype}")
    info = np.iinfo(dtype)
    if ids_T.size and (ids_T.min() < info.min or ids_T.max() > info.max):
        raise ValueError(f"token ids span [{ids_T.min()}, {ids_T.max()}], which does not fit "
                         f"{np.dtype(dtype).name} [{info.min}, {info.max}]")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids_T.astype(dtype).tofile(path)


def read_token_bin(path: str | Path, dtype: type[np.integer] = np.uint16,
                   vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a flat binary token file; with `vocab_size`, check every id is below it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"token file {path} is empty")
    if size % itemsize:
        raise ValueError(f"token file {path} has {size} bytes, not a multiple of the "
                         f"{np.dtype(dtype).name} item size {itemsize}; wrong dtype or truncated file")
    tokens_T = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size is not None:
        low, high = int(tokens_T.min()), int(tokens_T.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token file {path} holds ids in [{low}, {high}], outside the "
                             f"vocabulary [0, {vocab_size})")
    return tokens_T


def _token_dtype(vocab_size: int) -> type[np.integer]:
    return np.uint16 if vocab_size <= 2**16 else np.int32


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """``tokenizer.encode(text)`` as a uint16 array (int32 for a larger vocabulary); bytes without a Python list."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    return np.asarray(tokenizer.encode(text), dtype=_token_dtype(tokenizer.vocab_size))


@dataclass
class TokenDataset:
    """A 1-D token array cut into a train part and a val part at the end (contiguous, no shuffling).

    The cut is at ``n_train`` when given (``from_parts``: a corpus split by file), else it leaves the
    last ``val_fraction`` of the tokens for validation.
    """

    tokens: np.ndarray
    val_fraction: float = 0.1
    n_train: int | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got shape {self.tokens.shape} "
                             f"dtype {self.tokens.dtype}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.n_train is None:
            self.n_train = len(self.tokens) - int(round(len(self.tokens) * self.val_fraction))
        elif not 0 <= self.n_train <= len(self.tokens):
            raise ValueError(f"n_train must be in [0, {len(self.tokens)}], got {self.n_train}")

    @classmethod
    def from_text(cls, text: str, tokenizer: Tokenizer, val_fraction: float = 0.1) -> TokenDataset:
        return cls(encode_array(tokenizer, text), val_fraction)

    @classmethod
    def from_parts(cls, train: np.ndarray, val: np.ndarray) -> TokenDataset:
        """Train and validation tokens kept apart (no window crosses from one into the other)."""
        tokens = np.concatenate([train, val])
        return cls(tokens, len(val) / max(len(tokens), 1), n_train=len(train))

    def split_tokens(self, split: Split) -> np.ndarray:
        if split == "train":
            return self.tokens[: self.n_train]
        if split == "val":
            return self.tokens[self.n_train:]
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def _checked_split(self, split: Split, batch_size: int, seq_len: int) -> np.ndarray:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got batch_size={batch_size} "
                             f"seq_len={seq_len}")
        tokens = self.split_tokens(split)
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{split} split has {len(tokens)} tokens, needs at least seq_len + 1 = "
                             f"{seq_len + 1} for one (x, y) pair")
        return tokens

    def get_batch(self, split: Split, batch_size: int, seq_len: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x_BS and y_BS (int64), y being x shifted left by one token."""
        tokens = self._checked_split(split, batch_size, seq_len)
        starts_B = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator)
        index_BS1 = starts_B.numpy()[:, None] + np.arange(seq_len + 1)
        window_BS1 = torch.from_numpy(tokens[index_BS1].astype(np.int64))
        return window_BS1[:, :-1].contiguous(), window_BS1[:, 1:].contiguous()

    def iter_eval_batches(self, split: Split, batch_size: int, seq_len: int,
                          max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows in order; the last batch may be smaller.

        With ``max_batches`` covering fewer windows than the split holds, the windows are spread evenly
        over the whole split (a large validation split is sampled end to end, not read from its start).
        """
        tokens = self._checked_split(split, batch_size, seq_len)
        if max_batches is not None and max_batches <= 0:
            raise ValueError(f"max_batches must be positive or None, got {max_batches}")
        n_windows = (len(tokens) - 1) // seq_len
        starts = np.arange(n_windows) * seq_len
        if max_batches is not None and max_batches * batch_size < n_windows:
            starts = starts[np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(np.int64)]
        for batch_index, first in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and batch_index >= max_batches:
                return
            index_BS1 = np.asarray(starts[first: first + batch_size])[:, None] + np.arange(seq_len + 1)
            window_BS1 = torch.from_numpy(tokens[index_BS1].astype(np.int64))
            yield window_BS1[:, :-1].contiguous(), window_BS1[:, 1:].contiguous()
