"""Typed, JSON round-trippable U-Net configs.

Every registered U-Net has a config dataclass deriving from `UnetConfig`. Its fields are the
U-Net's constructor arguments; sub-parts are nested dataclasses (deriving from `ConfigPart`),
and interchangeable classes are referred to by their registry name (a `str`), never by the
class object, so `config.to_dict()` is plain JSON and `from_dict(to_dict())` is the identity.

Conventions for subclasses (see `unets/space_time_unet.py` for an example):

- set the class variable `unet_name` to the U-Net's registry name (`to_dict()` writes it
  under the key `"name"`, which `unets.build(config_dict)` reads back);
- annotate sequences as `tuple[...]` (JSON lists are turned back into tuples);
- check values in `validate()` and raise `ValueError` saying what was received and what is
  allowed; it runs in `__post_init__`, so an invalid config cannot be constructed.

Unknown or misspelt keys (in `from_dict`, `replace` and `check_keys`) raise `ValueError`
naming the valid keys and suggesting the closest one.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from spacetime.checks import check_choice, did_you_mean

__all__ = ["ConfigPart", "UnetConfig", "check_attn_backend", "check_keys", "closest_hint"]

_C = TypeVar("_C", bound="ConfigPart")

# Key under which `UnetConfig.to_dict()` stores the U-Net's registry name.
NAME_KEY = "name"


# Kept for importers of the old name; the wording lives in spacetime.checks.
closest_hint = did_you_mean


def check_attn_backend(value: Any) -> str | None:
    """The `attn_backend` option of every U-Net: None (the `attention_backend()` context, then
    the SPACETIME_ATTN_BACKEND variable, then auto decide at call time) or a backend name,
    which pins every attention layer of the network to it."""
    from spacetime.attend import AttentionBackend

    if value is None:
        return None
    if isinstance(value, AttentionBackend):
        return value.value
    if not isinstance(value, str):
        raise TypeError(f"attn_backend must be None or a backend name (str), got {type(value).__name__}")
    return check_choice("attn_backend", value.strip().lower(), [b.value for b in AttentionBackend])


def check_keys(given: Iterable[str], valid: Iterable[str], what: str) -> None:
    """Raise `ValueError` if any of `given` is not in `valid`, naming the valid keys."""
    valid = sorted(valid)
    unknown = [k for k in given if k not in valid]
    if unknown:
        first = unknown[0]
        raise ValueError(
            f"unknown {what} key{'s' if len(unknown) > 1 else ''} {unknown}"
            f"{did_you_mean(first, valid)}; valid keys are {valid}"
        )


def _is_part(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _from_json(tp: Any, value: Any, where: str) -> Any:
    """Rebuild a value of annotation `tp` from its JSON form (lists -> tuples, dicts ->
    nested config parts)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        # Prefer the member whose container kind matches the value.
        for arg in typing.get_args(tp):
            if _is_part(arg) and isinstance(value, Mapping):
                return _from_json(arg, value, where)
            if typing.get_origin(arg) is tuple and isinstance(value, (list, tuple)):
                return _from_json(arg, value, where)
        return value
    if _is_part(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return value  # left for `validate()` to reject with a precise message
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) == len(value):
            return tuple(_from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return tuple(value)
    return value


def _to_json(value: Any) -> Any:
    if isinstance(value, ConfigPart):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class ConfigPart:
    """Base of every config dataclass (whole U-Nets and their nested sub-parts)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` for invalid field values. Subclasses override (and call super)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        module = __import__(cls.__module__, fromlist=["_"])
        return typing.get_type_hints(cls, globalns=vars(module))

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict of the fields (nested parts as dicts, tuples as lists)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """Inverse of `to_dict`. Unknown keys raise `ValueError` naming the valid ones."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
        data = dict(data)
        check_keys(data, cls.field_names(), cls.__name__)
        hints = cls._hints()
        kwargs = {k: _from_json(hints[k], v, f"{cls.__name__}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    def replace(self: _C, **overrides: Any) -> _C:
        """A copy with `overrides` applied. A nested part may be overridden by a dict of some
        of its fields (merged into the current part) or by a whole part instance."""
        check_keys(overrides, self.field_names(), type(self).__name__)
        hints = self._hints()
        merged: dict[str, Any] = {}
        for key, value in overrides.items():
            current = getattr(self, key)
            if isinstance(current, ConfigPart) and isinstance(value, Mapping):
                merged[key] = current.replace(**value)
            else:
                merged[key] = _from_json(hints[key], value, f"{type(self).__name__}.{key}")
        return dataclasses.replace(self, **merged)


@dataclasses.dataclass
class UnetConfig(ConfigPart):
    """Base of every U-Net's config. `to_dict()` includes the registry name under `"name"`,
    so `unets.build(config.to_dict())` knows which U-Net to build."""

    # The U-Net's registry name; each subclass sets it.
    unet_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        if not self.unet_name:
            raise ValueError(f"{type(self).__name__}.unet_name is not set; register the U-Net first")
        return {NAME_KEY: self.unet_name, **super().to_dict()}

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """Accepts the output of `to_dict()` (with or without its `"name"` entry)."""
        data = dict(data)
        name = data.pop(NAME_KEY, None)
        if name is not None and cls.unet_name and name != cls.unet_name:
            raise ValueError(f"config is for U-Net {name!r}, not {cls.unet_name!r} ({cls.__name__})")
        return super().from_dict.__func__(cls, data)  # type: ignore[attr-defined]

    # Options the constructor also takes by position, in field order (the seed library's
    # positional parameters); every other option is keyword-only.
    POSITIONAL: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def signature(cls) -> inspect.Signature:
        """The U-Net constructor's signature, derived from the fields: same names, order,
        defaults and annotations. A part built by a default factory shows `None` (= default)."""
        hints = cls._hints()
        params = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = None
            else:
                default = inspect.Parameter.empty
            kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name in cls.POSITIONAL
                    else inspect.Parameter.KEYWORD_ONLY)
            params.append(inspect.Parameter(f.name, kind, default=default, annotation=hints[f.name]))
        return inspect.Signature(params)

    @classmethod
    def from_options(cls: type[_C], *args: Any, **options: Any) -> _C:
        """The config of a constructor call `Model(*args, **options)`: bound against
        `signature()` (so the same TypeErrors as a hand-written signature), sequences turned
        into tuples, dicts into nested parts, and `None` for a part meaning its default."""
        signature = cls.signature()  # type: ignore[attr-defined]
        unknown = [k for k in options if k not in signature.parameters]
        if unknown:
            raise TypeError(
                f"{cls.__name__.removesuffix('Config')}() got an unexpected keyword argument "
                f"{unknown[0]!r}{did_you_mean(unknown[0], signature.parameters)}"
            )
        try:
            bound = signature.bind(*args, **options)
        except TypeError as err:
            raise TypeError(f"{cls.__name__.removesuffix('Config')}(): {err}") from None
        hints = cls._hints()
        values: dict[str, Any] = {}
        for key, value in bound.arguments.items():
            tp = hints[key]
            if value is None and _is_part(tp):
                continue
            if typing.get_origin(tp) is tuple and not isinstance(value, (str, bytes, Mapping, tuple, list)):
                try:
                    value = tuple(value)
                except TypeError:
                    pass  # left for validate() to reject with a precise message
            values[key] = _from_json(tp, value, f"{cls.__name__}.{key}")
        return cls(**values)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, "sort_keys": True, **kwargs})

    @classmethod
    def from_json(cls: type[_C], text: str) -> _C:
        return cls.from_dict(json.loads(text))
