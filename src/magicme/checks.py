"""Checks of user-given values shared by every stage: finite numbers, seeds, safe names, typed config tables.

Each raises ValueError with the argument's name and the value it got; the CLI turns that into one line.
`check_types` validates a config table (a run config's stage, a subjects file) against the dataclass
that will hold it, by its type hints, so a wrong type fails before any work, naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

MAX_SEED = 2**32 - 1  # seeds are combined with step and tile numbers into 64-bit generator seeds


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite number (not a bool) in [low, high]; NaN and ±inf are refused everywhere."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}], got {value!r}")
    return value


def check_seed(value: Any, name: str = "--seed") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return value


def safe_name(value: Any, what: str) -> str:
    """A name used as one path component (a folder or file name): no separators, not hidden, not '.'/'..'."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty name, got {value!r}")
    bad = (
        value != value.strip() or value.startswith(".") or len(value) > 100
        or any(c in value for c in '/\\:*?"<>|') or any(ord(c) < 32 for c in value)
    )
    if bad:
        raise ValueError(
            f"{what} {value!r} cannot be a file name: use up to 100 letters, digits, spaces, '-', '_' "
            "(no path separators, no leading dot)"
        )
    return value


# ---- typed config tables ----


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        if not args:
            return "a list"
        count = f"{len(args)} " if origin is tuple and args[-1] is not Ellipsis else ""
        return f"a list of {count}{_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or hint is dict:
        return "a table"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Path: "a path"}.get(hint, str(hint))


def check_value(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against type hint `hint`; returns it (a numeric string becomes a float where one is
    meant: PyYAML reads `1e-3` as a string). Tables for dataclass fields are checked field by field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return check_value(value, arm, where)
            except ValueError:
                continue
        raise ValueError(f"{where} must be {_describe(hint)}, got {value!r}")
    ok = True
    if hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                ok = False
        ok = ok and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif hint in (str, Path):
        ok = isinstance(value, (str, Path)) if hint is Path else isinstance(value, str)
    elif origin in (list, tuple):
        ok = isinstance(value, (list, tuple))
        if ok and origin is tuple and args and args[-1] is not Ellipsis:
            ok = len(value) == len(args)
            if ok:
                return tuple(check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        if ok and args:
            return type(value)(check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    elif origin is dict:
        ok = isinstance(value, dict)
        if ok and args:
            return {check_value(k, args[0], f"{where} key"): check_value(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        ok = isinstance(value, dict)
        if ok:
            return check_types(hint, value, where)
    if not ok:
        raise ValueError(f"{where} must be {_describe(hint)}, got {value!r}")
    return value


def check_types(cls: type, table: dict, where: str) -> dict:
    """Every key of `table` is a field of dataclass `cls` and its value fits the field's type; returns the
    checked table (nested tables stay plain dicts for the caller to build from)."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of settings, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - fields, key=str)
    if unknown:
        raise ValueError(f"{where} does not take {unknown}; it takes {sorted(fields)}")
    return {key: check_value(value, hints[key], f"{where} {key}") for key, value in table.items()}
