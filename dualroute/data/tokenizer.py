"""Tokenizers with one small interface: encode, decode, vocab_size, save; `load_tokenizer` reads any back.

Every tokenizer saves to one JSON file whose "kind" field says which class to rebuild, so a checkpoint
can carry its tokenizer as a single path. `BPETokenizer` is trained locally with the optional
`tokenizers` package; nothing here downloads anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

_FORMAT_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


def _write_json(path: str | Path, kind: str, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": "dualroute-tokenizer", "version": _FORMAT_VERSION, "kind": kind, **payload}
    path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: no training, no unknowns, vocab 256. The default."""

    vocab_size: int = field(default=256, init=False)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A sampled sequence can cut a multi-byte character in half; show it rather than fail.
        return bytes(_check_ids(ids, 256)).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        _write_json(path, "byte", {})


@dataclass(frozen=True)
class CharTokenizer:
    """One id per character seen in training text; id `len(chars)` stands for any unseen character."""

    chars: str
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character, got an empty string")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError(f"CharTokenizer chars must be unique, got {len(self.chars)} chars "
                             f"with {len(set(self.chars))} distinct")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def unk_id(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        return [self._index.get(c, unk) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        table = self.chars + "\ufffd"
        return "".join(table[i] for i in _check_ids(ids, self.vocab_size))

    def save(self, path: str | Path) -> None:
        _write_json(path, "char", {"chars": self.chars})


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("BPETokenizer needs the optional `tokenizers` package: "
                          "pip install tokenizers (or pip install dualroute[data])") from e
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained locally with the `tokenizers` package.

    Byte-level means every string round-trips exactly: there is no unknown token.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend  # a tokenizers.Tokenizer
        self.vocab_size: int = backend.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        tk = _import_tokenizers()
        alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet):
            raise ValueError(f"byte-level BPE needs vocab_size >= {len(alphabet)} (the byte alphabet), "
                             f"got {vocab_size}")
        if not text:
            raise ValueError("cannot train BPE on an empty text")
        backend = tk.Tokenizer(tk.models.BPE())
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                         special_tokens=[], show_progress=False)
        backend.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(backend)

    @classmethod
    def from_json_str(cls, serialized: str) -> BPETokenizer:
        return cls(_import_tokenizers().Tokenizer.from_str(serialized))

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        _write_json(path, "bpe", {"tokenizer": self._backend.to_str()})


def load_tokenizer(path: str | Path) -> ByteTokenizer | CharTokenizer | BPETokenizer:
    """Rebuild a tokenizer written by any `save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a tokenizer JSON file: {e}") from e
    if not isinstance(record, dict) or record.get("format") != "dualroute-tokenizer":
        raise ValueError(f"{path} is not a dualroute tokenizer file (missing format marker)")
    kind = record.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(record["chars"])
    if kind == "bpe":
        return BPETokenizer.from_json_str(record["tokenizer"])
    raise ValueError(f"{path} has unknown tokenizer kind {kind!r}; expected 'byte', 'char' or 'bpe'")
