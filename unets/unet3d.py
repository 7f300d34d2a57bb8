"""Unet3D: the space-time factorised U-Net of Video Diffusion Models.

Ho, Salimans, Gritsenko, Chan, Norouzi & Fleet 2022, "Video Diffusion Models" (arXiv:2204.03458),
Sec. 3 and Fig. 1: a 2D image U-Net whose 3x3 convolutions become space-only 1x3x3 convolutions,
each spatial attention block followed by an attention block over frames at every pixel (with
relative position embeddings over time). The constructor takes video-diffusion-pytorch's arguments
with its defaults (`dim`, `cond_dim`, `dim_mults`, `use_sparse_linear_attn`, ...), so its README
examples run unchanged.

What differs from video-diffusion-pytorch 0.7:
- "Focus on the present" (Sec. 3.1: masking attention over time to train on images jointly) stops
  *every* exchange between frames of a focused sample: all temporal attentions (the original's
  first one ignores the mask), the 3x3x3 convolutions of `conv_type="full3d"` and the relative
  position bias. A focused sample's output equals running its frames one by one. The same
  per-sample mask carries `enable_time` (`spacetime.time.select_time`), so compiled graphs never
  depend on the mask's values.
- Group-norm statistics are taken per frame: normalising over all frames, as a 3D GroupNorm does,
  would let frames exchange information even with attention over time turned off.
- Options: `conv_type="full3d"` (true 3x3x3 convs whose temporal taps start at zero), token
  cross-attention to the text (`text_cross_attn=True`) beside the pooled condition vector, the
  attention backend (`attn_backend`), images `(B, C, H, W)` and per-sample `enable_time`.
- `use_bert_text_cond=True` sizes the condition for this library's offline default text encoder
  (all-MiniLM-L6-v2, 384 features) instead of BERT; the diffusion process encodes the strings.
- New temporal layers start as the identity (STYLE 12): temporal attention outputs and the
  off-centre taps of 3x3x3 convs are zero at initialisation, so an untrained Unet3D treats
  frames independently and image-pretrained weights are unchanged on video at step 0.
- The skip from the first convolution has `init_dim` channels (the original assumed `dim`).

The resnet blocks are the library's one `unets.blocks.ResnetBlock`, with group norm. Parameter
layout 2 (`unets.upgrade`): weights saved with layout 1, when Unet3D had its own resnet block,
are renamed on load by the pre-hook registered in the constructor.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Float, Real
from torch import Tensor, nn

from spacetime.attention import Attention
from spacetime.checks import is_int
from spacetime.params import mark_temporal
from spacetime.position import RelativePositionBias, RotaryEmbedding
from spacetime.time import EnableTime, select_time, time_enabled
from unets.base import UnetMixin
from unets.blocks import ResnetBlock, TimestepEmbedding, masked_mean
from unets.config import UnetConfig, check_attn_backend
from unets.frame_cond import (
    FrameCondInput,
    FrameRateEmbedding,
    add_frame_rate,
    check_conditioning_options,
    frame_cond_inputs,
)
from unets.lowres_cond import LowresCond, add_lowres_features, add_noise_level, lowres_cond_inputs
from unets.self_cond import SelfCondInput, add_self_cond_features, self_cond_inputs
from unets.upgrade import load_state_dict_pre_hook

__all__ = ["PRESETS", "TEXT_ENCODER_DIM", "Unet3D", "Unet3DConfig"]

# Width of the default text encoder's embeddings (all-MiniLM-L6-v2, docs/design.md "Text"). Kept as a
# constant so the U-Net needs no text libraries; diffusion.text checks it against the encoder.
TEXT_ENCODER_DIM = 384

# "spatial" is the paper's factorisation: space-only 1x3x3 convs, frames mixed only by
# attention. "full3d": 3x3x3 convs (the registry's "conv3d"). Both are built by the "conv3d"
# block. Configs saved before this name say "pseudo3d", which in the block registry means
# make-a-video's conv + temporal conv: read as "spatial" with a warning.
CONV_TYPES = ("spatial", "full3d")
_OLD_CONV_TYPES = {"pseudo3d": "spatial"}
# video-diffusion-pytorch takes `block_type` and ignores it (its blocks are always resnets);
# configs written for it (text2video-from-scratch: "basic") must keep loading, so any string
# is accepted and stored, and the blocks are resnets whatever it says.


# --------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class Unet3DConfig(UnetConfig):
    """Constructor arguments of `Unet3D` (video-diffusion-pytorch's, then this library's)."""

    unet_name: ClassVar[str] = "unet3d"
    # video-diffusion-pytorch's positional parameters, in its order.
    POSITIONAL: ClassVar[tuple[str, ...]] = (
        "dim", "cond_dim", "out_dim", "dim_mults", "channels", "attn_heads", "attn_dim_head",
        "use_bert_text_cond", "init_dim", "init_kernel_size", "use_sparse_linear_attn", "block_type",
        "resnet_groups",
    )

    dim: int
    cond_dim: int | None = None
    out_dim: int | None = None
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 3
    attn_heads: int = 8
    attn_dim_head: int = 32
    use_bert_text_cond: bool = False
    init_dim: int | None = None
    init_kernel_size: int = 7
    use_sparse_linear_attn: bool = True
    block_type: str = "resnet"
    resnet_groups: int = 8
    conv_type: str = "spatial"
    text_cross_attn: bool = False
    attn_backend: str | None = None
    max_time_distance: int = 32
    frame_cond: bool = False
    frame_rate_cond: bool = False
    lowres_cond: bool = False
    self_cond: bool = False

    def validate(self) -> None:
        super().validate()
        check_conditioning_options(self)
        positive = {
            "dim": self.dim, "channels": self.channels, "attn_heads": self.attn_heads,
            "attn_dim_head": self.attn_dim_head, "resnet_groups": self.resnet_groups,
            "cond_dim": self.cond_dim, "out_dim": self.out_dim, "init_dim": self.init_dim,
        }
        for name, value in positive.items():
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim < 4 or self.dim % 2:
            raise ValueError(f"dim must be even and >= 4 (it sizes the timestep embedding), got {self.dim}")
        if (
            not isinstance(self.dim_mults, tuple)
            or not self.dim_mults
            or any(not is_int(m) or m < 1 for m in self.dim_mults)
        ):
            raise ValueError(f"dim_mults must be a non-empty tuple of positive ints, got {self.dim_mults!r}")
        if self.init_kernel_size < 1 or self.init_kernel_size % 2 == 0:
            raise ValueError(f"init_kernel_size must be odd and positive, got {self.init_kernel_size}")
        if not isinstance(self.block_type, str):
            raise TypeError(f"block_type must be a str (it is ignored), got {type(self.block_type).__name__}")
        if self.conv_type in _OLD_CONV_TYPES:
            new = _OLD_CONV_TYPES[self.conv_type]
            warnings.warn(f"Unet3D conv_type={self.conv_type!r} is now called {new!r}", FutureWarning, stacklevel=4)
            self.conv_type = new
        if self.conv_type not in CONV_TYPES:
            raise ValueError(f"conv_type must be one of {list(CONV_TYPES)}, got {self.conv_type!r}")
        if self.use_bert_text_cond and self.cond_dim not in (None, TEXT_ENCODER_DIM):
            raise ValueError(
                f"use_bert_text_cond=True fixes cond_dim to the text encoder's {TEXT_ENCODER_DIM}, "
                f"got cond_dim={self.cond_dim}"
            )
        if self.text_cross_attn and self.cond_dim is None and not self.use_bert_text_cond:
            raise ValueError("text_cross_attn=True needs a condition: set cond_dim or use_bert_text_cond=True")
        check_attn_backend(self.attn_backend)
        if self.max_time_distance < 9:
            raise ValueError(f"max_time_distance must be >= 9 (T5 buckets), got {self.max_time_distance}")
        init_dim = self.dim if self.init_dim is None else self.init_dim
        widths = sorted({init_dim, *(self.dim * m for m in self.dim_mults)})
        uneven = [w for w in widths if w % self.resnet_groups]
        if uneven:
            raise ValueError(
                f"every stage width must be a multiple of resnet_groups={self.resnet_groups} (group "
                f"norm), got widths {widths} from init_dim={init_dim}, dim={self.dim}, dim_mults={self.dim_mults}"
            )


PRESETS: dict[str, dict[str, object]] = {
    "debug": {"dim": 8, "dim_mults": (1, 2), "attn_heads": 2, "attn_dim_head": 8, "resnet_groups": 4,
              "init_kernel_size": 3},
    "small": {"dim": 32, "dim_mults": (1, 2, 4), "attn_heads": 4, "attn_dim_head": 32},
    "base": {"dim": 64, "dim_mults": (1, 2, 4, 8)},
}


# --------------------------------------------------------------------------------------------
# blocks. Every tensor inside the U-Net is a video (B, C, F, H, W); `enabled` is what
# spacetime.time.time_enabled returns: False, True, or a per-sample bool mask (B,).


def _resnet(dim_in: int, dim_out: int, *, emb_dim: int | None, cfg: Unet3DConfig) -> ResnetBlock:
    """The shared resnet block as video-diffusion-pytorch builds it: group norm (per frame),
    3x3 convs that are space-only ("spatial") or 3x3x3 ("full3d", off-centre taps zero)."""
    return ResnetBlock(dim_in, dim_out, emb_dim=emb_dim, conv="conv3d", norm="group", groups=cfg.resnet_groups,
                       temporal_kernel_size=3 if cfg.conv_type == "full3d" else 1)


class SpatialLinearAttention(nn.Module):
    """Pre-norm residual linear attention over the pixels of each frame (Shen et al. 2021,
    "Efficient Attention": softmax of q over features and of k over positions, so the cost is
    linear in H*W). video-diffusion-pytorch's "sparse linear attention" in the resnet stages."""

    def __init__(self, dim: int, *, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, _, _, h, w = x.shape
        tokens = self.norm(rearrange(x, "b c f h w -> (b f) (h w) c"))
        q, k, v = rearrange(self.to_qkv(tokens), "n l (qkv h d) -> qkv n h l d", qkv=3, h=self.heads)
        q = q.softmax(dim=-1) * self.scale
        k = k.softmax(dim=-2)
        context = torch.einsum("nhld,nhle->nhde", k, v)
        out = rearrange(torch.einsum("nhde,nhld->nhle", context, q), "n h l e -> n l (h e)")
        out = rearrange(self.to_out(out), "(b f) (h w) c -> b c f h w", b=b, h=h, w=w)
        return x + out


# The three full attentions below are the shared `spacetime.attention.Attention` with
# video-diffusion-pytorch's math (LayerNorm pre-norm, a fused `to_qkv` for self-attention, the
# context used as given, default-initialised outputs except over time); each only folds the
# video into tokens and adds the residual. Parameter names are those of Unet3D v1.


class PixelAttention(Attention):
    """Pre-norm residual full attention over the pixels of each frame (the middle block)."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, backend: str | None):
        super().__init__(dim, heads=heads, dim_head=dim_head, backend=backend, norm="layer", fused_qkv=True,
                         zero_out=False)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        b, _, _, h, w = x.shape
        out = super().forward(rearrange(x, "b c f h w -> (b f) (h w) c"))
        return x + rearrange(out, "(b f) (h w) c -> b c f h w", b=b, h=h, w=w)


class TextAttention(Attention):
    """Pre-norm residual attention from every pixel of every frame to the text tokens. Each
    query sees only the tokens, so frames stay independent (a spatial block). Position 0 of
    the context is the learned null token, always visible, so a sample whose tokens are all
    dropped (classifier-free guidance) or masked still has something to attend to."""

    def __init__(self, dim: int, context_dim: int, *, heads: int, dim_head: int, backend: str | None):
        super().__init__(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, backend=backend,
                         norm="layer", context_norm=False, zero_out=False)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:  # type: ignore[override]
        _, _, f, h, w = x.shape
        keep = rearrange(context_mask, "b l -> b 1 1 l")
        out = super().forward(rearrange(x, "b c f h w -> b (f h w) c"), context=context, bias=keep)
        return x + rearrange(out, "b (f h w) c -> b c f h w", f=f, h=h, w=w)


class FrameAttention(Attention):
    """Pre-norm residual attention over the frames at each pixel (Sec. 3: "attention over
    time"), with rotary embeddings on q and k plus the U-Net's shared T5 bias.

    Where time is off for a sample, its output is what attention over a single frame gives:
    softmax over one key is 1, so each frame's output is its own value. That path is computed
    for the whole batch and chosen per sample, so focusing is exactly frame-by-frame."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, rotary: RotaryEmbedding, backend: str | None):
        # Zero output (STYLE 12): at initialisation every frame is processed on its own, so
        # weights of an image-pretrained Unet3D are unchanged when first run on video.
        super().__init__(dim, heads=heads, dim_head=dim_head, backend=backend, norm="layer", fused_qkv=True)
        self.rotary = rotary  # shared, parameter-free
        mark_temporal(self)

    def forward(self, x: Tensor, pos_bias: Tensor, enabled: EnableTime) -> Tensor:  # type: ignore[override]
        b, _, f, h, w = x.shape
        tokens = rearrange(x, "b c f h w -> (b h w) f c")

        def video(out: Tensor) -> Tensor:
            return rearrange(out, "(b h w) f c -> b c f h w", b=b, h=h, w=w)

        if enabled is False:
            return x + video(self.values(tokens))
        mixed = video(super().forward(tokens, bias=pos_bias, rotary=self.rotary(f)))
        if enabled is True:
            return x + mixed
        return x + select_time(enabled, mixed, video(self.values(tokens)))


class Stage(nn.Module):
    """One U-Net resolution: two resnet blocks, spatial (linear) attention, optional
    cross-attention to the text, temporal attention; then a 2x down/upsampling in space only
    (Ho et al. keep every frame at every resolution, so `frame_multiple == 1`)."""

    def __init__(self, dim_in: int, dim_out: int, *, resample: nn.Module, emb_dim: int, context_dim: int | None,
                 cfg: Unet3DConfig, rotary: RotaryEmbedding):
        super().__init__()
        heads, dim_head, backend = cfg.attn_heads, cfg.attn_dim_head, cfg.attn_backend
        self.block1 = _resnet(dim_in, dim_out, emb_dim=emb_dim, cfg=cfg)
        self.block2 = _resnet(dim_out, dim_out, emb_dim=emb_dim, cfg=cfg)
        self.spatial_attn = (
            SpatialLinearAttention(dim_out, heads=heads, dim_head=dim_head) if cfg.use_sparse_linear_attn else None
        )
        self.cross_attn = (
            TextAttention(dim_out, context_dim, heads=heads, dim_head=dim_head, backend=backend)
            if context_dim is not None else None
        )
        self.temporal_attn = FrameAttention(dim_out, heads=heads, dim_head=dim_head, rotary=rotary, backend=backend)
        self.resample = resample

    def blocks(self, x: Tensor, emb: Tensor, ctx: tuple[Tensor, Tensor] | None, pos_bias: Tensor,
               enabled: EnableTime) -> Tensor:
        """Everything but the resampling (whose input is also the skip connection)."""
        x = self.block1(x, emb, enabled)
        x = self.block2(x, emb, enabled)
        if self.spatial_attn is not None:
            x = self.spatial_attn(x)
        if self.cross_attn is not None and ctx is not None:
            x = self.cross_attn(x, *ctx)
        return self.temporal_attn(x, pos_bias, enabled)


def _space_downsample(dim: int) -> nn.Module:
    # A strided 1x4x4 conv, as the reference: halves H and W of every frame separately.
    return nn.Conv3d(dim, dim, (1, 4, 4), (1, 2, 2), (0, 1, 1))


def _space_upsample(dim: int) -> nn.Module:
    return nn.ConvTranspose3d(dim, dim, (1, 4, 4), (1, 2, 2), (0, 1, 1))


# --------------------------------------------------------------------------------------------
# the U-Net


class Unet3D(UnetMixin, nn.Module):
    """Video Diffusion Models' U-Net. `forward(x, time, cond=None, ...)` maps a noisy video
    `(B, C, F, H, W)` or image `(B, C, H, W)` and its diffusion timesteps `(B,)` to a tensor of
    `out_dim` channels (default `channels`) shaped like `x`.

    Condition (`cond_dim`, or `use_bert_text_cond=True` for the default text encoder's 384):
    a pooled vector `(B, cond_dim)` joins the timestep embedding; token embeddings
    `(B, L, cond_dim)` with `cond_mask` `(B, L)` are pooled by masked mean and, with
    `text_cross_attn=True`, also attended to by every stage. `null_cond_prob` swaps the condition
    for a learned null embedding per sample (classifier-free guidance training)."""

    config_class = Unet3DConfig

    def __init__(self, *args: Any, **options: Any):
        """Options: the fields of `Unet3DConfig` (see `inspect.signature(Unet3D)`); the first
        thirteen may be passed by position, as in video-diffusion-pytorch."""
        super().__init__()
        cfg = Unet3DConfig.from_options(*args, **options)
        self.config = cfg
        dim, channels, out_dim, cond_dim = cfg.dim, cfg.channels, cfg.out_dim, cfg.cond_dim
        attn_heads, attn_dim_head, attn_backend = cfg.attn_heads, cfg.attn_dim_head, cfg.attn_backend
        use_bert_text_cond, text_cross_attn = cfg.use_bert_text_cond, cfg.text_cross_attn
        init_dim, init_kernel_size, max_time_distance = cfg.init_dim, cfg.init_kernel_size, cfg.max_time_distance
        self.channels = channels
        self.out_dim = channels if out_dim is None else out_dim
        self.cond_dim = TEXT_ENCODER_DIM if use_bert_text_cond else cond_dim
        self.has_cond = self.cond_dim is not None
        self.text_cross_attn = text_cross_attn
        init_dim = dim if init_dim is None else init_dim

        # Time: one T5 bias table and one rotary embedding shared by every temporal attention
        # (the reference's choice; frames are few, so distances past 32 share a bucket).
        self.rotary = RotaryEmbedding(max(2, min(32, attn_dim_head) // 2 * 2))
        self.time_rel_pos_bias = mark_temporal(RelativePositionBias(heads=attn_heads, max_distance=max_time_distance))

        def temporal_attn(width: int) -> FrameAttention:
            return FrameAttention(width, heads=attn_heads, dim_head=attn_dim_head, rotary=self.rotary,
                                     backend=attn_backend)

        pad = init_kernel_size // 2
        self.init_conv = nn.Conv3d(channels, init_dim, (1, init_kernel_size, init_kernel_size), padding=(0, pad, pad))
        self.init_temporal_attn = temporal_attn(init_dim)
        self.frame_cond_in = FrameCondInput(channels, init_dim) if cfg.frame_cond else None

        # Conditioning: timestep embedding (Sec. 2), concatenated with the pooled condition.
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(TimestepEmbedding(dim, time_dim), nn.Linear(time_dim, time_dim))
        self.fps_embed = FrameRateEmbedding(time_dim) if cfg.frame_rate_cond else None
        self.lowres = LowresCond(channels, init_dim, time_dim) if cfg.lowres_cond else None
        self.self_cond_in = SelfCondInput(channels, init_dim) if cfg.self_cond else None
        self.null_cond_emb = nn.Parameter(torch.randn(1, self.cond_dim)) if self.has_cond else None
        emb_dim = time_dim + (self.cond_dim or 0)
        context_dim = self.cond_dim if text_cross_attn else None

        dims = [init_dim, *(dim * m for m in cfg.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        last = len(in_out) - 1
        stage = dict(emb_dim=emb_dim, context_dim=context_dim, cfg=cfg, rotary=self.rotary)
        self.downs = nn.ModuleList(
            Stage(d_in, d_out, resample=_space_downsample(d_out) if i < last else nn.Identity(), **stage)
            for i, (d_in, d_out) in enumerate(in_out)
        )

        mid = dims[-1]
        self.mid_block1 = _resnet(mid, mid, emb_dim=emb_dim, cfg=cfg)
        self.mid_spatial_attn = PixelAttention(mid, heads=attn_heads, dim_head=attn_dim_head, backend=attn_backend)
        self.mid_cross_attn = (
            TextAttention(mid, context_dim, heads=attn_heads, dim_head=attn_dim_head, backend=attn_backend)
            if context_dim is not None else None
        )
        self.mid_temporal_attn = temporal_attn(mid)
        self.mid_block2 = _resnet(mid, mid, emb_dim=emb_dim, cfg=cfg)

        # Decoder stages take their input concatenated with the encoder's skip of equal size.
        self.ups = nn.ModuleList(
            Stage(d_out * 2, d_in, resample=_space_upsample(d_in) if i < last else nn.Identity(), **stage)
            for i, (d_in, d_out) in enumerate(reversed(in_out))
        )
        self.final_block = _resnet(init_dim * 2, init_dim, emb_dim=None, cfg=cfg)
        self.final_conv = nn.Conv3d(init_dim, self.out_dim, 1)
        # Weights of older layouts (unets.upgrade) load through plain load_state_dict too, as
        # trainer checkpoints and EMA copies do.
        self.register_load_state_dict_pre_hook(load_state_dict_pre_hook)

    # --- shape limits -------------------------------------------------------------------------

    @property
    def frame_multiple(self) -> int:
        """1: Ho et al. never downsample time, so any frame count works."""
        return 1

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.config.dim_mults) - 1)

    # --- forward ------------------------------------------------------------------------------

    @property
    def cond_format(self) -> str | None:
        """None without a condition, "tokens" with `text_cross_attn` (the tokens are attended
        to as well as pooled), else "pooled"."""
        if not self.has_cond:
            return None
        return "tokens" if self.text_cross_attn else "pooled"

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        time: Real[Tensor, " b"] | Real[Tensor, ""] | float | int,
        cond: Float[Tensor, "b d"] | Float[Tensor, "b l d"] | None = None,
        null_cond_prob: float | int = 0.0,
        focus_present_mask: Bool[Tensor, " b"] | None = None,
        prob_focus_present: float | int = 0.0,
        *,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        enable_time: bool | Bool[Tensor, " b"] = True,
        cond_frames: Tensor | None = None,
        cond_frame_mask: Tensor | None = None,
        fps: Tensor | float | int | None = None,
        lowres_cond: Tensor | None = None,
        lowres_noise_level: Tensor | float | int | None = None,
        self_cond: Tensor | None = None,
    ) -> Float[Tensor, "b c_out *frames h w"]:
        """`focus_present_mask` `(B,)` (True = attend to the present only) or, when None,
        `prob_focus_present` draws it per sample; a focused sample, like one with
        `enable_time` False, gets no mixing across its frames at all. `cond_frames` /
        `cond_frame_mask`: known frames (`frame_cond=True`, see `unets.frame_cond`);
        `lowres_cond` / `lowres_noise_level`: a super-resolution stage's input
        (`lowres_cond=True`, see `unets.lowres_cond`); `self_cond`: the previous x0 estimate,
        `x`'s shape (`self_cond=True`, see `unets.self_cond`)."""
        self.check_input(x, enable_time, self.channels)
        frame_cond = frame_cond_inputs("Unet3D", self.config.frame_cond, x, cond_frames, cond_frame_mask)
        lowres = lowres_cond_inputs("Unet3D", self.config.lowres_cond, x, lowres_cond, lowres_noise_level)
        estimate = self_cond_inputs("Unet3D", self.config.self_cond, x, self_cond)
        batch = x.shape[0]
        enabled = self._time_mixing(x, enable_time, focus_present_mask, prob_focus_present)
        is_image = x.ndim == 4
        if is_image:
            x = rearrange(x, "b c h w -> b c 1 h w")

        emb = self.time_mlp(self._timesteps(time, batch, x.device))
        emb = add_frame_rate(self.fps_embed, emb, fps, "Unet3D")
        emb = add_noise_level(self.lowres, emb, lowres)
        pooled, ctx = self._condition(cond, cond_mask, null_cond_prob, batch, x.device)
        if pooled is not None:
            emb = torch.cat((emb, pooled.to(emb.dtype)), dim=-1)
        pos_bias = self.time_rel_pos_bias(x.shape[2])

        x = self.init_conv(x)
        if self.frame_cond_in is not None and frame_cond is not None:
            x = self.frame_cond_in(x, frame_cond)
        x = add_lowres_features(self.lowres, x, lowres)
        x = add_self_cond_features(self.self_cond_in, x, estimate)
        x = self.checkpointed(self.init_temporal_attn, x, pos_bias, enabled)
        first = x

        skips = []
        for stage in self.downs:
            x = self.checkpointed(stage.blocks, x, emb, ctx, pos_bias, enabled)
            skips.append(x)
            x = stage.resample(x)

        x = self.checkpointed(self._middle, x, emb, ctx, pos_bias, enabled)

        for stage in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = self.checkpointed(stage.blocks, x, emb, ctx, pos_bias, enabled)
            x = stage.resample(x)

        x = self.final_block(torch.cat((x, first), dim=1), None, enabled)
        x = self.final_conv(x)
        return rearrange(x, "b c 1 h w -> b c h w") if is_image else x

    def _middle(self, x: Tensor, emb: Tensor, ctx: tuple[Tensor, Tensor] | None, pos_bias: Tensor,
                enabled: EnableTime) -> Tensor:
        x = self.mid_block1(x, emb, enabled)
        x = self.mid_spatial_attn(x)
        if self.mid_cross_attn is not None and ctx is not None:
            x = self.mid_cross_attn(x, *ctx)
        x = self.mid_temporal_attn(x, pos_bias, enabled)
        return self.mid_block2(x, emb, enabled)

    # --- inputs -------------------------------------------------------------------------------

    @staticmethod
    def _time_mixing(x: Tensor, enable_time: EnableTime, focus_present_mask: Tensor | None,
                     prob_focus_present: float) -> EnableTime:
        """Fold `enable_time` and focus-on-present into one per-sample switch: frames of a
        sample mix only if time is enabled for it and it is not focused on the present."""
        batch = x.shape[0]
        if not 0.0 <= prob_focus_present <= 1.0:
            raise ValueError(f"prob_focus_present must be in [0, 1], got {prob_focus_present}")
        if focus_present_mask is not None and (
            focus_present_mask.dtype != torch.bool or focus_present_mask.shape != (batch,)
        ):
            raise ValueError(
                f"focus_present_mask must be a bool tensor of shape ({batch},), got a "
                f"{focus_present_mask.dtype} tensor of shape {tuple(focus_present_mask.shape)}"
            )
        enabled = time_enabled(x, enable_time)
        if enabled is False:
            return False
        if focus_present_mask is None and prob_focus_present > 0:
            focus_present_mask = torch.rand(batch, device=x.device) < prob_focus_present
        if focus_present_mask is None:
            return enabled
        keep = ~focus_present_mask.to(x.device)
        return keep if enabled is True else enabled & keep

    @staticmethod
    def _timesteps(time: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
        if not isinstance(time, Tensor):
            return torch.full((batch,), float(time), device=device)
        if time.ndim == 0:
            time = time.expand(batch)
        if time.shape != (batch,):
            raise ValueError(f"time must be a scalar or have shape ({batch},), got shape {tuple(time.shape)}")
        # Integer timesteps are embedded as floats (the sinusoids need them anyway).
        return time.to(device=device, dtype=torch.float32)

    def _condition(
        self, cond: Tensor | None, cond_mask: Tensor | None, null_cond_prob: float, batch: int, device: torch.device
    ) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
        """(pooled condition `(B, cond_dim)` or None, cross-attention context and keep-mask or
        None). Dropped samples get the learned null embedding (Ho & Salimans 2022)."""
        if not self.has_cond:
            if cond is not None or cond_mask is not None:
                raise ValueError(
                    "this Unet3D was built without conditioning (cond_dim=None, use_bert_text_cond=False), "
                    f"got cond of shape {None if cond is None else tuple(cond.shape)}; build it with cond_dim"
                )
            return None, None
        keep = self.cond_keep_mask(batch, float(null_cond_prob), device)
        null = self.null_cond_emb
        if cond is None:
            if null_cond_prob != 1:
                raise ValueError(
                    f"cond is required: this Unet3D was built with cond_dim={self.cond_dim} (pass "
                    "null_cond_prob=1. for the unconditional output)"
                )
            tokens = repeat(null, "1 d -> b 1 d", b=batch)
            token_mask = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        else:
            if cond.ndim not in (2, 3) or cond.shape[0] != batch or cond.shape[-1] != self.cond_dim:
                raise ValueError(
                    f"cond must be ({batch}, {self.cond_dim}) or token embeddings ({batch}, L, {self.cond_dim}), "
                    f"got shape {tuple(cond.shape)}"
                )
            tokens = cond if cond.ndim == 3 else rearrange(cond, "b d -> b 1 d")
            if cond_mask is None:
                token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
            elif cond.ndim != 3 or cond_mask.shape != tokens.shape[:2] or cond_mask.dtype != torch.bool:
                raise ValueError(
                    f"cond_mask must be a bool tensor {tuple(tokens.shape[:2])} matching token embeddings "
                    f"(B, L, cond_dim), got a {cond_mask.dtype} tensor {tuple(cond_mask.shape)} for cond "
                    f"of shape {tuple(cond.shape)}"
                )
            else:
                token_mask = cond_mask
            if keep is not None:
                token_mask = token_mask & rearrange(keep, "b -> b 1")

        # Masked mean over real tokens (docs/design.md); a sample left with none uses the null.
        pooled, count = masked_mean(tokens, token_mask)
        pooled = torch.where(count > 0, pooled, null.to(tokens.dtype))
        if not self.text_cross_attn:
            return pooled, None
        context = torch.cat((repeat(null, "1 d -> b 1 d", b=batch).to(tokens.dtype), tokens), dim=1)
        context_mask = torch.cat((torch.ones(batch, 1, dtype=torch.bool, device=device), token_mask), dim=1)
        return pooled, (context, context_mask)
