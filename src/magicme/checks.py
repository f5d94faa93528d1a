"""Checks of user-given values shared by every stage: finite numbers, seeds, safe names.

Each raises ValueError with the argument's name and the value it got; the CLI turns that into one line.
(Config tables are checked against their dataclass's types by `records.build_config`/`check_value`.)
"""

from __future__ import annotations

import math
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
