"""Run-config sections for cascade stages: `super_resolution:` (a spatial super-resolution
stage, `diffusion.super_resolution.SuperResolution`).

    super_resolution: {lowres_size: 16, noise_aug: 0.3, sample_noise_level: 0.1}

A run with this section trains and loads the `SuperResolution` stage around its process; its
U-Net gets `lowres_cond: true` (set in `model` unless given, refused if false). Like
`diffusion.config`, this module sits at the bottom of `diffusion`'s imports.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, no_type_check

from diffusion.config_fields import ConfigError, Section, _choice, _int, _number

__all__ = ["SuperResolutionConfig", "check_super_resolution"]

# The resize modes of diffusion.super_resolution (kept here: this module must not import it).
DOWNSAMPLE_MODES = ("bicubic", "bilinear", "area")
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class SuperResolutionConfig(Section):
    """`SuperResolution`'s keyword arguments: the low resolution (below
    `diffusion.image_size`), how the condition is resized, the training augmentation range
    [0, noise_aug] and the sampling level."""

    key: ClassVar[str] = "super_resolution"
    lowres_size: int
    downsample: str = "bicubic"
    upsample: str = "bicubic"
    noise_aug: float = 0.3
    sample_noise_level: float = 0.1

    def __post_init__(self) -> None:
        k = "super_resolution."
        _int(k + "lowres_size", self.lowres_size, 1)
        _choice(k + "downsample", self.downsample, DOWNSAMPLE_MODES)
        _choice(k + "upsample", self.upsample, UPSAMPLE_MODES)
        _number(k + "noise_aug", self.noise_aug, 0, 1)
        _number(k + "sample_noise_level", self.sample_noise_level, 0, 1)

    @classmethod
    def from_dict(cls, data: Any) -> SuperResolutionConfig:
        if isinstance(data, dict) and "lowres_size" not in data:
            raise ConfigError("super_resolution.lowres_size is required (a positive int below diffusion.image_size)")
        return super().from_dict.__func__(cls, data)  # type: ignore[attr-defined]


def check_super_resolution(run: Any) -> None:
    """What the section asks of the rest of a run: a low resolution below the high one, a
    pixel-space run of this library's U-Nets, and the U-Net's `lowres_cond` (set to true when
    `model` does not say)."""
    section = run.super_resolution
    if section is None:
        return
    if run.pretrained is not None:
        raise ConfigError("super_resolution needs a U-Net of this library (unet:), not a pretrained base")
    size = run.diffusion.image_size
    if section.lowres_size >= size:
        raise ConfigError(
            f"super_resolution.lowres_size must be below diffusion.image_size={size}, got {section.lowres_size}"
        )
    if run.unet.model.setdefault("lowres_cond", True) is not True:
        raise ConfigError(
            f"model.lowres_cond={run.unet.model['lowres_cond']!r}: a super_resolution run needs the U-Net's "
            "low-resolution input; leave it out or set it true"
        )
