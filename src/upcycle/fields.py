"""Checking plain JSON values against a dataclass's field annotations (strict: no coercion of strings).

What `config.json["upcycle"]` holds comes from a file a user may have edited: every value is checked
against its field's type before a config is built, so a bad value gets a message naming the file and
the key, never a TypeError from deep inside a constructor.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp)) if origin is None else str(tp).replace("typing.", "")


def matches(tp: Any, v: Any) -> bool:
    """Is the JSON value `v` of type `tp` (int, float, str, bool, None, Literal, unions, list[X], dict[K, V])?"""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(a, v) for a in args)
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in args)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    if origin is list:
        return isinstance(v, list) and all(matches(args[0], x) for x in v) if args else isinstance(v, list)
    if origin is dict:
        if not isinstance(v, dict):
            return False
        if not args:
            return True
        key_tp, val_tp = args
        keys_ok = all(matches(key_tp, k) or (key_tp is int and isinstance(k, str) and k.lstrip("-").isdigit())
                      for k in v)
        return keys_ok and all(matches(val_tp, x) for x in v.values())
    return isinstance(v, tp) if isinstance(tp, type) else True


def checked(cls: type, values: dict, where: str) -> dict:
    """The known fields of `values`, each checked against `cls`'s annotation; ValueError naming `where` and the key."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected an object of {cls.__name__} fields, got {type(values).__name__}.")
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in values.items():
        if k not in hints or k.startswith("_"):
            continue  # keys of another version or tool: ignored, as transformers ignores unknown config keys
        if not matches(hints[k], v):
            raise ValueError(f"{where}: {k}={v!r} is not {_describe(hints[k])}.")
        out[k] = v
    return out
