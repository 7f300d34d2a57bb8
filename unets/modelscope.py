"""ModelScope's text-to-video U-Net (Wang et al. 2023, "ModelScope Text-to-Video Technical
Report"; zeroscope shares it): the Stable Diffusion U-Net with, after every resnet, a stack
of four temporal 3x1x1 convs and, after every spatial transformer, a transformer over the
frames at each pixel; one more frame transformer (`transformer_in`) follows the input conv.

This is diffusers' `UNet3DConditionModel` rebuilt on this library's surface: the same
parameter names and outputs (so `unets.from_diffusers` / `save_diffusers` move weights in
both directions unchanged), plus what every registered U-Net has here: `enable_time`,
gradient checkpointing per block, the temporal / spatial parameter split, attention through
`spacetime.attend`, classifier-free guidance with `null_cond_prob`.

    model = unets.build("modelscope", preset="debug")
    out = model(x, t, cond=tokens)          # x (B, 4, F, H, W), tokens (B, L, cond_dim)

The null condition (classifier-free guidance dropout, and `cond=None`) is a single all-zero
token: ModelScope itself guides with the empty prompt's CLIP tokens, which a caller passes
as `cond` like any other prompt.
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
    TemporalConvStack,
    TimestepEmbedding,
    Upsample2D,
)

__all__ = ["PRESETS", "ModelScopeUnet", "ModelScopeUnetConfig"]

DOWN_TYPES = ("CrossAttnDownBlock3D", "DownBlock3D")
UP_TYPES = ("CrossAttnUpBlock3D", "UpBlock3D")


@dataclasses.dataclass
class ModelScopeUnetConfig(UnetConfig):
    """Options of `ModelScopeUnet`; the names are diffusers' `UNet3DConditionModel` config
    keys except `channels` (`in_channels`) and `cond_dim` (`cross_attention_dim`).

    `attention_head_dim` is the channels per head of every transformer (a block of width
    `w` has `w // attention_head_dim` heads); the input frame transformer has 8 heads."""

    unet_name: ClassVar[str] = "modelscope"

    channels: int = 4
    out_channels: int | None = None
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float | int = 1.0
    norm_num_groups: int = 32
    norm_eps: float | int = 1e-5
    cond_dim: int = 1024
    attention_head_dim: int = 64
    temporal_dropout: float | int = 0.1
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
        for value in self.block_out_channels:
            check_int("block_out_channels entries", value, low=1)
        for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_TYPES),
                                     ("up_block_types", self.up_block_types, UP_TYPES)):
            if len(types) != levels:
                raise ValueError(
                    f"{name} needs one entry per level ({levels}, as block_out_channels), got {len(types)}"
                )
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{name} entries must be among {list(allowed)}, got {bad}")
        check_int("layers_per_block", self.layers_per_block, low=1)
        check_int("downsample_padding", self.downsample_padding, low=0)
        check_number("mid_block_scale_factor", self.mid_block_scale_factor, low=0.0, low_open=True)
        check_int("norm_num_groups", self.norm_num_groups, low=1)
        check_number("norm_eps", self.norm_eps, low=0.0, low_open=True)
        check_int("cond_dim", self.cond_dim, low=1)
        check_int("attention_head_dim", self.attention_head_dim, low=1)
        check_number("temporal_dropout", self.temporal_dropout, low=0.0, high=1.0)
        if self.sample_size is not None:
            check_int("sample_size", self.sample_size, low=1)
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(
                    f"every block_out_channels entry must be a multiple of norm_num_groups "
                    f"({self.norm_num_groups}), got {list(self.block_out_channels)}"
                )
            if width % self.attention_head_dim:
                raise ValueError(
                    f"every block_out_channels entry must be a multiple of attention_head_dim "
                    f"({self.attention_head_dim}), got {list(self.block_out_channels)}"
                )
        self.attn_backend = check_attn_backend(self.attn_backend)


# The full size is the `damo-vilab/text-to-video-ms-1.7b` unet's config (the defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "debug": {"block_out_channels": (8, 16), "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
              "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"), "layers_per_block": 1,
              "norm_num_groups": 4, "cond_dim": 16, "attention_head_dim": 2, "temporal_dropout": 0.0},
    "small": {"block_out_channels": (64, 128, 256, 256), "norm_num_groups": 32, "cond_dim": 512,
              "attention_head_dim": 8},
    "ms-1.7b": {},
}


class _Stage(nn.Module):
    """One level: (resnet, temporal convs[, spatial transformer, frame transformer]) x layers,
    then a down- or upsampler. Names as diffusers' `*Block3D` so the keys line up."""

    def __init__(self, config: ModelScopeUnetConfig, *, dims_in: list[int], dim_out: int, emb_dim: int,
                 cross: bool, resample: str | None):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(d, dim_out, emb_dim=emb_dim, groups=c.norm_num_groups, eps=c.norm_eps) for d in dims_in]
        )
        self.temp_convs = nn.ModuleList(
            [TemporalConvStack(dim_out, groups=c.norm_num_groups, dropout=c.temporal_dropout) for _ in dims_in]
        )
        head_dim = c.attention_head_dim
        if cross:
            self.attentions = nn.ModuleList(
                [CrossAttnTransformer(dim_out, heads=dim_out // head_dim, dim_head=head_dim, context_dim=c.cond_dim,
                                      groups=c.norm_num_groups, backend=c.attn_backend) for _ in dims_in]
            )
            self.temp_attentions = nn.ModuleList(
                [FrameTransformer(dim_out, heads=dim_out // head_dim, dim_head=head_dim, groups=c.norm_num_groups,
                                  backend=c.attn_backend) for _ in dims_in]
            )
        else:
            self.attentions = None
            self.temp_attentions = None
        self.downsamplers = None
        self.upsamplers = None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(dim_out, padding=c.downsample_padding)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(dim_out)])

    def layer(self, i: int, x: Tensor, emb: Tensor, ctx: Tensor, keep: Tensor | None, frames: int,
              enabled: EnableTime) -> Tensor:
        x = self.resnets[i](x, emb)
        x = self.temp_convs[i](x, frames, enabled)
        if self.attentions is not None:
            x = self.attentions[i](x, ctx, keep)
            x = self.temp_attentions[i](x, frames, enabled)
        return x


class _MidStage(nn.Module):
    """resnet, temporal convs, then (spatial transformer, frame transformer, resnet, temporal
    convs); diffusers' `UNetMidBlock3DCrossAttn`."""

    def __init__(self, config: ModelScopeUnetConfig, dim: int, emb_dim: int):
        super().__init__()
        c = config
        head_dim = c.attention_head_dim

        def resnet() -> ResnetBlock2D:
            return ResnetBlock2D(dim, dim, emb_dim=emb_dim, groups=c.norm_num_groups, eps=c.norm_eps,
                                 output_scale_factor=c.mid_block_scale_factor)

        self.resnets = nn.ModuleList([resnet(), resnet()])
        self.temp_convs = nn.ModuleList(
            [TemporalConvStack(dim, groups=c.norm_num_groups, dropout=c.temporal_dropout) for _ in range(2)]
        )
        self.attentions = nn.ModuleList(
            [CrossAttnTransformer(dim, heads=dim // head_dim, dim_head=head_dim, context_dim=c.cond_dim,
                                  groups=c.norm_num_groups, backend=c.attn_backend)]
        )
        self.temp_attentions = nn.ModuleList(
            [FrameTransformer(dim, heads=dim // head_dim, dim_head=head_dim, groups=c.norm_num_groups,
                              backend=c.attn_backend)]
        )

    def forward(self, x: Tensor, emb: Tensor, ctx: Tensor, keep: Tensor | None, frames: int,
                enabled: EnableTime) -> Tensor:
        x = self.temp_convs[0](self.resnets[0](x, emb), frames, enabled)
        x = self.attentions[0](x, ctx, keep)
        x = self.temp_attentions[0](x, frames, enabled)
        return self.temp_convs[1](self.resnets[1](x, emb), frames, enabled)


class ModelScopeUnet(DiffusersLayoutUnet):
    """ModelScope / zeroscope's U-Net. `forward(x, time, cond=tokens)` maps a noisy latent
    video `(B, C, F, H, W)` (or image `(B, C, H, W)`, processed with time off) and timesteps
    `(B,)` to a tensor shaped like `x` (`out_channels` channels): the `.sample` diffusers'
    `UNet3DConditionModel` returns for `encoder_hidden_states=tokens`."""

    config_class = ModelScopeUnetConfig

    def __init__(self, *args: Any, **options: Any):
        super().__init__()
        config = ModelScopeUnetConfig.from_options(*args, **options)
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
        self.transformer_in = FrameTransformer(widths[0], heads=8, dim_head=c.attention_head_dim,
                                               groups=c.norm_num_groups, backend=c.attn_backend)
        self.build_stages(_Stage, _MidStage, emb_dim)

    def after_conv_in(self, h: Tensor, frames: int, enabled: EnableTime) -> Tensor:
        # ModelScope's `transformer_in`: a temporal transformer on the input features.
        return self.checkpointed(self.transformer_in, h, frames, enabled)
