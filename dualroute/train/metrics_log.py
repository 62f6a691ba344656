"""Metrics as JSON lines: one object per line, appended and flushed as it is logged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


def _to_json(value: Any) -> Any:
    """``json.dumps`` fallback: scalars of numpy / torch via ``.item()``, arrays via ``.tolist()``."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: {value!r}")


class JsonlLogger:
    """Append one JSON object per ``log`` call to ``path`` (parent directories are created).

    Non-finite floats are written as ``NaN`` / ``Infinity`` (Python's json reads them back).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if self._file.tell() > 0 and not self._ends_with_newline():
            self._file.write("\n")  # a crash left a partial line: keep it apart from the new records

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def log(self, record: dict[str, Any]) -> None:
        if not isinstance(record, dict):
            raise TypeError(f"a log record must be a dict, got {type(record).__name__}: {record!r}")
        try:
            line = json.dumps(record, default=_to_json)
        except (TypeError, ValueError) as e:
            raise TypeError(f"log record {record!r} is not JSON-serialisable: {e}") from None
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSON-lines file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSON-lines file at {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: corrupt JSON line ({e.msg}): {line[:80]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield record


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All objects of a JSON-lines file; ValueError with the line number of a corrupt line."""
    return list(iter_jsonl(path))
