"""Configuration from typed dataclasses: command-line overrides, TOML files, dict round-trip.

A config is a tree of (possibly frozen) dataclasses. Values are checked against each field's declared
annotation, resolved with ``typing.get_type_hints`` so ``from __future__ import annotations`` is fine.
Supported leaf types: ``int``, ``float``, ``bool``, ``str``, ``pathlib.Path``, ``Literal[...]``,
``tuple[X, ...]`` / ``tuple[X, Y]``, ``list[X]`` and unions such as ``X | None``.

Changes are grouped per dataclass and applied with one ``dataclasses.replace`` each, so
``__post_init__`` validates the final combination, never a half-updated one.
Only ``init=True`` fields can be set; ``init=False`` fields are derived and recomputed by ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import pathlib
import tomllib
import types
import typing
from typing import Any, Literal, TypeVar

C = TypeVar("C")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


# ---------------------------------------------------------------------------------------------- fields


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotation of every settable (init) field of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _require_dataclass(cfg: Any) -> None:
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance as config, got {type(cfg).__name__}: {cfg!r}")


def _lookup(cls: type, name: str, where: str) -> Any:
    """Annotation of field ``name`` of ``cls``; ValueError with close matches and valid keys if unknown."""
    types_ = _field_types(cls)
    if name in types_:
        return types_[name]
    full = f"{where}.{name}" if where else name
    close = difflib.get_close_matches(name, list(types_), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    level = f"'{where}' ({cls.__name__})" if where else f"top level ({cls.__name__})"
    raise ValueError(f"unknown config key {full!r}{hint} valid keys at {level}: {', '.join(sorted(types_))}")


def _type_name(tp: Any) -> str:
    if tp is types.NoneType:
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    return typing.get_args(tp) if origin in (typing.Union, types.UnionType) else None


# ------------------------------------------------------------------------------------ parsing strings


def _parse_text(text: str, tp: Any, key: str) -> Any:
    """Parse command-line text ``text`` as annotation ``tp``; ValueError naming key, value and type."""
    try:
        return _parse(text, tp)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config key {key!r}: cannot parse {text!r} as {_type_name(tp)} ({e})") from None


def _parse(text: str, tp: Any) -> Any:
    if (arms := _union_args(tp)) is not None:
        return _parse_union(text, arms)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        for allowed in args:
            if isinstance(allowed, bool) and text.strip().lower() in (_TRUE if allowed else _FALSE):
                return allowed
            if not isinstance(allowed, bool) and text == str(allowed):
                return allowed
        raise ValueError(f"must be one of {list(args)}")
    if origin in (tuple, list):
        items = [s.strip() for s in text.split(",")] if text.strip() else []
        return _check_sequence(items, tp, lambda s, t: _parse(s, t))
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError("expected true/false/1/0/yes/no")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if tp is pathlib.Path:
        return pathlib.Path(text)
    if _is_dataclass_type(tp):
        raise TypeError("is a config section: set one of its fields with a dotted key")
    raise TypeError(f"unsupported annotation {_type_name(tp)}")


def _parse_union(text: str, arms: tuple[Any, ...]) -> Any:
    if types.NoneType in arms and text.strip().lower() in _NONE:
        return None
    value, errors = _first_arm(text, arms, _parse)
    if errors is None:
        return value
    raise ValueError("; ".join(errors))


def _first_arm(value: Any, arms: tuple[Any, ...], convert: Any) -> tuple[Any, list[str] | None]:
    """``convert(value, arm)`` for the first non-None arm that accepts it; else the arms' errors."""
    errors = []
    for arm in arms:
        if arm is types.NoneType:
            continue
        try:
            return convert(value, arm), None
        except (ValueError, TypeError) as e:
            errors.append(f"{_type_name(arm)}: {e}")
    return None, errors


# ------------------------------------------------------------------------------ checking typed values


def _check_value(value: Any, tp: Any, key: str, source: str = "") -> Any:
    """Check an already-typed value (TOML, JSON) against ``tp``; return it converted (list -> tuple...)."""
    try:
        return _check(value, tp)
    except (ValueError, TypeError) as e:
        where = f"{source}: " if source else ""
        raise TypeError(
            f"{where}config key {key!r}: value {value!r} ({type(value).__name__}) "
            f"is not a valid {_type_name(tp)} ({e})"
        ) from None


def _check(value: Any, tp: Any) -> Any:
    if (arms := _union_args(tp)) is not None:
        return _check_union(value, arms)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # type() equality so True does not pass for Literal[1]
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ValueError(f"must be one of {list(args)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        return _check_sequence(list(value), tp, _check)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is pathlib.Path and isinstance(value, (str, pathlib.PurePath)):
        return pathlib.Path(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:  # exact: a bool is not accepted as an int
            raise TypeError(f"expected {tp.__name__}")
        return value
    raise TypeError(f"unsupported annotation {_type_name(tp)}")


def _check_union(value: Any, arms: tuple[Any, ...]) -> Any:
    if value is None and types.NoneType in arms:
        return None
    checked, errors = _first_arm(value, arms, _check)
    if errors is None:
        return checked
    # TOML has no null: accept the strings "none"/"null" for an optional field
    if types.NoneType in arms and isinstance(value, str) and value.lower() in _NONE:
        return None
    raise ValueError("; ".join(errors))


def _check_sequence(items: list[Any], tp: Any, convert: Any) -> tuple[Any, ...] | list[Any]:
    """Convert each item of a tuple/list annotation ``tp`` with ``convert(item, item_type)``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        item_types = [args[0] if args else Any] * len(items)
    else:
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} items, got {len(items)}")
        item_types = list(args)
    out = [item if t is Any else convert(item, t) for item, t in zip(items, item_types)]
    return out if origin is list else tuple(out)


# --------------------------------------------------------------------------------- nested replacement


class _Section(dict):
    """Changes for a nested dataclass (distinguishes them from a plain dict value)."""


def _replace_nested(cfg: Any, changes: dict[str, Any]) -> Any:
    """``changes`` maps field names to new values, or to dicts of changes for a nested dataclass."""
    updates = {}
    for name, change in changes.items():
        if isinstance(change, _Section):
            updates[name] = _replace_nested(getattr(cfg, name), change)
        else:
            updates[name] = change
    return dataclasses.replace(cfg, **updates)


def _section_for(cfg: Any, path: list[str], changes: _Section) -> tuple[Any, _Section, str]:
    """Walk ``path`` (all but the last key) down from ``cfg``; return the leaf config, its changes, prefix."""
    where = ""
    for name in path:
        _lookup(type(cfg), name, where)
        where = f"{where}.{name}" if where else name
        cfg = getattr(cfg, name)
        if not dataclasses.is_dataclass(cfg):
            raise ValueError(f"config key {where!r} is a value ({cfg!r}), not a section with sub-keys")
        changes = changes.setdefault(name, _Section())
    return cfg, changes, where


def apply_overrides(cfg: C, overrides: list[str]) -> C:
    """Return ``cfg`` with ``key=value`` / ``--key=value`` overrides applied (dotted keys for nesting).

    Later overrides of the same key win. The values are parsed by the field annotations.
    """
    _require_dataclass(cfg)
    changes = _Section()
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key=value")
        path = key.strip().split(".")
        section, section_changes, where = _section_for(cfg, path[:-1], changes)
        tp = _lookup(type(section), path[-1], where)
        section_changes[path[-1]] = _parse_text(value, tp, key.strip())
    return _replace_nested(cfg, changes)


# ----------------------------------------------------------------------------------------------- TOML


def _mapping_changes(cfg: Any, mapping: dict[str, Any], where: str, source: str) -> _Section:
    changes = _Section()
    for name, value in mapping.items():
        try:
            tp = _lookup(type(cfg), name, where)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        key = f"{where}.{name}" if where else name
        child = getattr(cfg, name)
        if dataclasses.is_dataclass(child):
            if not isinstance(value, dict):
                raise TypeError(f"{source}: config key {key!r} is a section: expected a table, got {value!r}")
            changes[name] = _mapping_changes(child, value, key, source)
        else:
            changes[name] = _from_value(tp, value, key, source)
    return changes


def read_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """The tables of a TOML config file, unchecked (``apply_config_mapping`` checks them against a config)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix.lower() != ".toml":
        raise ValueError(f"config file {path}: only .toml is supported, got suffix {path.suffix!r}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: invalid TOML: {e}") from None


def apply_config_mapping(cfg: C, data: dict[str, Any], source: str = "config") -> C:
    """Return ``cfg`` updated with a nested mapping (tables -> nested dataclasses); errors name ``source``."""
    _require_dataclass(cfg)
    return _replace_nested(cfg, _mapping_changes(cfg, data, "", source))


def load_config_file(path: str | pathlib.Path, cfg: C) -> C:
    """Return ``cfg`` updated with the values of a TOML file; nested tables map to nested dataclasses."""
    _require_dataclass(cfg)
    return apply_config_mapping(cfg, read_config_file(path), str(path))


# ------------------------------------------------------------------------------------- dict round-trip


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config's init fields: nested dataclasses -> dicts, tuples -> lists, Path -> str."""
    _require_dataclass(cfg)
    return {name: _to_plain(getattr(cfg, name)) for name in _field_types(type(cfg))}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    if isinstance(value, pathlib.PurePath):
        return str(value)
    return value


def config_from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """Build ``cls`` from ``config_to_dict`` output; missing keys take the field defaults."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    if not isinstance(d, dict):
        raise TypeError(f"expected a dict for {cls.__name__}, got {type(d).__name__}: {d!r}")
    return _from_dict(cls, d, "")


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    kwargs = {}
    for name, value in d.items():
        tp = _lookup(cls, name, where)
        key = f"{where}.{name}" if where else name
        kwargs[name] = _from_value(tp, value, key)
    return cls(**kwargs)


def _from_value(tp: Any, value: Any, key: str, source: str = "") -> Any:
    arms = _union_args(tp) or (tp,)
    sections = [a for a in arms if _is_dataclass_type(a)]
    if sections and isinstance(value, dict):
        return _from_dict(sections[0], value, key)
    if sections and value is None and types.NoneType in arms:
        return None
    if sections:
        where = f"{source}: " if source else ""
        raise TypeError(f"{where}config key {key!r}: expected a table/dict for {_type_name(tp)}, got {value!r}")
    return _check_value(value, tp, key, source)
