"""Argument checks shared by every package: one wording for every user error about a value.

`bool` is a subclass of `int` in Python, so `isinstance(True, int)` holds; a count given as
`True` is always a mistake, and these checks refuse it. Each raises `TypeError` for a value of
the wrong type and `ValueError` for one out of range, naming the argument, the value received
and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_int", "check_number", "did_you_mean", "is_int"]


def is_int(value: Any) -> bool:
    """True for an `int` that is not a `bool`."""
    return isinstance(value, int) and not isinstance(value, bool)


def did_you_mean(value: Any, allowed: Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` for the allowed name closest to `value`, or `""`."""
    match = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [low, high]."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be an int <= {high}, got {value!r}")
    return value


def check_number(name: str, value: Any, *, low: float | int | None = None, high: float | int | None = None,
                 low_open: bool = False, high_open: bool = False) -> float | int:
    """`value` if it is a finite real number (int or float, not a bool) in the range given;
    `low_open` / `high_open` exclude the bound itself."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """`value` if it is one of `allowed`; otherwise a ValueError listing them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}{did_you_mean(value, allowed)}"
        )
    return value
