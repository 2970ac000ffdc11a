"""Argument checks shared by every module: one rule per kind of value, one wording.

Pure (no I/O, no clock). Each check raises ``TypeError`` for a value of the wrong kind and
``ValueError`` for one out of range, naming the argument; the caller's own wording of the
fix, where it has one, is passed in or added around these.

``bool`` is an ``int`` subclass, but ``True`` seconds or ``True`` executions at once is
always a mistake: every numeric check refuses bools.
"""

from __future__ import annotations

import math
from typing import TypeGuard

__all__ = [
    "check_count",
    "check_instance",
    "check_seconds",
    "is_int",
    "is_number",
]


def is_number(value: object) -> TypeGuard[int | float]:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """An ``int`` of at least ``minimum`` (sizes, limits, concurrency)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_seconds(name: str, value: object, *, none_means: str | None = None) -> float | None:
    """Positive, finite seconds as a float.

    With ``none_means`` (e.g. ``"no deadline"``), ``None`` is allowed and returned as is;
    the messages then say so.
    """
    or_none = "" if none_means is None else f" (or None for {none_means})"
    if value is None and none_means is not None:
        return None
    if not is_number(value):
        raise TypeError(f"{name} must be seconds{or_none}, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond the float range is no finite number of seconds
        seconds = math.inf
    if not 0 < seconds < math.inf:  # NaN fails too
        raise ValueError(f"{name} must be positive finite seconds{or_none}, got {value}")
    return seconds


def check_instance(name: str, value: object, cls: type | tuple[type, ...], what: str) -> None:
    """``value`` is ``None`` or an instance of ``cls``; ``what`` names it for the message."""
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, not {type(value).__name__}")
