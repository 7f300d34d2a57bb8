"""The building blocks of the run config (`diffusion.config`): its error types, the one-line
value checks every section uses, and `Section`, the dataclass base that refuses unknown keys.

Like `diffusion.config`, this module sits at the bottom of `diffusion`'s imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, no_type_check

from spacetime.checks import check_choice, check_int, check_number, did_you_mean


class ConfigError(ValueError):
    """An invalid run configuration: the message names the key, the value and what is allowed."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value of the wrong type (a `ValueError` and a `TypeError`)."""


def _checked(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # spacetime.checks raises TypeError / ValueError; here both become ConfigError so one
    # `except ConfigError` catches every configuration mistake.
    try:
        return check(*args, **kwargs)
    except TypeError as err:
        raise ConfigTypeError(str(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _int(name: str, value: Any, low: Any = None, high: Any = None) -> int:
    return _checked(check_int, name, value, low=low, high=high)


def _optional_int(name: str, value: Any, low: Any = None) -> Any:
    return None if value is None else _int(name, value, low)


def _number(name: str, value: Any, low: Any = None, high: Any = None, *,
            low_open: bool = False, high_open: bool = False) -> Any:
    low = None if low is None else float(low)
    high = None if high is None else float(high)
    # check_number is annotated float -> float; ints are numbers here too (runtime checkers
    # in the tests hold it to its annotation), and the message shows the value as given.
    given = value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            given = float(value)
        except OverflowError:  # beyond any float: as out of range as infinity
            given = float("inf") if value > 0 else float("-inf")
    try:
        _checked(check_number, name, given, low=low, high=high, low_open=low_open, high_open=high_open)
    except ConfigError as err:
        raise type(err)(str(err).replace(repr(given), repr(value))) from None
    return value


def _choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    return _checked(check_choice, name, value, allowed)


def _bool(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bool):
        allowed = "a bool (true/false) or null" if optional else "a bool (true/false)"
        raise ConfigTypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


def _string(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigTypeError(f"{name} must be a non-empty string, got {value!r}")


def _strings(name: str, value: Any, *, optional: bool = False, empty: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) \
            or not all(isinstance(c, str) and (empty or c.strip()) for c in value):
        kind = "strings" if empty else "non-empty strings"
        raise ConfigTypeError(f"{name} must be a list of {kind}, got {value!r}")


def unknown_key_message(where: str, key: Any, allowed: Iterable[str]) -> str:
    allowed = sorted(allowed)
    return f"unknown {where} key {key!r}{did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"


def sampler_names() -> tuple[str, ...]:
    """The sampler names `GaussianDiffusion.sample` takes (from `diffusion.samplers`)."""
    from diffusion import samplers

    listed = getattr(samplers, "available", None)
    return tuple(listed()) if callable(listed) else tuple(samplers.SAMPLERS)


# ---------------------------------------------------------------------------------------
# sections


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class Section:
    """A dataclass section of the run config: `from_dict` refuses unknown keys."""

    key: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Section:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigTypeError(f"config section {cls.key!r} must be a mapping, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for name in data:
            if name not in names:
                raise ConfigError(unknown_key_message(cls.key, name, names))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def options(self) -> dict[str, Any]:
        """The fields as keyword arguments, values as checked (tuples stay tuples)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    """JSON form: tuples as lists, paths as strings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
