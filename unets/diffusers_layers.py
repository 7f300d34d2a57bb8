"""Layers of the diffusers video U-Nets (ModelScope's `UNet3DConditionModel`, AnimateDiff's
`UNetMotionModel`), written for this library.

Module and parameter names are those of the diffusers classes, so a diffusers state dict is
this library's state dict key for key: the foreign format meets the library in
`unets/convert.py` and nowhere else. What differs is inside the layers:

- every attention goes through `spacetime.attend`, so the backend choice (context manager,
  `SPACETIME_ATTN_BACKEND`, a pinned `attn_backend`) and the batch chunking below CUDA's
  65,535 grid limit apply. Temporal attention folds `B*H*W` into the batch, which is what
  crashes diffusers' xformers path on large latents (xformers#845);
- temporal layers are marked (`spacetime.mark_temporal`) so `temporal_parameters()` is the
  part AnimateDiff / ModelScope fine-tuning trains;
- `enable_time` (bool or per-sample mask) switches the temporal layers off: a sample with
  time off is processed frame by frame, as an image U-Net would.

Activations run in diffusers' layout, frames folded into the batch: `(B*F, C, H, W)`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Real
from torch import Tensor, nn

from spacetime.attend import attend
from spacetime.layers import _GeluGate, is_plain_linear
from spacetime.params import mark_temporal
from spacetime.time import EnableTime, time_enabled
from unets.base import UnetMixin
from unets.frame_cond import add_frame_rate, frame_cond_inputs
from unets.lowres_cond import add_lowres_features, add_noise_level, lowres_cond_inputs
from unets.self_cond import add_self_cond_features, self_cond_inputs
# `_GroupNormSiLU` and `norm_silu` were defined here: still importable from here.
from unets.lean_ops import (  # noqa: F401
    _GroupNormSiLU,
    geglu_linear,
    lean_conv,
    norm_silu,
    norm_silu_conv,
    project_halves,
)

__all__ = [
    "CrossAttnTransformer",
    "Downsample2D",
    "FramePositions",
    "FrameTransformer",
    "ResnetBlock2D",
    "TemporalConvStack",
    "TimestepEmbedding",
    "Upsample2D",
    "context_tokens",
    "frame_mask",
    "keep_time",
    "timestep_features",
]


def timestep_features(t: Tensor, dim: int, *, flip_sin_to_cos: bool = True, shift: float = 0.0,
                      max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of the diffusion timestep (DDPM, Ho et al. 2020, after Vaswani et
    al. 2017), in the order and frequency spacing of the pretrained ModelScope / SD U-Nets:
    `[cos | sin]` with frequencies `max_period ** (-i / (half - shift))`."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t.float()[:, None] * exponent.exp()[None]
    sin, cos = args.sin(), args.cos()
    emb = torch.cat((cos, sin) if flip_sin_to_cos else (sin, cos), dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the timestep features (names as diffusers')."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def frame_mask(enabled: Tensor, frames: int) -> Tensor:
    """A per-sample time mask `(B,)` repeated for the frames folded into the batch `(B*F,)`."""
    return enabled.repeat_interleave(frames)


def keep_time(enabled: EnableTime, frames: int, with_time: Tensor, without_time: Tensor) -> Tensor:
    """`with_time` where time is on, `without_time` where off, for `(B*F, ...)` activations."""
    if isinstance(enabled, bool):
        return with_time if enabled else without_time
    mask = frame_mask(enabled, frames).view(-1, *([1] * (with_time.ndim - 1)))
    return torch.where(mask, with_time, without_time)


def _dropping(dropout: nn.Dropout) -> float:
    """The probability a dropout layer drops with now: its `p` in training mode, else 0."""
    return float(dropout.p) if dropout.training else 0.0


class ResnetBlock2D(nn.Module):
    """The SD / LDM resnet block: GroupNorm, SiLU, 3x3 conv, plus the projected time
    embedding added per channel, then GroupNorm, SiLU, dropout, 3x3 conv, and a 1x1 shortcut
    when the width changes; `(x + h) / output_scale_factor`. Spatial (frames independent)."""

    def __init__(self, dim_in: int, dim_out: int, *, emb_dim: int, groups: int, eps: float,
                 output_scale_factor: float | int = 1.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim_in, eps=eps)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, dim_out)
        self.norm2 = nn.GroupNorm(groups, dim_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else None
        self.output_scale_factor = float(output_scale_factor)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = norm_silu_conv(self.norm1, x, self.conv1.weight, self.conv1.bias)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = norm_silu_conv(self.norm2, h, self.conv2.weight, self.conv2.bias, dropout=_dropping(self.dropout))
        shortcut = x if self.conv_shortcut is None else lean_conv(self.conv_shortcut, x)
        out = shortcut + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """3x3 conv with stride 2 (`padding` as the checkpoint's `downsample_padding`)."""

    def __init__(self, dim: int, *, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return lean_conv(self.conv, x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to the skip's size), then a 3x3 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return lean_conv(self.conv, x)


class TemporalConvStack(nn.Module):
    """ModelScope's temporal conv layer: four (GroupNorm, SiLU, [dropout], 3x1x1 conv over
    frames) in a row, added to the input. The last conv starts at zero, so the stack starts
    as the identity (STYLE 12). Sequential indices match the checkpoints' keys."""

    def __init__(self, dim: int, *, groups: int, dropout: float = 0.1):
        super().__init__()

        def conv() -> nn.Conv3d:
            return nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0))

        self.conv1 = nn.Sequential(nn.GroupNorm(groups, dim), nn.SiLU(), conv())
        self.conv2 = nn.Sequential(nn.GroupNorm(groups, dim), nn.SiLU(), nn.Dropout(dropout), conv())
        self.conv3 = nn.Sequential(nn.GroupNorm(groups, dim), nn.SiLU(), nn.Dropout(dropout), conv())
        self.conv4 = nn.Sequential(nn.GroupNorm(groups, dim), nn.SiLU(), nn.Dropout(dropout), conv())
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)
        mark_temporal(self)

    @staticmethod
    def _run(seq: nn.Sequential, h: Tensor) -> Tensor:
        # A 3x1x1 Conv3d is a 3x1 Conv2d over (frames, pixels): same weights viewed without
        # the last axis, and on CPU the 2-D kernel is the fast one (Conv3d falls back to a
        # slow reference path), so this runs the checkpoint's Conv3d as a Conv2d.
        norm, conv = seq[0], seq[-1]
        dropout = _dropping(seq[2]) if len(seq) == 4 else 0.0  # conv1 has no dropout
        return norm_silu_conv(norm, h, conv.weight.squeeze(-1), conv.bias, padding=(1, 0), dropout=dropout)

    def forward(self, x: Tensor, frames: int, enabled: EnableTime) -> Tensor:
        if enabled is False:
            return x
        _, _, height, width = x.shape
        video = rearrange(x, "(b f) c h w -> b c f (h w)", f=frames)
        h = video
        for seq in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = self._run(seq, h)
        out = rearrange(video + h, "b c f (h w) -> (b f) c h w", h=height, w=width)
        return keep_time(enabled, frames, out, x)


class AttentionLayer(nn.Module):
    """q/k/v projections (no bias), `spacetime.attend`, output projection (`to_out.0`),
    scaled by `dim_head ** -0.5`. `context_dim` None makes it self-attention."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, context_dim: int | None = None,
                 backend: str | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.backend = backend
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def _fusable(self, x: Tensor) -> bool:
        """Whether q, k and v can come from one matmul: plain linears (a LoRA wrapper or a
        hook must see its own call) and at least three times as many tokens as channels.
        With fewer (a deep level of a large U-Net on a small latent) copying the weights
        together costs more than it saves, and backward keeps the copy."""
        projections = (self.to_q, self.to_k, self.to_v)
        return all(map(is_plain_linear, projections)) and x.numel() >= sum(m.weight.numel() for m in projections)

    def forward(self, x: Tensor, context: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        if context is None and self._fusable(x):
            # Self-attention: the three projections as one matmul (one pass over `x`, one
            # backward node), q, k and v views of its output.
            weights = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
            projected = F.linear(x, torch.cat(weights)).chunk(3, -1)
        else:
            context = x if context is None else context
            projected = (self.to_q(x), self.to_k(context), self.to_v(context))
        q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=self.heads) for t in projected)
        # prefer_fused: these weights were trained with fused SDPA and it is what diffusers
        # runs; on CPU `auto` would otherwise pick math for some shapes (~20% slower here).
        out = attend(q, k, v, keep, backend=self.backend, prefer_fused=True)
        return self.to_out[0](rearrange(out, "n h l d -> n l (h d)"))


class GEGLUFeedForward(nn.Module):
    """Shazeer 2020's GEGLU feed-forward, width `mult * dim` (keys `net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([_GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: Tensor) -> Tensor:
        # value * gelu(gate) and the output projection in one op that keeps only the input
        # projection for backward (`unets.lean_ops`).
        return geglu_linear(x, self.net[0].proj, self.net[2])


class _GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        # value * gelu(gate), saving only the projection for backward (spacetime's GEGLU op):
        # plain autograd would also keep gelu(gate), the largest activation of the block.
        return _GeluGate.apply(*project_halves(x, self.proj))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: attention, second attention (cross-attention to the text tokens
    when `context_dim` is set, else a second self-attention), GEGLU feed-forward."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, context_dim: int | None,
                 backend: str | None, max_frames: int | None = None):
        super().__init__()
        self.pos_embed = FramePositions(dim, max_frames) if max_frames is not None else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = AttentionLayer(dim, heads=heads, dim_head=dim_head, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = AttentionLayer(dim, heads=heads, dim_head=dim_head, context_dim=context_dim, backend=backend)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: Tensor, context: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h if self.pos_embed is None else self.pos_embed(h))
        h = self.norm2(x)
        if context is None:
            x = x + self.attn2(h if self.pos_embed is None else self.pos_embed(h))
        else:
            x = x + self.attn2(h, context, keep)
        return x + self.ff(self.norm3(x))


class FramePositions(nn.Module):
    """AnimateDiff's frame positions: fixed sinusoids (Vaswani et al. 2017, Sec. 3.5) added to
    the normed input of each attention. Kept as a saved buffer (`pe`, shape `(1, max_frames,
    dim)`) because the motion-module checkpoints carry it."""

    def __init__(self, dim: int, max_frames: int):
        super().__init__()
        position = torch.arange(max_frames, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_frames, dim)
        pe[0, :, 0::2] = torch.sin(position * div)
        pe[0, :, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)

    def forward(self, h: Tensor) -> Tensor:
        frames = h.shape[1]
        if frames > self.pe.shape[1]:
            raise ValueError(
                f"this motion module has frame positions for at most {self.pe.shape[1]} frames, got {frames}"
            )
        return h + self.pe[:, :frames].to(h.dtype)


class CrossAttnTransformer(nn.Module):
    """SD's spatial transformer (diffusers' `Transformer2DModel`, linear projections): each
    frame's pixels attend to each other and to the text tokens. Spatial."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, context_dim: int, groups: int,
                 backend: str | None = None, linear_projection: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        # SD 1.x checkpoints project with 1x1 convs, SD 2.x and ModelScope with linears: the
        # same map, stored under the same names with different shapes.
        self.proj_in = nn.Linear(dim, inner) if linear_projection else nn.Conv2d(dim, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads=heads, dim_head=dim_head, context_dim=context_dim, backend=backend)]
        )
        self.proj_out = nn.Linear(inner, dim) if linear_projection else nn.Conv2d(inner, dim, 1)

    def forward(self, x: Tensor, context: Tensor, keep: Tensor | None) -> Tensor:
        _, _, height, width = x.shape
        # SD 1.x's 1x1 conv projections run as linears over the tokens (the same map): autograd
        # keeps a linear's input only when its weight trains, a conv's always, and the tokens
        # come out contiguous for the block's LayerNorms.
        h = F.linear(rearrange(self.norm(x), "n c h w -> n (h w) c"), _as_linear(self.proj_in.weight),
                     self.proj_in.bias)
        for block in self.transformer_blocks:
            h = block(h, context, keep)
        h = F.linear(h, _as_linear(self.proj_out.weight), self.proj_out.bias)
        return x + rearrange(h, "n (h w) c -> n c h w", h=height, w=width)


def _as_linear(weight: Tensor) -> Tensor:
    """A linear's weight, or a 1x1 conv's as one: `(out, in, 1, 1)` -> `(out, in)`."""
    return weight.flatten(1) if weight.ndim == 4 else weight


class FrameTransformer(nn.Module):
    """Attention over the frames at each pixel (diffusers' `TransformerTemporalModel`, and
    AnimateDiff's motion module when `max_frames` adds sinusoidal frame positions). Two
    self-attentions and a feed-forward per block; `(B*H*W)` sequences of `F` frames go to
    `spacetime.attend`, which splits that batch below the kernels' grid limit."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, groups: int, layers: int = 1,
                 norm_eps: float = 1e-6, max_frames: int | None = None, backend: str | None = None):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, dim, eps=norm_eps)
        self.proj_in = nn.Linear(dim, inner)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads=heads, dim_head=dim_head, context_dim=None, backend=backend,
                              max_frames=max_frames)
             for _ in range(layers)]
        )
        self.proj_out = nn.Linear(inner, dim)
        mark_temporal(self)

    def forward(self, x: Tensor, frames: int, enabled: EnableTime) -> Tensor:
        if enabled is False:
            return x
        n, _, height, width = x.shape
        video = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
        h = rearrange(self.norm(video), "b c f h w -> (b h w) f c")
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        out = x + rearrange(h, "(b h w) f c -> (b f) c h w", h=height, w=width)
        return keep_time(enabled, frames, out, x)


def context_tokens(model: UnetMixin, cond: Tensor | None, cond_mask: Tensor | None, null_cond_prob: float | int,
                   x: Tensor, *, dim: int) -> tuple[Tensor, Tensor | None]:
    """The text tokens `(B, L, dim)` for the cross-attentions and their keep mask `(B, 1, 1, L)`
    (None = all kept). `model` decides which samples drop their condition
    (`cond_keep_mask`, which batched guidance overrides). The null condition (`cond=None`, and samples dropped with probability
    `null_cond_prob` for classifier-free guidance) is all-zero tokens: with bias-free key and
    value projections they give every query the same output whatever the prompt and length.
    The pretrained models guide with the empty prompt's tokens instead, passed as `cond`."""
    batch = x.shape[0]
    if cond is None:
        if cond_mask is not None:
            raise ValueError("cond_mask was given without cond")
        return x.new_zeros(batch, 1, dim), None
    if cond.ndim == 2:
        cond = cond[:, None]
    if cond.ndim != 3 or cond.shape[0] != batch or cond.shape[-1] != dim:
        raise ValueError(f"cond must be (B={batch}, L, {dim}) tokens or a (B, {dim}) vector, "
                         f"got shape {tuple(cond.shape)}")
    cond = cond.to(x.dtype)
    keep = None
    if cond_mask is not None:
        if cond_mask.dtype != torch.bool or cond_mask.shape != cond.shape[:2]:
            raise ValueError(f"cond_mask must be a bool tensor of shape {tuple(cond.shape[:2])}, "
                             f"got a {cond_mask.dtype} tensor of shape {tuple(cond_mask.shape)}")
        # A sample with every token masked attends to all of them (zeroed below), not to none.
        empty = ~cond_mask.any(dim=1, keepdim=True)
        cond = cond * cond_mask[..., None].to(cond.dtype)
        keep = (cond_mask | empty)[:, None, None, :]
    kept = model.cond_keep_mask(batch, float(null_cond_prob), x.device)
    if kept is not None:
        cond = cond * kept[:, None, None].to(cond.dtype)
        if keep is not None:
            keep = keep | ~kept[:, None, None, None]
    return cond, keep


class DiffusersLayoutUnet(UnetMixin, nn.Module):
    """What ModelScope's and AnimateDiff's U-Nets share: diffusers' SD-style skeleton of down
    stages, a mid stage and up stages with skip connections (built by `build_stages` from
    each model's own stage classes), the output head, and the common U-Net surface. The
    subclasses add their input layers, their stages and `forward`."""

    def build_stages(self, stage: type[nn.Module], mid_stage: type[nn.Module], emb_dim: int) -> None:
        """`down_blocks`, `mid_block`, `up_blocks`, `conv_norm_out` and `conv_out` from
        `self.config`, with diffusers' module names and widths."""
        c = self.config
        widths = c.block_out_channels
        levels = len(widths)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(c.down_block_types):
            dims_in = [widths[max(i - 1, 0)]] + [widths[i]] * (c.layers_per_block - 1)
            self.down_blocks.append(stage(c, dims_in=dims_in, dim_out=widths[i], emb_dim=emb_dim,
                                          cross=kind.startswith("CrossAttn"),
                                          resample="down" if i < levels - 1 else None))
        self.mid_block = mid_stage(c, widths[-1], emb_dim)
        self.up_blocks = nn.ModuleList()
        reversed_widths = list(reversed(widths))
        for i, kind in enumerate(c.up_block_types):
            dim_out = reversed_widths[i]
            prev = reversed_widths[max(i - 1, 0)]
            skip_in = reversed_widths[min(i + 1, levels - 1)]
            # The layer j of an up stage takes the previous layer's output (or the stage below)
            # concatenated with the matching down activation, the last one the stage's input.
            dims_in = [
                (prev if j == 0 else dim_out) + (skip_in if j == c.layers_per_block else dim_out)
                for j in range(c.layers_per_block + 1)
            ]
            self.up_blocks.append(stage(c, dims_in=dims_in, dim_out=dim_out, emb_dim=emb_dim,
                                        cross=kind.startswith("CrossAttn"),
                                        resample="up" if i < levels - 1 else None))
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, widths[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels or c.channels, 3, padding=1)

    def after_conv_in(self, h: Tensor, frames: int, enabled: EnableTime) -> Tensor:
        """The features after the input convolution, before the down stages: unchanged here."""
        return h

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        time: Real[Tensor, " b"] | Real[Tensor, ""] | float | int,
        cond: Float[Tensor, "b l d"] | Float[Tensor, "b d"] | None = None,
        null_cond_prob: float | int = 0.0,
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
        """`cond` `(B, L, cond_dim)` text tokens (a `(B, cond_dim)` vector is one token),
        `cond_mask` `(B, L)` True = attend; `null_cond_prob` replaces a sample's tokens by
        the null token with that probability (classifier-free guidance training)."""
        self.check_input(x, enable_time, self.channels)
        frame_cond = frame_cond_inputs(type(self).__name__, self.config.frame_cond, x, cond_frames, cond_frame_mask)
        lowres = lowres_cond_inputs(type(self).__name__, self.config.lowres_cond, x, lowres_cond, lowres_noise_level)
        estimate = self_cond_inputs(type(self).__name__, self.config.self_cond, x, self_cond)
        # Channels-last input (a VAE's latents are) makes GroupNorm's CPU backward crash in
        # torch 2.13 when the input needs no gradient, the rule in temporal-only training.
        x = x.contiguous()
        batch = x.shape[0]
        enabled = time_enabled(x, enable_time)
        if x.ndim == 4:
            x = rearrange(x, "b c h w -> b c 1 h w")
            video = False
        else:
            video = True
        frames = x.shape[2]

        if not isinstance(time, Tensor):
            time = torch.full((batch,), float(time), device=x.device)
        time = time.expand(batch) if time.ndim == 0 else time
        emb = self.time_embedding(timestep_features(time, self.config.block_out_channels[0]).to(x.dtype))
        emb = add_frame_rate(self.fps_embed, emb, fps, type(self).__name__)
        emb = add_noise_level(self.lowres, emb, lowres)
        ctx, keep = context_tokens(self, cond, cond_mask, null_cond_prob, x, dim=self.config.cond_dim)
        emb = emb.repeat_interleave(frames, dim=0)
        ctx = ctx.repeat_interleave(frames, dim=0)
        keep = None if keep is None else keep.repeat_interleave(frames, dim=0)

        h = self.conv_in(rearrange(x, "b c f h w -> (b f) c h w"))
        if self.frame_cond_in is not None and frame_cond is not None:
            h = self.frame_cond_in(h, frame_cond)
        h = add_lowres_features(self.lowres, h, lowres)
        h = add_self_cond_features(self.self_cond_in, h, estimate)
        h = self.after_conv_in(h, frames, enabled)
        skips = [h]
        for stage in self.down_blocks:
            for i in range(len(stage.resnets)):
                h = self.checkpointed(stage.layer, i, h, emb, ctx, keep, frames, enabled)
                skips.append(h)
            if stage.downsamplers is not None:
                h = stage.downsamplers[0](h)
                skips.append(h)
        h = self.checkpointed(self.mid_block, h, emb, ctx, keep, frames, enabled)
        for stage in self.up_blocks:
            for i in range(len(stage.resnets)):
                h = torch.cat((h, skips.pop()), dim=1)
                h = self.checkpointed(stage.layer, i, h, emb, ctx, keep, frames, enabled)
            if stage.upsamplers is not None:
                h = stage.upsamplers[0](h, tuple(skips[-1].shape[-2:]))
        h = norm_silu_conv(self.conv_norm_out, h, self.conv_out.weight, self.conv_out.bias)
        out = rearrange(h, "(b f) c h w -> b c f h w", f=frames)
        return out if video else out[:, :, 0]

    def save_diffusers(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Write a folder the matching diffusers class loads with `from_pretrained`
        (`UNet3DConditionModel` for ModelScope, `MotionAdapter` for AnimateDiff by default; see
        `unets.convert.save_diffusers`); returns it."""
        from unets.convert import save_diffusers

        return save_diffusers(self, path, **kwargs)

    @property
    def cond_format(self) -> str:
        return "tokens"

    @property
    def frame_multiple(self) -> int:
        return 1

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)
