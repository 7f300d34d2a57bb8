"""The U-Net registry: an explicit name -> (model class, config class, presets) table.

Nothing registers itself by being imported. The library's U-Nets are listed in `_BUILTIN`
below as lazy `"module:attribute"` references, so `import unets` stays cheap and one U-Net's
module is imported only when that U-Net is asked for. Users add their own with `register()`.

A registered model class must provide `from_config(config)` (the `UnetMixin` in
`unets/base.py` supplies it) and its config class must derive from `UnetConfig`. Presets are
a mapping from preset name to a dict of config fields (or a config instance); every U-Net has
at least a tiny `debug` preset for tests.

    unets.available()                                  # ['space_time_unet', 'unet3d', ...]
    unets.build("space_time_unet", preset="debug", attn_heads=4)
    unets.build(model.config.to_dict())                # same architecture again
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from spacetime.checks import did_you_mean
from unets.config import NAME_KEY, UnetConfig, check_keys

__all__ = ["UnetEntry", "available", "build", "build_config", "get", "presets", "register"]

Ref = type | str  # a class, or a lazy "package.module:Attribute" reference


def _resolve(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep:
        raise ValueError(f"lazy reference must look like 'package.module:Attribute', got {ref!r}")
    return getattr(importlib.import_module(module_name), attr)


@dataclasses.dataclass
class UnetEntry:
    """One row of the table. `model`, `config` and `presets` may be lazy references."""

    name: str
    model: Ref
    config: Ref
    presets: Mapping[str, Any] | str | None = None
    _resolved: bool = dataclasses.field(default=False, repr=False)

    def resolve(self) -> UnetEntry:
        if self._resolved:
            return self
        self.model = _resolve(self.model)
        self.config = _resolve(self.config)
        presets = _resolve(self.presets) if self.presets is not None else {}
        self.presets = dict(presets)
        _check_config_class(self.name, self.config)
        if not hasattr(self.model, "from_config"):
            raise TypeError(
                f"U-Net {self.name!r}: model class {self.model.__name__} has no from_config(config) "
                f"classmethod (derive it from unets.base.UnetMixin)"
            )
        self._resolved = True
        return self

    @property
    def model_class(self) -> type[nn.Module]:
        return self.resolve().model  # type: ignore[return-value]

    @property
    def config_class(self) -> type[UnetConfig]:
        return self.resolve().config  # type: ignore[return-value]

    @property
    def preset_table(self) -> dict[str, Any]:
        return self.resolve().presets  # type: ignore[return-value]


def _check_config_class(name: str, config: Any) -> None:
    if not (isinstance(config, type) and issubclass(config, UnetConfig)):
        raise TypeError(f"U-Net {name!r}: config must be a UnetConfig subclass, got {config!r}")
    own = config.__dict__.get("unet_name")
    if own and own != name:
        raise ValueError(
            f"U-Net {name!r}: config class {config.__name__} is already named {own!r}; "
            f"subclass it to register it under another name"
        )
    if not own:
        # A subclass of a registered config registered under a new name gets its own name.
        config.unet_name = name


_BUILTIN: dict[str, UnetEntry] = {
    "space_time_unet": UnetEntry(
        "space_time_unet",
        "unets.space_time_unet:SpaceTimeUnet",
        "unets.space_time_unet:SpaceTimeUnetConfig",
        "unets.space_time_unet:PRESETS",
    ),
    "unet3d": UnetEntry(
        "unet3d",
        "unets.unet3d:Unet3D",
        "unets.unet3d:Unet3DConfig",
        "unets.unet3d:PRESETS",
    ),
    "modelscope": UnetEntry(
        "modelscope",
        "unets.modelscope:ModelScopeUnet",
        "unets.modelscope:ModelScopeUnetConfig",
        "unets.modelscope:PRESETS",
    ),
    "animatediff": UnetEntry(
        "animatediff",
        "unets.animatediff:AnimateDiffUnet",
        "unets.animatediff:AnimateDiffUnetConfig",
        "unets.animatediff:PRESETS",
    ),
}

_REGISTRY: dict[str, UnetEntry] = dict(_BUILTIN)


def register(
    name: str,
    model: Ref,
    config: Ref,
    presets: Mapping[str, Any] | str | None = None,
    *,
    overwrite: bool = False,
) -> UnetEntry:
    """Add a U-Net to the table under `name`.

    `model`: the nn.Module class (with `from_config`), `config`: its `UnetConfig` subclass,
    `presets`: `{preset_name: {field: value}}`. Each may be a lazy `"module:Attr"` string.
    Registering an existing name raises unless `overwrite=True`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"U-Net name must be a non-empty string, got {name!r}")
    if name == NAME_KEY:
        raise ValueError(f"{NAME_KEY!r} is reserved and cannot name a U-Net")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a U-Net named {name!r} is already registered; pass overwrite=True to replace it")
    entry = UnetEntry(name, model, config, presets)
    if not isinstance(config, str):
        _check_config_class(name, config)
    _REGISTRY[name] = entry
    return entry


def available() -> list[str]:
    """Names of the registered U-Nets, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> UnetEntry:
    """The resolved table entry for `name`; unknown names raise `ValueError`."""
    if not isinstance(name, str):
        raise TypeError(f"U-Net name must be a string, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown U-Net {name!r}{did_you_mean(name, _REGISTRY)}; available: {available()}"
        )
    return _REGISTRY[name].resolve()


def presets(name: str) -> list[str]:
    """Preset names of U-Net `name`, sorted."""
    return sorted(get(name).preset_table)


def build_config(
    name_or_config: str | Mapping[str, Any] | UnetConfig,
    *,
    preset: str | None = None,
    **overrides: Any,
) -> UnetConfig:
    """The config `build()` would use (see there)."""
    if isinstance(name_or_config, UnetConfig):
        if preset is not None:
            raise ValueError("preset= cannot be combined with a config instance")
        get(name_or_config.unet_name)  # must be registered
        return name_or_config.replace(**overrides) if overrides else name_or_config
    if isinstance(name_or_config, Mapping):
        if preset is not None:
            raise ValueError("preset= cannot be combined with a config dict")
        data = dict(name_or_config)
        if NAME_KEY not in data:
            raise ValueError(
                f"config dict has no {NAME_KEY!r} entry naming the U-Net (one of {available()}); "
                f"use model.config.to_dict()"
            )
        entry = get(data[NAME_KEY])
        config = entry.config_class.from_dict(data)
        return config.replace(**overrides) if overrides else config
    entry = get(name_or_config)
    config_cls = entry.config_class
    if preset is not None:
        table = entry.preset_table
        if preset not in table:
            raise ValueError(
                f"unknown preset {preset!r} for U-Net {entry.name!r}{did_you_mean(preset, table)}; "
                f"available: {sorted(table)}"
            )
        base = table[preset]
        config = base if isinstance(base, UnetConfig) else config_cls.from_dict(base)
        return config.replace(**overrides) if overrides else config
    check_keys(overrides, config_cls.field_names(), config_cls.__name__)
    required = [
        f.name
        for f in dataclasses.fields(config_cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in overrides]
    if missing:
        raise ValueError(
            f"U-Net {entry.name!r} needs {missing} (or a preset, one of {sorted(entry.preset_table)})"
        )
    return config_cls.from_dict(overrides)


def build(
    name_or_config: str | Mapping[str, Any] | UnetConfig,
    *,
    preset: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered U-Net.

    - `build(name, preset=None, **overrides)`: the preset's config (or the config class's
      defaults) with `overrides` applied;
    - `build(config_dict, **overrides)`: from `model.config.to_dict()` (its `"name"` entry
      picks the U-Net);
    - `build(config)`: from a config instance.
    Unknown names, presets and config keys raise `ValueError` listing the valid ones."""
    config = build_config(name_or_config, preset=preset, **overrides)
    return get(config.unet_name).model_class.from_config(config)  # type: ignore[attr-defined]
