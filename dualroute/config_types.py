"""The Python types of the core configs' number and flag fields, checked on construction.

``bool`` is a subclass of ``int``: ``isinstance(True, int)`` holds, so ``MoEConfig(hidden=True)`` passed a
"positive int" check and built experts of width 1. Each config dataclass of the core (``MoEConfig``,
``RouterOptions``, ``RouterConfig``, ``BalanceConfig``, ``ExpertConfig``) calls ``check_field_types`` first
thing in ``__post_init__``; the ranges (``> 0``, finite, ...) stay with each config's own checks.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

_WANT = {bool: "a bool", int: "an int (not a bool)", float: "a number (int or float, not a bool)"}


def check_field_types(cfg: object) -> None:
    """TypeError naming the field and the value unless every ``bool`` field holds a bool, every ``int`` field an
    int that is not a bool, and every ``float`` field an int or float that is not a bool (or ``None`` where the
    annotation is ``X | None``)."""
    for name, kind, optional in _typed_fields(type(cfg)):
        value = getattr(cfg, name)
        if (value is None and optional) or _is_a(value, kind):
            continue
        want = _WANT[kind] + (" or None" if optional else "")
        raise TypeError(f"{type(cfg).__name__}.{name} must be {want}, got {value!r} ({type(value).__name__})")


def _is_a(value: object, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


@functools.cache
def _typed_fields(cls: type) -> tuple[tuple[str, type, bool], ...]:
    """``(name, bool | int | float, None allowed)`` for each field of ``cls`` annotated with one of the three."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        arms = typing.get_args(hint) if union else (hint,)
        kinds = [arm for arm in arms if arm is not types.NoneType]
        if len(kinds) == 1 and kinds[0] in _WANT:
            found.append((f.name, kinds[0], len(kinds) < len(arms)))
    return tuple(found)
