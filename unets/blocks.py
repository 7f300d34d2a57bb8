"""The block registry, and the blocks U-Nets share.

U-Nets are assembled from named blocks, looked up in explicit tables (one per kind), so a
config refers to a block by name (`"pseudo3d"`, `"conv3d"`) and users can add their own with
`register_block(kind, name, factory)` without editing the library. Each kind has one factory
signature, and every block's forward takes `enable_time` (a bool or a per-sample bool mask):

    conv        factory(dim_in, dim_out, kernel_size, *, temporal_kernel_size=None,
                        causal_time=False)                     forward(x, enable_time=True)
    resnet      factory(dim_in, dim_out, *, emb_dim=None, conv="pseudo3d", norm="rms",
                        groups=8, temporal_kernel_size=None)
                                                    forward(x, emb=None, enable_time=True)
    attention   factory(dim, *, dim_head, heads, ff_mult, pos_bias, flash, causal_time_attn,
                        context_dim=None)
                    forward(x, enable_time=True, *, context=None, context_mask=None)
    downsample  factory(dim, *, time)                          forward(x, enable_time=True)
    upsample    factory(dim, *, time)                          forward(x, enable_time=True)

Built-in entries that live in `spacetime/` are lazy `"module:Attr"` references, resolved on
first use. This file also holds the shared blocks: `TimestepEmbedding`, `TextPool`, `ResnetBlock`
(the one resnet block: make-a-video-pytorch's, with the conv kind and the norm selectable, RMS
or video-diffusion-pytorch's group norm) with its `ConvNormAct` halves, and `Conv3dBlock` (a full 3D conv
whose off-centre temporal taps start at zero, so it starts as a per-frame 2D conv).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from spacetime.layers import RMSNorm
from spacetime.params import mark_temporal
from spacetime.position import sinusoidal_features
from spacetime.time import EnableTime, select_time, time_enabled
from spacetime.checks import check_choice, check_int, did_you_mean

__all__ = [
    "BLOCK_KINDS",
    "Conv3dBlock",
    "ConvNormAct",
    "FrameGroupNorm",
    "NORMS",
    "ResnetBlock",
    "TextPool",
    "TimestepEmbedding",
    "available_blocks",
    "get_block",
    "register_block",
]

# --------------------------------------------------------------------------------------
# registry

BLOCK_KINDS = ("conv", "resnet", "attention", "downsample", "upsample")

_BLOCKS: dict[str, dict[str, Callable[..., nn.Module] | str]] = {kind: {} for kind in BLOCK_KINDS}


def register_block(
    kind: str, name: str, factory: Callable[..., nn.Module] | str, *, overwrite: bool = False
) -> Callable[..., nn.Module] | str:
    """Add block `name` of `kind` (one of `BLOCK_KINDS`); `factory` follows that kind's
    signature (module docstring) or is a lazy `"module:Attr"` reference. Returns `factory`."""
    if kind not in _BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}{did_you_mean(kind, BLOCK_KINDS)}; kinds are {list(BLOCK_KINDS)}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"block name must be a non-empty string, got {name!r}")
    if not (callable(factory) or isinstance(factory, str)):
        raise TypeError(f"block factory must be callable or a 'module:Attr' string, got {factory!r}")
    if name in _BLOCKS[kind] and not overwrite:
        raise ValueError(f"a {kind} block named {name!r} is already registered; pass overwrite=True to replace it")
    _BLOCKS[kind][name] = factory
    return factory


def get_block(kind: str, name: str) -> Callable[..., nn.Module]:
    """The factory registered as `name` under `kind`; unknown names raise `ValueError`."""
    if kind not in _BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}{did_you_mean(kind, BLOCK_KINDS)}; kinds are {list(BLOCK_KINDS)}")
    table = _BLOCKS[kind]
    if name not in table:
        raise ValueError(f"unknown {kind} block {name!r}{did_you_mean(name, table)}; available: {sorted(table)}")
    factory = table[name]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        table[name] = factory
    return factory  # type: ignore[return-value]


def available_blocks(kind: str | None = None) -> dict[str, list[str]] | list[str]:
    """Registered block names: for one `kind`, or `{kind: names}` for all."""
    if kind is None:
        return {k: sorted(v) for k, v in _BLOCKS.items()}
    if kind not in _BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}{did_you_mean(kind, BLOCK_KINDS)}; kinds are {list(BLOCK_KINDS)}")
    return sorted(_BLOCKS[kind])


def check_block_name(kind: str, name: str) -> None:
    """Raise `ValueError` unless `name` is registered under `kind` (for config validation)."""
    if kind in _BLOCKS and name not in _BLOCKS[kind]:
        raise ValueError(
            f"unknown {kind} block {name!r}{did_you_mean(name, _BLOCKS[kind])}; available: {sorted(_BLOCKS[kind])}"
        )


# --------------------------------------------------------------------------------------
# shared blocks


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the diffusion timestep (Vaswani et al. 2017, sec. 3.5, as in
    DDPM), then Linear + SiLU to `emb_dim`. Not to be confused with the video's frame axis."""

    def __init__(self, dim: int, emb_dim: int, theta: float = 10000.0):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"timestep embedding dim must be even and >= 4, got {dim}")
        self.dim = dim
        half = dim // 2
        # Frequencies span [1, 1/theta] geometrically, endpoints included (hence half - 1).
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(theta) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(dim, emb_dim)

    def forward(self, t: Float[Tensor, " b"]) -> Float[Tensor, "b e"]:
        return F.silu(self.proj(sinusoidal_features(t, self.freqs)))


POOLINGS = ("mean", "attention")


def masked_mean(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """`(mean (B, D), count (B, 1))` of tokens `(B, L, D)` over the True entries of `mask`
    `(B, L)`; a sample with no real token gets a zero mean (not NaN) and count 0."""
    weights = mask.to(tokens.dtype)[..., None]
    count = weights.sum(dim=1)
    return (tokens * weights).sum(dim=1) / count.clamp(min=1.0), count


class TextPool(nn.Module):
    """Pools condition tokens `(B, L, D)` with a key mask `(B, L)` into one vector `(B, D)`.

    `"mean"`: the masked mean. `"attention"`: the masked mean plus a learned-query attention
    pooling (Imagen, Saharia et al. 2022, sec. 2.2 and appendix F, pools T5 tokens this way for
    the vector added to the timestep embedding): `heads` learned queries attend over the
    LayerNorm-ed tokens, and their outputs are projected back to `D` by a zero-initialised
    linear map, so the block starts as the mean. The mean of a sentence embedder's tokens
    barely moves when one word changes ("down and to the left" / "... right": cosine 0.99
    for MiniLM), while attention can pick out that word."""

    def __init__(self, dim: int, kind: str = "mean", *, heads: int = 4, dim_head: int = 32):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"cond_pool must be one of {list(POOLINGS)}, got {kind!r}")
        self.kind = kind
        if kind == "attention":
            self.heads, self.dim_head = heads, dim_head
            self.norm = nn.LayerNorm(dim)
            self.query = nn.Parameter(torch.randn(heads, dim_head) * dim_head**-0.5)
            self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
            self.to_out = nn.Linear(heads * dim_head, dim)
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def forward(self, tokens: Float[Tensor, "b l d"], mask: Tensor) -> Float[Tensor, "b d"]:
        mean, _ = masked_mean(tokens, mask)
        if self.kind == "mean":
            return mean
        k, v = rearrange(self.to_kv(self.norm(tokens)), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        logits = torch.einsum("hd,bhld->bhl", self.query.to(k.dtype), k) * self.dim_head**-0.5
        # An all-padding row attends to nothing: its logits stay finite (no NaN), its weights
        # are then set to zero.
        logits = logits.masked_fill(~mask[:, None, :], torch.finfo(logits.dtype).min)
        attn = logits.softmax(dim=-1) * mask[:, None, :].any(dim=-1, keepdim=True).to(logits.dtype)
        pooled = torch.einsum("bhl,bhld->bhd", attn, v)
        return mean + self.to_out(rearrange(pooled, "b h d -> b (h d)"))


# The norms a resnet block can use. "rms": make-a-video-pytorch's RMS norm over channels.
# "group": GroupNorm with `groups` groups, as video-diffusion-pytorch's blocks use, its
# statistics taken per frame (a 3D GroupNorm would pool every frame's statistics, so frames
# would exchange information even with time mixing turned off).
NORMS = ("rms", "group")


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm of each frame, then an optional FiLM `(scale, shift)` as
    `y * (scale + 1) + shift` and SiLU: the same call as `RMSNorm`'s, so the resnet block
    treats both norms alike. Parameters are `nn.GroupNorm`'s (`weight`, `bias`)."""

    def forward(  # type: ignore[override]
        self,
        x: Float[Tensor, "b c *f h w"],
        scale_shift: tuple[Tensor, Tensor] | None = None,
        *,
        silu: bool = False,
    ) -> Float[Tensor, "b c *f h w"]:
        if x.ndim == 5:
            b = x.shape[0]
            x = rearrange(super().forward(rearrange(x, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", b=b)
        else:
            x = super().forward(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = torch.addcmul(shift, x, scale + 1)
        return F.silu(x) if silu else x


class ConvNormAct(nn.Module):
    """conv -> norm -> optional FiLM (scale, shift) -> SiLU: one half of the resnet block.
    `conv` names a conv block kind (`temporal_kernel_size`, when given, is passed to it),
    `norm` one of `NORMS`."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        conv: str,
        *,
        norm: str = "rms",
        groups: int = 8,
        temporal_kernel_size: int | None = None,
    ):
        super().__init__()
        check_choice("norm", norm, NORMS)
        conv_options = {} if temporal_kernel_size is None else {"temporal_kernel_size": temporal_kernel_size}
        self.project = get_block("conv", conv)(dim_in, dim_out, 3, **conv_options)
        if norm == "rms":
            self.norm: nn.Module = RMSNorm(dim_out, axis=1)
        else:
            check_int("groups", groups, low=1)
            if dim_out % groups:
                raise ValueError(
                    f"group norm needs dim_out divisible by groups, got dim_out={dim_out}, groups={groups}"
                )
            self.norm = FrameGroupNorm(groups, dim_out)

    def forward(
        self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None, enable_time: EnableTime
    ) -> Tensor:
        # With RMS norm, norm, FiLM and SiLU are one autograd node that saves only the conv output.
        return self.norm(self.project(x, enable_time=enable_time), scale_shift, silu=True)


class ResnetBlock(nn.Module):
    """The resnet block of every U-Net here: two (conv, norm, SiLU) with the embedding
    applied as scale and shift after the first norm (FiLM, as in Ho et al. 2022 / Imagen),
    plus a 1x1 residual projection when the width changes.

    Options: `conv` names the conv block kind (both convs are 3x3; `temporal_kernel_size`
    goes to the conv block when given); `norm` is `"rms"` (make-a-video-pytorch's block,
    the default) or `"group"` with `groups` (video-diffusion-pytorch's, as Unet3D uses)."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        emb_dim: int | None = None,
        conv: str = "pseudo3d",
        norm: str = "rms",
        groups: int = 8,
        temporal_kernel_size: int | None = None,
    ):
        super().__init__()
        unit = dict(norm=norm, groups=groups, temporal_kernel_size=temporal_kernel_size)
        self.emb_proj = nn.Linear(emb_dim, dim_out * 2) if emb_dim is not None else None
        self.block1 = ConvNormAct(dim_in, dim_out, conv, **unit)
        self.block2 = ConvNormAct(dim_out, dim_out, conv, **unit)
        self.res_conv = get_block("conv", conv)(dim_in, dim_out, 1) if dim_in != dim_out else None

    def forward(
        self,
        x: Float[Tensor, "b c *f h w"],
        emb: Float[Tensor, "b e"] | None = None,
        enable_time: EnableTime = True,
    ) -> Float[Tensor, "b d *f h w"]:
        if (emb is None) != (self.emb_proj is None):
            raise ValueError(
                f"this block was built with emb_dim={'None' if self.emb_proj is None else self.emb_proj.in_features} "
                f"but was called with emb={'None' if emb is None else tuple(emb.shape)}"
            )
        scale_shift = None
        if self.emb_proj is not None:
            film = self.emb_proj(F.silu(emb))
            film = film.view(*film.shape, *([1] * (x.ndim - 2)))
            scale_shift = film.chunk(2, dim=1)
        h = self.block1(x, scale_shift, enable_time)
        h = self.block2(h, None, enable_time)
        res = x if self.res_conv is None else self.res_conv(x, enable_time=enable_time)
        return h + res


class _TemporalTaps(nn.Module):
    """The off-centre temporal taps of a `Conv3dBlock` (marked temporal)."""

    def __init__(self, dim_in: int, dim_out: int, taps: int, kernel_size: int):
        super().__init__()
        # Zero: at initialisation the 3D conv is exactly the per-frame 2D conv (STYLE 12).
        self.weight = nn.Parameter(torch.zeros(dim_out, dim_in, taps, kernel_size, kernel_size))


class Conv3dBlock(nn.Module):
    """A full 3D convolution (Ho et al. 2022 use 3x3x3 convs in space-time U-Nets), stored as
    its centre temporal slice (a 2D conv, spatial) plus off-centre taps (temporal, zero at
    init). With time disabled, or for images, only the centre slice runs: that is exactly
    what a zero-padded 3D conv does on a single frame, so image and video paths agree."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int | None = None,
        kernel_size: int = 3,
        *,
        temporal_kernel_size: int | None = None,
        causal_time: bool = False,
    ):
        super().__init__()
        dim_out = dim_in if dim_out is None else dim_out
        kt = kernel_size if temporal_kernel_size is None else temporal_kernel_size
        if kernel_size % 2 == 0 or kt % 2 == 0 and not causal_time:
            raise ValueError(
                f"Conv3dBlock kernel sizes must be odd (same padding), got kernel_size={kernel_size}, "
                f"temporal_kernel_size={kt}"
            )
        self.kernel_size, self.temporal_kernel_size, self.causal_time = kernel_size, kt, causal_time
        self.spatial = nn.Conv2d(dim_in, dim_out, kernel_size, padding=kernel_size // 2)
        # Causal: the centre tap is the last one (no look-ahead); otherwise the middle one.
        self.centre = kt - 1 if causal_time else kt // 2
        self.temporal = mark_temporal(_TemporalTaps(dim_in, dim_out, kt - 1, kernel_size)) if kt > 1 else None

    def _per_frame(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            return self.spatial(x)
        b = x.shape[0]
        out = self.spatial(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(out, "(b f) c h w -> b c f h w", b=b)

    def forward(
        self, x: Float[Tensor, "b c *f h w"], enable_time: EnableTime = True
    ) -> Float[Tensor, "b d *f h w"]:
        enabled = time_enabled(x, enable_time)
        if self.temporal is None or enabled is False:
            return self._per_frame(x)
        w2 = self.spatial.weight.unsqueeze(2)
        taps = self.temporal.weight
        weight = torch.cat((taps[:, :, : self.centre], w2, taps[:, :, self.centre :]), dim=2)
        pad_s = self.kernel_size // 2
        if self.causal_time:
            x_p = F.pad(x, (pad_s, pad_s, pad_s, pad_s, self.temporal_kernel_size - 1, 0))
            out = F.conv3d(x_p, weight, self.spatial.bias)
        else:
            out = F.conv3d(x, weight, self.spatial.bias, padding=(self.temporal_kernel_size // 2, pad_s, pad_s))
        if isinstance(enabled, bool):
            return out
        return select_time(enabled, out, self._per_frame(x))


# --------------------------------------------------------------------------------------
# adapters from the spacetime layers to the kind signatures


def _pixel_shuffle_down(dim: int, *, time: bool) -> nn.Module:
    from spacetime.layers import Downsample

    return Downsample(dim, downsample_space=True, downsample_time=time)


def _pixel_shuffle_up(dim: int, *, time: bool) -> nn.Module:
    from spacetime.layers import Upsample

    return Upsample(dim, upsample_space=True, upsample_time=time)


def _spatio_temporal_attention(dim: int, *, ff_mult: int | float = 4, **kwargs: Any) -> nn.Module:
    from spacetime.attention import SpatioTemporalAttention

    return SpatioTemporalAttention(dim, ff_mult=ff_mult, **kwargs)


register_block("conv", "pseudo3d", "spacetime.conv:PseudoConv3d")
register_block("conv", "conv3d", Conv3dBlock)
register_block("resnet", "resnet", ResnetBlock)
register_block("attention", "spatio_temporal", _spatio_temporal_attention)
register_block("downsample", "pixel_shuffle", _pixel_shuffle_down)
register_block("upsample", "pixel_shuffle", _pixel_shuffle_up)
