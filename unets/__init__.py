"""unets: interchangeable video U-Nets assembled from spacetime layers by a registry.

    from unets import SpaceTimeUnet, Unet3D
    import unets
    unets.available()                               # registered U-Net names
    model = unets.build("space_time_unet", preset="debug")
    same = unets.build(model.config.to_dict())      # same architecture
    model.save_pretrained("ckpt"); again = unets.load("ckpt")
    model = unets.from_diffusers("zeroscope/unet")   # diffusers' video U-Nets (unets/convert.py)
    model.save_diffusers("out")

Every registered U-Net:
- takes its options as declared by its config dataclass (`SpaceTimeUnetConfig`,
  `Unet3DConfig`): same names and defaults as the seed libraries, `inspect.signature(cls)`
  lists them, and `cls.config_class.from_options(...)` is what the constructor runs;
- says what condition it takes: `model.cond_format` is None (unconditional), "pooled" (a
  `(B, D)` vector) or "tokens" (`(B, L, D)` token embeddings plus a `(B, L)` mask), derived
  from its config; `cond_on_tokens` is a read-only alias of `cond_format == "tokens"`;
- has `attn_backend`: None (default) lets `spacetime.attention_backend()`, then the
  SPACETIME_ATTN_BACKEND variable, then `auto` choose at call time; a name pins every
  attention layer. make-a-video's `flash_attn=True` is accepted and asks for a fused kernel,
  which is what that default resolution prefers; it overrides neither context nor variable.

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
    "from_diffusers": "unets.convert",
    "save_diffusers": "unets.convert",
    "ModelScopeUnet": "unets.modelscope",
    "ModelScopeUnetConfig": "unets.modelscope",
    "AnimateDiffUnet": "unets.animatediff",
    "AnimateDiffUnetConfig": "unets.animatediff",
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
