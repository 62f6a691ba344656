"""Parallel text for sequence-to-sequence training: reading, a subword tokenizer pair, length-bucketed batches.

Three input forms (``load_parallel``):

- a folder in the Multi30k layout: ``train.{src}`` / ``train.{tgt}`` (each may be gzipped: ``train.en.gz``),
  optionally ``val`` (or ``valid`` / ``dev``) and ``test*`` pairs; without val files the val split is cut off
  train deterministically; the test split is the first ``test*`` pair in sorted order (``test_2016_flickr``);
- ``"A,B"``: two line-aligned files, source then target;
- one tab-separated file: ``source<TAB>target`` per line.

Every file is UTF-8, gzipped or not (told by its first two bytes, not by its name). Lines are split on
``\\n`` only (a trailing ``\\r`` is dropped) and stripped of surrounding whitespace. A missing, empty or
non-UTF-8 file, files of different line counts, or a TSV line without exactly one tab is an error naming
the path (and line, 1-based). A pair with an empty side (a blank line) is skipped and counted in the
splits' description, since it teaches nothing and the line counts already vouch for the alignment.

Shapes: B batch (sentence pairs), S source tokens, T target tokens.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import torch

Pair = tuple[str, str]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
VAL_NAMES = ("val", "valid", "dev")
_RECORD_FORMAT = "dualroute-pair-tokenizer"
_RECORD_VERSION = 1


@dataclass(frozen=True)
class ParallelSplits:
    train: list[Pair]
    val: list[Pair]
    test: list[Pair] | None
    src_lang: str
    tgt_lang: str
    description: str
    # Every acceptable target of a source that has several (G2P: each pronunciation of a word); a source
    # missing here has its pair's target as its only reference.
    references: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def references_for(self, pair: Pair) -> tuple[str, ...]:
        return self.references.get(pair[0], (pair[1],))


# ---------------------------------------------------------------- reading files


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, gzipped or not, each stripped; errors name the path and line."""
    if not path.exists():
        raise FileNotFoundError(f"no such parallel text file: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path} looks gzipped but cannot be decompressed: {e}") from e
    if not raw.strip():
        raise ValueError(f"{path} is empty (no text lines)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise ValueError(f"{path}, line {line}: not valid UTF-8 (bad byte 0x{raw[e.start]:02x} at byte "
                         f"{column} of the line)") from None
    chunks = text.removeprefix("\ufeff").split("\n")
    if chunks[-1] == "":
        chunks.pop()  # the newline ending the last line
    return [chunk.strip() for chunk in chunks]


def _zip_files(src_path: Path, tgt_path: Path) -> tuple[list[Pair], int]:
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        n = min(len(src), len(tgt))
        raise ValueError(f"misaligned parallel files: {src_path} has {len(src)} lines but {tgt_path} has "
                         f"{len(tgt)}; line {n + 1} exists only in "
                         f"{src_path if len(src) > n else tgt_path}")
    return _drop_empty(zip(src, tgt))


def _read_tsv(path: Path) -> tuple[list[Pair], int]:
    pairs = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line:
            pairs.append(("", ""))  # a blank line: an empty pair, skipped and counted below
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            hint = "; for two line-aligned files give data.path='SRC,TGT'" if len(parts) == 1 else ""
            raise ValueError(f"{path}, line {number}: expected source<TAB>target (exactly one tab), found "
                             f"{len(parts) - 1} tabs in {line[:60]!r}{hint}")
        pairs.append((parts[0].strip(), parts[1].strip()))
    return _drop_empty(pairs)


def _drop_empty(pairs: Iterable[Pair]) -> tuple[list[Pair], int]:
    """The pairs with both sides non-empty, and how many were dropped."""
    pairs = list(pairs)
    kept = [p for p in pairs if p[0] and p[1]]
    return kept, len(pairs) - len(kept)


def _find(folder: Path, stem: str, lang: str) -> Path | None:
    for name in (f"{stem}.{lang}", f"{stem}.{lang}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _folder_pair(folder: Path, stem: str, src_lang: str, tgt_lang: str) -> tuple[Path, Path] | None:
    src, tgt = _find(folder, stem, src_lang), _find(folder, stem, tgt_lang)
    if src is None and tgt is None:
        return None
    if src is None or tgt is None:
        have, lang = (src or tgt), (src_lang if src is None else tgt_lang)
        raise FileNotFoundError(f"{have} has no {lang} side: expected {folder / f'{stem}.{lang}'}[.gz]")
    return src, tgt


def _test_stems(folder: Path, src_lang: str) -> list[str]:
    stems = set()
    for p in folder.iterdir():
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        if name.startswith("test") and name.endswith(f".{src_lang}"):
            stems.add(name[: -len(src_lang) - 1])
    return sorted(stems)


def split_off(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(rest, held out): the ``fraction`` of pairs with the smallest hash of (seed, pair, index), order kept.

    sha256, not ``hash()``, so the split is the same on every machine and Python version.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    if len(pairs) < 2:
        raise ValueError(f"cannot split a validation set off {len(pairs)} pair(s); need at least 2")
    n_held = min(len(pairs) - 1, max(1, round(len(pairs) * fraction)))

    def key(i: int) -> bytes:
        return hashlib.sha256(f"{seed}\t{i}\t{pairs[i][0]}\t{pairs[i][1]}".encode("utf-8")).digest()

    held = set(sorted(range(len(pairs)), key=key)[:n_held])
    return ([p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held])


def load_parallel(path: str | Path, src_lang: str = "en", tgt_lang: str = "de", val_fraction: float = 0.05,
                  seed: int = 0) -> ParallelSplits:
    """Train / val / test sentence pairs from a Multi30k-style folder, ``"A,B"`` files or a TSV file."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"data.path must name a folder, two files 'SRC,TGT' or a .tsv file, got {path!r}")
    if src_lang == tgt_lang:
        raise ValueError(f"src_lang and tgt_lang must differ, got {src_lang!r} twice")
    p = Path(path).expanduser()
    test: list[Pair] | None = None
    test_name = ""
    skipped = 0
    if p.is_dir():
        train_files = _folder_pair(p, "train", src_lang, tgt_lang)
        if train_files is None:
            raise FileNotFoundError(f"{p} holds no training pair: expected train.{src_lang} and "
                                    f"train.{tgt_lang} (optionally .gz) there")
        train, skipped = _zip_files(*train_files)
        val_files = next((f for f in (_folder_pair(p, s, src_lang, tgt_lang) for s in VAL_NAMES) if f), None)
        if val_files is not None:
            val, n = _zip_files(*val_files)
            skipped += n
        else:
            train, val = split_off(train, val_fraction, seed)
        for stem in _test_stems(p, src_lang):
            test_files = _find(p, stem, src_lang), _find(p, stem, tgt_lang)
            if None not in test_files:  # a test set in the source language only is not a test pair
                test, n = _zip_files(*test_files)
                skipped += n
                test_name = f" ({stem})"
                break
        source = str(p)
    elif "," in str(path) and not p.exists():
        parts = [part.strip() for part in str(path).split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"data.path {str(path)!r}: expected two files 'SRC,TGT' separated by one comma")
        train, skipped = _zip_files(Path(parts[0]).expanduser(), Path(parts[1]).expanduser())
        train, val = split_off(train, val_fraction, seed)
        source = f"{parts[0]} and {parts[1]}"
    elif p.is_file():
        train, skipped = _read_tsv(p)
        train, val = split_off(train, val_fraction, seed)
        source = str(p)
    else:
        raise FileNotFoundError(f"no such parallel data: {path} (give a folder with train.{src_lang}/"
                                f"train.{tgt_lang}, two files 'SRC,TGT', or one tab-separated file)")
    if not train or not val:
        raise ValueError(f"{path} has no non-empty sentence pairs for {'training' if not train else 'validation'}")
    counts = f"{len(train):,} train / {len(val):,} val" + (f" / {len(test):,} test{test_name}" if test else "")
    note = f"; skipped {skipped:,} pairs with an empty side" if skipped else ""
    return ParallelSplits(train, val, test, src_lang, tgt_lang,
                          f"{src_lang}-{tgt_lang} parallel text: {counts} pairs from {source}{note}")


# ---------------------------------------------------------------- tokenizers

def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("the translation tokenizer needs the optional `tokenizers` package: "
                          "pip install 'dualroute[translate]'") from e
    return tokenizers


class _BPESide:
    """Byte-level BPE (NFC-normalized) whose ids are shifted past the four specials: no unknowns, and text
    that spells ``<s>`` stays text. Decoding drops specials and the space BPE puts before the first word."""

    kind = "bpe"

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size() + len(SPECIALS)

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> _BPESide:
        tk = _import_tokenizers()
        alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(SPECIALS):
            raise ValueError(f"byte-level BPE needs bpe_vocab_size >= {len(alphabet) + len(SPECIALS)} "
                             f"(256 bytes and 4 specials), got {vocab_size}")
        backend = tk.Tokenizer(tk.models.BPE())
        backend.normalizer = tk.normalizers.NFC()
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), initial_alphabet=alphabet,
                                         special_tokens=[], show_progress=False)
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        return [i + len(SPECIALS) for i in self.backend.encode(text).ids]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[i + len(SPECIALS) for i in e.ids] for e in self.backend.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        ids = _check_ids(ids, self.vocab_size)
        return self.backend.decode([i - len(SPECIALS) for i in ids if i >= len(SPECIALS)]).strip()

    def record(self) -> dict[str, Any]:
        return {"kind": "bpe", "backend": self.backend.to_str()}


class _SymbolSide:
    """One id per symbol: each character (``split="chars"``) or each whitespace-separated word
    (``split="spaces"``, e.g. ARPAbet phonemes). Unseen symbols encode to ``UNK_ID``."""

    kind = "char"

    def __init__(self, symbols: Sequence[str], split: Literal["chars", "spaces"]) -> None:
        if split not in ("chars", "spaces"):
            raise ValueError(f"symbol split must be 'chars' or 'spaces', got {split!r}")
        if len(set(symbols)) != len(symbols) or any(not isinstance(s, str) or not s for s in symbols):
            raise ValueError("a symbol vocabulary must hold distinct non-empty strings")
        self.symbols, self.split = tuple(symbols), split
        self._index = {s: i + len(SPECIALS) for i, s in enumerate(self.symbols)}
        self.vocab_size = len(self.symbols) + len(SPECIALS)

    def pieces(self, text: str) -> list[str]:
        return list(text) if self.split == "chars" else text.split()

    def encode(self, text: str) -> list[int]:
        return [self._index.get(s, UNK_ID) for s in self.pieces(text)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = _check_ids(ids, self.vocab_size)
        out = [self.symbols[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS)]
        return ("" if self.split == "chars" else " ").join(out)

    def record(self) -> dict[str, Any]:
        return {"kind": "char", "symbols": list(self.symbols), "split": self.split}


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return out


class PairTokenizer:
    """Source and target tokenizers of a translation run: ids 0-3 are <pad>, <s>, </s>, <unk> on both sides.

    ``kind="bpe"``: byte-level BPE trained with the ``tokenizers`` library (one shared vocabulary, or one per
    side); ``kind="char"``: each source character and each whitespace-separated target symbol is a token
    (G2P: letters in, phonemes out). Encoding adds no <s> / </s>; decoding drops every special.
    """

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, src: _BPESide | _SymbolSide, tgt: _BPESide | _SymbolSide, shared: bool) -> None:
        if src.kind != tgt.kind:
            raise ValueError(f"both sides must be of one kind, got {src.kind!r} and {tgt.kind!r}")
        if shared and src.vocab_size != tgt.vocab_size:
            raise ValueError(f"a shared vocabulary needs equal sizes, got {src.vocab_size} and {tgt.vocab_size}")
        self.kind, self.shared = src.kind, shared
        self._src, self._tgt = src, tgt
        self.src_vocab_size: int = src.vocab_size
        self.tgt_vocab_size: int = tgt.vocab_size

    def encode_src(self, text: str) -> list[int]:
        return self._src.encode(text)

    def encode_tgt(self, text: str) -> list[int]:
        return self._tgt.encode(text)

    def encode_src_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._src.encode_batch(texts)

    def encode_tgt_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tgt.encode_batch(texts)

    def decode_src(self, ids: Iterable[int]) -> str:
        return self._src.decode(ids)

    def decode_tgt(self, ids: Iterable[int]) -> str:
        """Detokenized text; stops at nothing (cut at </s> before calling), drops the specials."""
        return self._tgt.decode(ids)

    def to_record(self) -> dict[str, Any]:
        record = {"format": _RECORD_FORMAT, "version": _RECORD_VERSION, "kind": self.kind,
                  "shared": self.shared, "src": self._src.record()}
        if not (self.shared and self.kind == "bpe"):  # a shared BPE is one backend, saved once
            record["tgt"] = self._tgt.record()
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PairTokenizer:
        if not isinstance(record, Mapping) or record.get("format") != _RECORD_FORMAT:
            raise ValueError("not a dualroute pair-tokenizer record (missing format marker "
                             f"{_RECORD_FORMAT!r})")
        if record.get("version") != _RECORD_VERSION:
            raise ValueError(f"pair-tokenizer record version {record.get('version')!r} is not supported "
                             f"(expected {_RECORD_VERSION})")
        shared = bool(record.get("shared"))
        src = _side_from_record(record.get("src"), "src")
        tgt = src if "tgt" not in record and shared else _side_from_record(record.get("tgt"), "tgt")
        return cls(src, tgt, shared)

    def __repr__(self) -> str:
        return (f"PairTokenizer(kind={self.kind!r}, shared={self.shared}, src_vocab_size={self.src_vocab_size}, "
                f"tgt_vocab_size={self.tgt_vocab_size})")


def _side_from_record(side: Any, name: str) -> _BPESide | _SymbolSide:
    if not isinstance(side, Mapping) or side.get("kind") not in ("bpe", "char"):
        raise ValueError(f"pair-tokenizer record: {name} side is missing or has an unknown kind")
    if side["kind"] == "bpe":
        return _BPESide(_import_tokenizers().Tokenizer.from_str(side["backend"]))
    return _SymbolSide(side["symbols"], side["split"])


def train_pair_tokenizer(splits: ParallelSplits, vocab_size: int, shared: bool = True,
                         kind: Literal["bpe", "char"] = "bpe") -> PairTokenizer:
    """A tokenizer pair trained on the train split only. ``vocab_size`` bounds each BPE vocabulary (specials
    included; a small corpus may give fewer); the char kind takes every symbol seen and ignores it."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if not splits.train:
        raise ValueError("cannot train a tokenizer on an empty train split")
    src_texts = [s for s, _ in splits.train]
    tgt_texts = [t for _, t in splits.train]
    if kind == "bpe":
        if shared:
            side = _BPESide.train(src_texts + tgt_texts, vocab_size)
            return PairTokenizer(side, side, shared=True)
        return PairTokenizer(_BPESide.train(src_texts, vocab_size), _BPESide.train(tgt_texts, vocab_size), False)
    if kind == "char":
        src_symbols = sorted({c for s in src_texts for c in s})
        tgt_symbols = sorted({w for t in tgt_texts for w in t.split()})
        if shared:
            union = sorted(set(src_symbols) | set(tgt_symbols))
            return PairTokenizer(_SymbolSide(union, "chars"), _SymbolSide(union, "spaces"), True)
        return PairTokenizer(_SymbolSide(src_symbols, "chars"), _SymbolSide(tgt_symbols, "spaces"), False)
    raise ValueError(f"tokenizer kind must be 'bpe' or 'char', got {kind!r}")


# ---------------------------------------------------------------- batches


def collate_pairs(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], pad_id: int = PAD_ID,
                  bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src_BS, tgt_in_BT, tgt_out_BT), int64, right-padded with ``pad_id``: tgt_in = <s> + target,
    tgt_out = target + </s> (so T = longest target + 1). S is at least 1, all pad for an empty source."""
    if len(src_ids) != len(tgt_ids) or not src_ids:
        raise ValueError(f"collate needs equal, non-zero numbers of sources and targets, got {len(src_ids)} "
                         f"and {len(tgt_ids)}")
    S = max(1, max(len(s) for s in src_ids))
    T = max(len(t) for t in tgt_ids) + 1
    # One tensor from padded Python rows: a row-by-row copy into a tensor is several times slower.
    src_BS = torch.tensor([[*s, *[pad_id] * (S - len(s))] for s in src_ids], dtype=torch.int64)
    tgt_in_BT = torch.tensor([[bos_id, *t, *[pad_id] * (T - 1 - len(t))] for t in tgt_ids], dtype=torch.int64)
    tgt_out_BT = torch.tensor([[*t, eos_id, *[pad_id] * (T - 1 - len(t))] for t in tgt_ids], dtype=torch.int64)
    return src_BS, tgt_in_BT, tgt_out_BT


class BucketedPairs:
    """Token-id pairs in length-sorted batches of at most ``max_tokens`` padded tokens.

    A batch of rows ``r`` costs ``(longest source + longest target + 1) * r`` (the +1 is <s> / </s>) and is
    filled greedily along the pairs sorted by (source length, target length). Pairs longer than ``max_len``
    tokens on either side are skipped (``too_long="skip"``, the default, as fairseq does for training) or
    cut to ``max_len`` (``"truncate"``); ``n_skipped`` / ``n_truncated`` count them. Batches hold indices into
    the lists given, so a caller can find each pair's text again (references for BLEU, say).
    """

    def __init__(self, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], max_tokens: int,
                 max_len: int | None = None, too_long: Literal["skip", "truncate"] = "skip",
                 pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> None:
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        if too_long not in ("skip", "truncate"):
            raise ValueError(f"too_long must be 'skip' or 'truncate', got {too_long!r}")
        self.max_tokens, self.max_len = max_tokens, max_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.src_ids = [list(s) for s in src_ids]
        self.tgt_ids = [list(t) for t in tgt_ids]
        kept, self.n_skipped, self.n_truncated = [], 0, 0
        for i, (s, t) in enumerate(zip(self.src_ids, self.tgt_ids)):
            if max_len is not None and (len(s) > max_len or len(t) > max_len):
                if too_long == "skip":
                    self.n_skipped += 1
                    continue
                self.src_ids[i], self.tgt_ids[i] = s[:max_len], t[:max_len]
                self.n_truncated += 1
            kept.append(i)
        if not kept:
            raise ValueError(f"no pair fits max_len={max_len} ({self.n_skipped} skipped)")
        self._src_len = [max(1, len(s)) for s in self.src_ids]
        self._tgt_len = [len(t) + 1 for t in self.tgt_ids]
        worst = max(kept, key=lambda i: self._src_len[i] + self._tgt_len[i])
        if self._src_len[worst] + self._tgt_len[worst] > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} is too small for pair {worst} ({len(self.src_ids[worst])} "
                             f"source + {len(self.tgt_ids[worst])} target tokens + 1); raise max_tokens or "
                             f"lower max_len")
        self.indices: list[int] = kept
        self._sorted = sorted(kept, key=lambda i: (self._src_len[i], self._tgt_len[i]))
        self._queue: list[list[int]] = []

    @classmethod
    def from_pairs(cls, tokenizer: PairTokenizer, pairs: Sequence[Pair], max_tokens: int,
                   **kwargs: Any) -> BucketedPairs:
        """Encode ``pairs`` with ``tokenizer`` and bucket them (kwargs: max_len, too_long)."""
        src = tokenizer.encode_src_batch([s for s, _ in pairs])
        tgt = tokenizer.encode_tgt_batch([t for _, t in pairs])
        return cls(src, tgt, max_tokens, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                   eos_id=tokenizer.eos_id, **kwargs)

    def __len__(self) -> int:
        return len(self.indices)

    def cost(self, batch: Sequence[int]) -> int:
        """Padded tokens of a batch: (longest source + longest target + 1) * rows."""
        return (max(self._src_len[i] for i in batch) + max(self._tgt_len[i] for i in batch)) * len(batch)

    def padding_fraction(self, batches: Sequence[Sequence[int]]) -> float:
        """Share of the padded tokens of ``batches`` that are padding (source and target sides together)."""
        real = sum(self._src_len[i] + self._tgt_len[i] for b in batches for i in b)
        return 1.0 - real / sum(self.cost(b) for b in batches)

    def _pack(self, order: Sequence[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        max_s = max_t = 0
        for i in order:
            s, t = max(max_s, self._src_len[i]), max(max_t, self._tgt_len[i])
            if current and (s + t) * (len(current) + 1) > self.max_tokens:
                batches.append(current)
                current, s, t = [], self._src_len[i], self._tgt_len[i]
            current.append(i)
            max_s, max_t = s, t
        batches.append(current)
        return batches

    def batches(self, generator: torch.Generator | None = None) -> list[list[int]]:
        """One epoch: every kept pair exactly once; ties in length and the batch order shuffled by ``generator``."""
        if generator is None:
            return self.eval_batches()
        shuffled = [self.indices[j] for j in torch.randperm(len(self.indices), generator=generator).tolist()]
        order = sorted(shuffled, key=lambda i: (self._src_len[i], self._tgt_len[i]))  # stable: ties stay shuffled
        packed = self._pack(order)
        return [packed[j] for j in torch.randperm(len(packed), generator=generator).tolist()]

    def sample_batch(self, generator: torch.Generator) -> list[int]:
        """The next batch of the current epoch, starting a new shuffled epoch when one runs out.

        The position in the epoch is state of this object, not of ``generator``: a resumed run starts a
        fresh epoch."""
        if not self._queue:
            self._queue = self.batches(generator)[::-1]
        return self._queue.pop()

    def eval_batches(self) -> list[list[int]]:
        """Deterministic batches in length order (no shuffling)."""
        return self._pack(self._sorted)

    def collate(self, batch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(src_BS, tgt_in_BT, tgt_out_BT) of the pairs at indices ``batch``; see ``collate_pairs``."""
        return collate_pairs([self.src_ids[i] for i in batch], [self.tgt_ids[i] for i in batch],
                             self.pad_id, self.bos_id, self.eos_id)

    def iter_eval(self) -> Iterator[tuple[list[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """(indices, collated tensors) for each deterministic batch."""
        for batch in self.eval_batches():
            yield batch, self.collate(batch)

