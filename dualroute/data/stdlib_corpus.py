"""The Python standard library's own source as a text corpus, split into train and validation by file.

Every Python install has it: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (about 11 MB in
about 730 files on CPython 3.11), without the test suites, installed third-party packages, the
machine-specific build files (``config-*/``, ``_sysconfigdata_*.py``), the generated help text
(``pydoc_data/``, the default corpus) or any file that is not UTF-8.

A file is validation when a stable hash of its relative path falls below ``val_fraction``: the split
is the same on every machine with the same Python version, a larger fraction only adds files to
validation, and no validation file is ever trained on. Files are read when the corpus is loaded (a
tenth of a second), and nothing is cached.

``python -m dualroute.data.stdlib_corpus [VAL_FRACTION]`` prints the corpus's size and split.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Folder names never descended into: test suites (test/, tests/, idlelib/idle_test/, lib2to3/tests/ ...),
# installed packages, bytecode, and pydoc_data/ (one generated 0.75 MB string: the English help text that
# is the default corpus, which would overlap it and swamp whichever split it fell in).
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                       "pydoc_data"})
SEPARATOR = "\n\n"  # between files, as read_text joins a folder


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _skip_dir(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith((".", "config-"))


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus's ``.py`` files under ``root`` (default: this Python's stdlib), sorted."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"no standard library folder at {root}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _skip_dir(d)]
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return sorted(found)


def hash_share(relpath: str) -> float:
    """A stable number in [0, 1) for a relative path: the first 8 bytes of its SHA-256 over 2**64."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation(relpath: str, val_fraction: float) -> bool:
    return hash_share(relpath) < val_fraction


@dataclass(frozen=True)
class CorpusSplit:
    """Train and validation text of a corpus split by file; ``skipped`` were not UTF-8."""

    train: str
    val: str
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    skipped: tuple[str, ...]
    root: str

    def describe(self) -> str:
        train_b, val_b = len(self.train.encode("utf-8")), len(self.val.encode("utf-8"))
        total = train_b + val_b
        return (f"stdlib corpus (Python {sys.version.split()[0]}, {self.root}): "
                f"{len(self.train_files) + len(self.val_files)} files, {total:,} bytes; "
                f"train {len(self.train_files)} files {train_b:,} bytes, validation {len(self.val_files)} files "
                f"{val_b:,} bytes ({100 * val_b / max(total, 1):.1f}% of bytes)"
                + (f"; {len(self.skipped)} non-UTF-8 files skipped" if self.skipped else ""))


def _read(root: Path, files: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(texts, files read, files skipped as not UTF-8); empty files are dropped."""
    texts, kept, skipped = [], [], []
    for rel in files:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        if text:
            texts.append(text)
            kept.append(rel)
    return texts, kept, skipped


def load_stdlib_corpus(val_fraction: float, root: str | Path | None = None,
                       files: list[str] | None = None) -> CorpusSplit:
    """Read the corpus and split it by file. ``files`` restricts it to these relative paths (tests)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(root) if files is None else sorted(files)
    train_texts, train_files, skipped = _read(root, [f for f in files if not is_validation(f, val_fraction)])
    val_texts, val_files, skipped_val = _read(root, [f for f in files if is_validation(f, val_fraction)])
    if not train_files or not val_files:
        raise ValueError(f"the stdlib corpus under {root} split into {len(train_files)} train and {len(val_files)} "
                         f"validation files at val_fraction={val_fraction}; both need at least one")
    return CorpusSplit(SEPARATOR.join(train_texts), SEPARATOR.join(val_texts), tuple(train_files),
                       tuple(val_files), tuple(skipped + skipped_val), str(root))


if __name__ == "__main__":
    try:
        fraction = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
    except ValueError:
        sys.exit(f"usage: python -m dualroute.data.stdlib_corpus [VAL_FRACTION in (0, 1)], got {sys.argv[1]!r}")
    print(load_stdlib_corpus(fraction).describe())
