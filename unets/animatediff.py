"""AnimateDiff (Guo et al. 2024, "AnimateDiff: Animate Your Personalized Text-to-Image
Diffusion Models without Specific Tuning"): a Stable Diffusion 1.x U-Net left as it is,
with a motion module after every spatial layer. A motion module is a transformer over the
frames at each pixel whose attentions see sinusoidal frame positions (Sec. 4.2 of the
paper); its output projection starts at zero, so the image model is unchanged at step 0.

This is diffusers' `UNetMotionModel` (= `UNet2DConditionModel` + `MotionAdapter`) rebuilt on
this library's surface, with the same parameter names: the SD U-Net's keys plus the motion
modules' `*.motion_modules.*` keys. `temporal_parameters()` are exactly the motion modules,
so temporal-only training trains what a `MotionAdapter` holds.

    model = unets.build("animatediff", preset="debug")
    out = model(x, t, cond=tokens)          # tokens (B, L, cond_dim), one copy per video

Unlike `UNetMotionModel`, whose caller repeats the tokens for every frame, `cond` holds
one set of tokens per video. The null condition is one all-zero token (see `modelscope`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import Tensor, nn

from spacetime.checks import check_int, check_number
from spacetime.time import EnableTime
from unets.config import UnetConfig, check_attn_backend
from unets.frame_cond import (
    FrameCondInput,
    FrameRateEmbedding,
    check_conditioning_options,
)
from unets.lowres_cond import LowresCond
from unets.self_cond import SelfCondInput
from unets.diffusers_layers import (
    DiffusersLayoutUnet,
    CrossAttnTransformer,
    Downsample2D,
    FrameTransformer,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
)

__all__ = ["PRESETS", "AnimateDiffUnet", "AnimateDiffUnetConfig"]

DOWN_TYPES = ("CrossAttnDownBlockMotion", "DownBlockMotion")
UP_TYPES = ("CrossAttnUpBlockMotion", "UpBlockMotion")


@dataclasses.dataclass
class AnimateDiffUnetConfig(UnetConfig):
    """Options of `AnimateDiffUnet`; names as diffusers' `UNetMotionModel` config keys
    except `channels` (`in_channels`) and `cond_dim` (`cross_attention_dim`). Heads are head
    counts (`num_attention_heads` for the SD attentions, `motion_num_attention_heads` for
    the motion modules)."""

    unet_name: ClassVar[str] = "animatediff"

    channels: int = 4
    out_channels: int | None = None
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockMotion",) * 3 + ("DownBlockMotion",)
    up_block_types: tuple[str, ...] = ("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float | int = 1.0
    norm_num_groups: int = 32
    norm_eps: float | int = 1e-5
    cond_dim: int = 768
    num_attention_heads: int = 8
    use_linear_projection: bool = False
    motion_num_attention_heads: int = 8
    motion_max_seq_length: int = 32
    use_motion_mid_block: bool = True
    sample_size: int | None = None
    attn_backend: str | None = None
    frame_cond: bool = False
    frame_rate_cond: bool = False
    lowres_cond: bool = False
    self_cond: bool = False

    def validate(self) -> None:
        check_conditioning_options(self)
        check_int("channels", self.channels, low=1)
        if self.out_channels is not None:
            check_int("out_channels", self.out_channels, low=1)
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ValueError("block_out_channels needs at least one entry, got ()")
        for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_TYPES),
                                     ("up_block_types", self.up_block_types, UP_TYPES)):
            if len(types) != levels:
                raise ValueError(
                    f"{name} needs one entry per level ({levels}, as block_out_channels), got {len(types)}"
                )
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{name} entries must be among {list(allowed)}, got {bad}")
        for key in ("layers_per_block", "norm_num_groups", "cond_dim", "num_attention_heads",
                    "motion_num_attention_heads", "motion_max_seq_length"):
            check_int(key, getattr(self, key), low=1)
        check_int("downsample_padding", self.downsample_padding, low=0)
        check_number("mid_block_scale_factor", self.mid_block_scale_factor, low=0.0, low_open=True)
        check_number("norm_eps", self.norm_eps, low=0.0, low_open=True)
        for key in ("use_linear_projection", "use_motion_mid_block"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key} must be a bool, got {getattr(self, key)!r}")
        if self.sample_size is not None:
            check_int("sample_size", self.sample_size, low=1)
        for width in self.block_out_channels:
            check_int("block_out_channels entries", width, low=1)
            for key in ("norm_num_groups", "num_attention_heads", "motion_num_attention_heads"):
                if width % getattr(self, key):
                    raise ValueError(f"every block_out_channels entry must be a multiple of {key} "
                                     f"({getattr(self, key)}), got {list(self.block_out_channels)}")
        self.attn_backend = check_attn_backend(self.attn_backend)


# The full size is SD 1.5's U-Net with the `mm_sd_v15_v2` motion adapter (the defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "debug": {"block_out_channels": (8, 16), "down_block_types": ("CrossAttnDownBlockMotion", "DownBlockMotion"),
              "up_block_types": ("UpBlockMotion", "CrossAttnUpBlockMotion"), "layers_per_block": 1,
              "norm_num_groups": 4, "cond_dim": 16, "num_attention_heads": 2, "motion_num_attention_heads": 2,
              "motion_max_seq_length": 8},
    "sd15": {},
}


def _motion(config: AnimateDiffUnetConfig, dim: int) -> FrameTransformer:
    heads = config.motion_num_attention_heads
    return FrameTransformer(dim, heads=heads, dim_head=dim // heads, groups=config.norm_num_groups,
                            max_frames=config.motion_max_seq_length, backend=config.attn_backend)


def _spatial(config: AnimateDiffUnetConfig, dim: int) -> CrossAttnTransformer:
    heads = config.num_attention_heads
    return CrossAttnTransformer(dim, heads=heads, dim_head=dim // heads, context_dim=config.cond_dim,
                                groups=config.norm_num_groups, backend=config.attn_backend,
                                linear_projection=config.use_linear_projection)


class _Stage(nn.Module):
    """(resnet[, spatial transformer], motion module) x layers, then a down- or upsampler;
    diffusers' `*BlockMotion` names."""

    def __init__(self, config: AnimateDiffUnetConfig, *, dims_in: list[int], dim_out: int, emb_dim: int,
                 cross: bool, resample: str | None):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(d, dim_out, emb_dim=emb_dim, groups=c.norm_num_groups, eps=c.norm_eps) for d in dims_in]
        )
        self.attentions = nn.ModuleList([_spatial(c, dim_out) for _ in dims_in]) if cross else None
        self.motion_modules = nn.ModuleList([_motion(c, dim_out) for _ in dims_in])
        self.downsamplers = None
        self.upsamplers = None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(dim_out, padding=c.downsample_padding)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(dim_out)])

    def layer(self, i: int, x: Tensor, emb: Tensor, ctx: Tensor, keep: Tensor | None, frames: int,
              enabled: EnableTime) -> Tensor:
        x = self.resnets[i](x, emb)
        if self.attentions is not None:
            x = self.attentions[i](x, ctx, keep)
        return self.motion_modules[i](x, frames, enabled)


class _MidStage(nn.Module):
    """resnet, then spatial transformer, [motion module,] resnet."""

    def __init__(self, config: AnimateDiffUnetConfig, dim: int, emb_dim: int):
        super().__init__()
        c = config

        def resnet() -> ResnetBlock2D:
            return ResnetBlock2D(dim, dim, emb_dim=emb_dim, groups=c.norm_num_groups, eps=c.norm_eps,
                                 output_scale_factor=c.mid_block_scale_factor)

        self.resnets = nn.ModuleList([resnet(), resnet()])
        self.attentions = nn.ModuleList([_spatial(c, dim)])
        self.motion_modules = nn.ModuleList([_motion(c, dim)]) if c.use_motion_mid_block else None

    def forward(self, x: Tensor, emb: Tensor, ctx: Tensor, keep: Tensor | None, frames: int,
                enabled: EnableTime) -> Tensor:
        x = self.attentions[0](self.resnets[0](x, emb), ctx, keep)
        if self.motion_modules is not None:
            x = self.motion_modules[0](x, frames, enabled)
        return self.resnets[1](x, emb)


class AnimateDiffUnet(DiffusersLayoutUnet):
    """SD 1.x U-Net + AnimateDiff motion modules. `forward(x, time, cond=tokens)` maps a noisy
    latent video `(B, C, F, H, W)` (or image `(B, C, H, W)`: the plain SD U-Net) and
    timesteps `(B,)` to a tensor shaped like `x`: diffusers' `UNetMotionModel(...).sample`
    for `encoder_hidden_states=tokens.repeat_interleave(F, 0)`."""

    config_class = AnimateDiffUnetConfig

    def __init__(self, *args: Any, **options: Any):
        super().__init__()
        config = AnimateDiffUnetConfig.from_options(*args, **options)
        self.config = config
        c = config
        widths = c.block_out_channels
        emb_dim = widths[0] * 4
        self.channels = c.channels
        self.conv_in = nn.Conv2d(c.channels, widths[0], 3, padding=1)
        self.frame_cond_in = FrameCondInput(c.channels, widths[0]) if c.frame_cond else None
        self.time_embedding = TimestepEmbedding(widths[0], emb_dim)
        self.fps_embed = FrameRateEmbedding(emb_dim) if c.frame_rate_cond else None
        self.lowres = LowresCond(c.channels, widths[0], emb_dim) if c.lowres_cond else None
        self.self_cond_in = SelfCondInput(c.channels, widths[0]) if c.self_cond else None
        self.build_stages(_Stage, _MidStage, emb_dim)
