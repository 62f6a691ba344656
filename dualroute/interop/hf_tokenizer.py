"""dualroute's tokenizers as Hugging Face ``tokenizer.json`` files (the ``tokenizers`` library's format).

Each gives the ids and text of the dualroute tokenizer it comes from:

* byte: a byte-level BPE with no merges whose 256 tokens are the bytes, id = byte value (GPT-2's
  byte-to-character table, as ``tokenizers``' ByteLevel pre-tokenizer and decoder use it);
* char: one token per character and the unknown token at id ``len(chars)``, no pre-tokenizer, a decoder
  that joins tokens without spaces. The unknown token is itself one character that is not in the
  vocabulary (U+FFFD, as dualroute decodes it, else one from the private-use area shown as U+FFFD), so
  text that contains it still encodes as dualroute encodes it: as the unknown id;
* bpe: dualroute's BPE already is a ``tokenizers`` tokenizer; its own JSON is written.

Needs the ``tokenizers`` package (a dependency of transformers) for byte and char.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes map to themselves, the others to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_json(record: dict[str, Any]) -> str:
    """The ``tokenizer.json`` text of a dualroute tokenizer record (what ``Tokenizer.save`` writes)."""
    kind = record.get("kind")
    if kind == "bpe":
        return record["tokenizer"]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if kind == "byte":
        vocab = {char: b for b, char in bytes_to_unicode().items()}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "char":
        chars = record["chars"]
        unk = unknown_char(chars)
        vocab = {**{c: i for i, c in enumerate(chars)}, unk: len(chars)}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
        tokenizer.decoder = decoders.Sequence([decoders.Replace(unk, "\ufffd"), decoders.Fuse()])
    else:
        raise ValueError(f"unknown dualroute tokenizer kind {kind!r}; expected 'byte', 'char' or 'bpe'")
    return tokenizer.to_str()


def unknown_char(chars: str) -> str:
    """The character that stands for the char tokenizer's unknown id: one that ``chars`` lacks."""
    return next(c for c in ("\ufffd", *map(chr, range(0xE000, 0xF900))) if c not in chars)


def write_hf_tokenizer(record: dict[str, Any], folder: Path, model_max_length: int) -> list[str]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (for ``AutoTokenizer``); returns the file names."""
    (folder / TOKENIZER_FILE).write_text(tokenizer_json(record), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    if record.get("kind") == "char":
        config["unk_token"] = unknown_char(record["chars"])
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
