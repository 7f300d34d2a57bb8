"""unets: interchangeable video U-Nets assembled from spacetime layers by a registry.

    from unets import SpaceTimeUnet, Unet3D
    import unets
    unets.available()                               # registered U-Net names
    model = unets.build("space_time_unet", preset="debug")
    same = unets.build(model.config.to_dict())      # same architecture
    model.save_pretrained("ckpt"); again = unets.load("ckpt")

The U-Net classes are imported on first use (module `__getattr__`), so importing `unets`
does not import every U-Net, and nothing registers itself as an import side effect: the
registry table lives in `unets/registry.py`.
"""

from __future__ import annotations

import importlib
from typing import Any

from unets.base import UnetMixin
from unets.blocks import available_blocks, get_block, register_block
from unets.config import ConfigPart, UnetConfig
from unets.io import load, load_weights, save_pretrained
from unets.registry import available, build, build_config, get, presets, register

_LAZY = {
    "SpaceTimeUnet": "unets.space_time_unet",
    "SpaceTimeUnetConfig": "unets.space_time_unet",
    "Unet3D": "unets.unet3d",
    "Unet3DConfig": "unets.unet3d",
    "from_make_a_video": "unets.make_a_video",
}

__all__ = [
    "ConfigPart",
    "UnetConfig",
    "UnetMixin",
    "available",
    "available_blocks",
    "build",
    "build_config",
    "get",
    "get_block",
    "load",
    "load_weights",
    "presets",
    "register",
    "register_block",
    "save_pretrained",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unets' has no attribute {name!r}")
