"""Factorised space-time attention (Ho et al. 2022, "Video Diffusion Models", Sec. 3; used by
Make-A-Video, Singer et al. 2022, Sec. 3.2): self-attention over the pixels of each frame, then
optionally cross-attention to text tokens, then self-attention over the frames at each pixel,
then a feed-forward. Every sub-block is pre-normed and residual, and the attention output
projections start at zero, so a new block is the identity.

Layers compute q, k, v, the folding of space or time into the batch and the position encoding,
then call `spacetime.attend`, which picks the kernel. Internally the blocks work on contiguous
channels-last tokens `(B, F, H, W, C)`: the spatial fold `(b f) (h w) c` is then a free view and
the temporal fold one copy of C channels.

Position encodings, by `pos_bias`:

============  ==================================  ======================================
pos_bias      space (2D, per frame)               time (1D, per pixel)
============  ==================================  ======================================
True /        ContinuousPositionBias, 2D          ContinuousPositionBias, 1D
"continuous"  (make-a-video's default)            (make-a-video's default)
"t5"          ContinuousPositionBias, 2D          RelativePositionBias (T5 buckets;
                                                  causal buckets if causal_time_attn)
"rotary"      axial 2D RotaryEmbedding on q, k    1D RotaryEmbedding on q, k
False         none                                none
============  ==================================  ======================================

The continuous biases use a hidden width of `dim // 2` as make-a-video does. Rotary adds no
bias, so it keeps bias-free fused kernels (flash) usable; it rotates the first
`dim_head` (rounded down to a multiple of 4 in space, 2 in time) features of each head.
"""

from __future__ import annotations

from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from spacetime.attend import attend
from spacetime.checks import check_choice
from spacetime.layers import FeedForward, RMSNorm, check_input, from_tokens, to_tokens
from spacetime.params import mark_temporal
from spacetime.position import (
    ContinuousPositionBias,
    RelativePositionBias,
    RotaryEmbedding,
    apply_rotary,
)
from spacetime.time import EnableTime, select_time, time_enabled

__all__ = [
    "Attention",
    "PosBias",
    "SpatialAttention",
    "SpatioTemporalAttention",
    "TemporalAttention",
    "position_kind",
]


# Checked by `position_kind` (a clear ValueError) rather than by a Literal annotation.
PosBias = bool | str


def position_kind(pos_bias: PosBias) -> str | None:
    """Normalise `pos_bias` to None, "continuous", "t5" or "rotary"."""
    if pos_bias is True:
        return "continuous"
    if pos_bias is False:
        return None
    if pos_bias in ("continuous", "t5", "rotary"):
        return pos_bias
    raise ValueError(
        f"pos_bias must be a bool or one of 'continuous', 't5', 'rotary', got {pos_bias!r}"
    )


def _rotary_dim(dim_head: int, num_dims: int) -> int:
    rot_dim = dim_head - dim_head % (2 * num_dims)
    if rot_dim == 0:
        raise ValueError(
            f"pos_bias='rotary' needs dim_head >= {2 * num_dims} for {num_dims}D positions, "
            f"got dim_head={dim_head}"
        )
    return rot_dim


# Pre-norms `Attention` can use, by name; each takes the width.
_NORMS = {"rms": lambda dim: RMSNorm(dim, axis=-1), "layer": nn.LayerNorm}


class Attention(nn.Module):
    """Multi-head attention on tokens `(B, N, dim)`: RMSNorm pre-norm, bias-free `to_q` and
    `to_kv` (one projection to keys and values), `attend`, zero-initialised `to_out`.
    Returns the update (no residual). With `context_dim`, keys and values come from a
    `context` `(B, M, context_dim)` (RMS-normed) instead: cross-attention.

    make-a-video's `Attention` has the same parameter names and shapes (`norm.gamma`,
    `to_q.weight`, `to_kv.weight`, `to_out.weight`).

    Options for other U-Nets' math (video-diffusion-pytorch's attention): `norm="layer"`
    (LayerNorm instead of RMSNorm), `context_norm=False` (the context is used as given),
    `fused_qkv=True` (one `to_qkv` projection, self-attention only) and `zero_out=False` (keep
    the default init of `to_out`)."""

    def __init__(
        self,
        dim: int,
        *,
        dim_head: int = 64,
        heads: int = 8,
        context_dim: int | None = None,
        causal: bool = False,
        backend: str | None = None,
        prefer_fused: bool = False,
        norm: str = "rms",
        context_norm: bool = True,
        fused_qkv: bool = False,
        zero_out: bool = True,
    ):
        super().__init__()
        if dim < 1 or dim_head < 1 or heads < 1:
            raise ValueError(
                f"Attention needs dim, dim_head and heads >= 1, got dim={dim}, "
                f"dim_head={dim_head}, heads={heads}"
            )
        check_choice("norm", norm, _NORMS)
        if fused_qkv and context_dim is not None:
            raise ValueError(f"fused_qkv=True projects q, k and v from x: it takes no context_dim, got {context_dim}")
        inner = dim_head * heads
        self.heads = heads
        self.causal = causal
        self.backend = backend
        self.prefer_fused = prefer_fused
        self.context_dim = context_dim
        self.norm = _NORMS[norm](dim)
        if context_dim is None:
            self.context_norm = None
        else:
            self.context_norm = _NORMS[norm](context_dim) if context_norm else nn.Identity()
        if fused_qkv:
            self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        else:
            self.to_q = nn.Linear(dim, inner, bias=False)
            self.to_kv = nn.Linear(dim if context_dim is None else context_dim, inner * 2, bias=False)
        self.fused_qkv = fused_qkv
        self.to_out = nn.Linear(inner, dim, bias=False)
        if zero_out:
            nn.init.zeros_(self.to_out.weight)

    def values(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b n d"]:
        """What attention to a single key gives (softmax over one key is 1): each token's own
        projected value. Self-attention only."""
        if self.context_norm is not None:
            raise ValueError("values() is self-attention's single-key output; this Attention has a context")
        x = self.norm(x)
        inner = self.to_out.in_features
        v = self.to_qkv(x)[..., 2 * inner:] if self.fused_qkv else self.to_kv(x)[..., inner:]
        return self.to_out(v)

    def forward(
        self,
        x: Float[Tensor, "b n d"],
        *,
        context: Float[Tensor, "b m dc"] | None = None,
        bias: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Float[Tensor, "b n d"]:
        """`bias` broadcastable to `(b, heads, n, m)` (float: added to the logits; bool: keep
        mask); `rotary` the `(cos, sin)` of a `RotaryEmbedding` (self-attention only)."""
        if (context is None) != (self.context_norm is None):
            raise ValueError(
                "Attention built with context_dim needs a context, and one built without takes "
                f"none; got context_dim={self.context_dim} and context="
                f"{None if context is None else tuple(context.shape)}"
            )
        x = self.norm(x)
        source = x if self.context_norm is None else self.context_norm(context)
        if self.fused_qkv:
            q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        else:
            q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
            k, v = rearrange(self.to_kv(source), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = attend(q, k, v, bias, causal=self.causal, backend=self.backend, prefer_fused=self.prefer_fused)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class SpatialAttention(nn.Module):
    """Residual self-attention over the `H x W` pixels of each frame independently, with the
    spatial position encoding chosen by `pos_bias` (see the module docstring). Spatial
    parameters only. `forward` takes images or videos; `enable_time` is accepted for a uniform
    layer interface and has no effect.

    make-a-video names: `spatial_attn.*` -> `attn.*`, `spatial_rel_pos_bias.net.*` ->
    `pos_bias.net.*` (see `ContinuousPositionBias`)."""

    def __init__(
        self,
        dim: int,
        *,
        dim_head: int = 64,
        heads: int = 8,
        pos_bias: PosBias = True,
        backend: str | None = None,
    ):
        super().__init__()
        kind = position_kind(pos_bias)
        self.dim = dim
        self.attn = Attention(dim, dim_head=dim_head, heads=heads, backend=backend)
        self.pos_bias = (
            ContinuousPositionBias(dim=max(dim // 2, 1), heads=heads, num_dims=2)
            if kind in ("continuous", "t5")
            else None
        )
        self.rotary = (
            RotaryEmbedding(_rotary_dim(dim_head, 2), num_dims=2) if kind == "rotary" else None
        )

    def tokens_forward(self, t: Tensor) -> Tensor:
        """Channels-last tokens `(B, F, H, W, C)` -> same, with the attention update added."""
        _, _, h, w, _ = t.shape
        bias = None if self.pos_bias is None else self.pos_bias(h, w)
        rotary = None if self.rotary is None else self.rotary(h, w)
        out = self.attn(rearrange(t, "b f h w c -> (b f) (h w) c"), bias=bias, rotary=rotary)
        return t + out.view(t.shape)

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        enable_time: bool | Bool[Tensor, "b"] = True,
    ) -> Float[Tensor, "b c *frames h w"]:
        check_input(x, self.dim, "SpatialAttention")
        return from_tokens(self.tokens_forward(to_tokens(x)), x.ndim)


class TemporalAttention(nn.Module):
    """Residual self-attention over the frames at each pixel (causal if `causal`), with the
    temporal position encoding chosen by `pos_bias` (see the module docstring). Identity at
    init (zero output projection); marked temporal, its position bias included. Images and
    samples with time disabled pass through unchanged. This is the module `inflate()` places
    after a third-party spatial attention block.

    make-a-video names: `temporal_attn.*` -> `attn.*`, `temporal_rel_pos_bias.net.*` ->
    `pos_bias.net.*` (see `ContinuousPositionBias`)."""

    def __init__(
        self,
        dim: int,
        *,
        dim_head: int = 64,
        heads: int = 8,
        pos_bias: PosBias = True,
        causal: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        kind = position_kind(pos_bias)
        self.dim = dim
        self.attn = Attention(dim, dim_head=dim_head, heads=heads, causal=causal, backend=backend)
        self.pos_bias: nn.Module | None = None
        if kind == "continuous":
            self.pos_bias = ContinuousPositionBias(dim=max(dim // 2, 1), heads=heads, num_dims=1)
        elif kind == "t5":
            self.pos_bias = RelativePositionBias(heads=heads, causal=causal)
        self.rotary = RotaryEmbedding(_rotary_dim(dim_head, 1)) if kind == "rotary" else None
        mark_temporal(self)

    def tokens_forward(self, t: Tensor, enabled: EnableTime) -> Tensor:
        """Channels-last tokens `(B, F, H, W, C)`, `enabled` from `time_enabled`."""
        if enabled is False:
            return t
        b, f, h, w, _ = t.shape
        bias = None if self.pos_bias is None else self.pos_bias(f)
        rotary = None if self.rotary is None else self.rotary(f)
        out = self.attn(rearrange(t, "b f h w c -> (b h w) f c"), bias=bias, rotary=rotary)
        # Added straight from the strided view: no copy back to the (b f h w) layout.
        updated = t + rearrange(out, "(b h w) f c -> b f h w c", b=b, h=h, w=w)
        return select_time(enabled, updated, t)

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        enable_time: bool | Bool[Tensor, "b"] = True,
    ) -> Float[Tensor, "b c *frames h w"]:
        check_input(x, self.dim, "TemporalAttention")
        enabled = time_enabled(x, enable_time)
        if enabled is False:
            return x
        return from_tokens(self.tokens_forward(to_tokens(x), enabled), x.ndim)


class SpatioTemporalAttention(nn.Module):
    """Make-A-Video's factorised attention block, on images `(B, C, H, W)` or videos
    `(B, C, F, H, W)`:

    1. `spatial`: residual self-attention over the pixels of each frame;
    2. `cross` (only with `context_dim`): residual cross-attention from every pixel of every
       frame to `context` tokens `(B, L, context_dim)`, keys masked by `context_mask` `(B, L)`
       (True = real token); all frames of a sample share its context. A sample whose mask is
       all False gets no update. `context=None` skips this step;
    3. `temporal`: residual self-attention over frames at each pixel (causal if
       `causal_time_attn`), skipped for images and where `enable_time` is False;
    4. `ff` (if `add_feed_forward`): residual `FeedForward(dim, ff_mult)`. Its token shift
       over time (`ff_token_shift`, on by default as in make-a-video) mixes each frame with
       the previous one where time is enabled; turn it off for a block that is exactly
       frame-wise while its temporal parameters are at init.

    `pos_bias`: see the module docstring. `backend` names an `AttentionBackend` and pins every
    attention here to it; None (the default) leaves the choice to the `attention_backend()`
    context, then SPACETIME_ATTN_BACKEND, then `auto`. `flash=True` (make-a-video's name) asks
    for a fused kernel: it only changes what `auto` tries first (fused kernels before math on
    every device; on CUDA they come first anyway), never what a context or the environment
    variable decide. make-a-video refuses flash with a bias; here auto finds a fused kernel
    that takes one where the device has it.

    Parameters: `temporal` (attention and its position bias) is temporal; `spatial`, `cross`
    and `ff` are spatial. make-a-video state-dict names map as `spatial_attn.*` ->
    `spatial.attn.*`, `spatial_rel_pos_bias.*` -> `spatial.pos_bias.*`, `temporal_attn.*` ->
    `temporal.attn.*`, `temporal_rel_pos_bias.*` -> `temporal.pos_bias.*`, `ff.*` -> `ff.*`
    (with the renames listed in `ContinuousPositionBias` and `FeedForward`)."""

    def __init__(
        self,
        dim: int,
        *,
        dim_head: int = 64,
        heads: int = 8,
        add_feed_forward: bool = True,
        ff_mult: int | float = 4,
        pos_bias: PosBias = True,
        flash: bool = False,
        causal_time_attn: bool = False,
        context_dim: int | None = None,
        backend: str | None = None,
        ff_token_shift: bool = True,
    ):
        super().__init__()
        self.flash = flash
        self.dim = dim
        self.context_dim = context_dim
        self.spatial = SpatialAttention(
            dim, dim_head=dim_head, heads=heads, pos_bias=pos_bias, backend=backend
        )
        self.cross = (
            None
            if context_dim is None
            else Attention(
                dim, dim_head=dim_head, heads=heads, context_dim=context_dim, backend=backend
            )
        )
        self.temporal = TemporalAttention(
            dim,
            dim_head=dim_head,
            heads=heads,
            pos_bias=pos_bias,
            causal=causal_time_attn,
            backend=backend,
        )
        self.ff = (
            FeedForward(dim, ff_mult, token_shift=ff_token_shift) if add_feed_forward else None
        )
        for attention in (self.spatial.attn, self.temporal.attn, self.cross):
            if attention is not None:
                attention.prefer_fused = flash

    def _check_context(self, b: int, context: Tensor | None, context_mask: Tensor | None) -> None:
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without context")
            return
        if self.context_dim is None:
            raise ValueError(
                "context was given but this SpatioTemporalAttention has no cross-attention; "
                "build it with context_dim"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must be (B={b}, L, context_dim={self.context_dim}) tokens, got shape "
                f"{tuple(context.shape)} (a pooled (B, D) vector is one token: unsqueeze(1))"
            )
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(
                f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])}, got "
                f"shape {tuple(context_mask.shape)}"
            )

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        enable_time: bool | Bool[Tensor, "b"] = True,
        *,
        context: Float[Tensor, "b l dc"] | None = None,
        context_mask: Bool[Tensor, "b l"] | None = None,
    ) -> Float[Tensor, "b c *frames h w"]:
        check_input(x, self.dim, "SpatioTemporalAttention")
        self._check_context(x.shape[0], context, context_mask)
        enabled = time_enabled(x, enable_time)
        t = self.spatial.tokens_forward(to_tokens(x))
        if self.cross is not None and context is not None:
            t = t + self._cross(t, context, context_mask)
        t = self.temporal.tokens_forward(t, enabled)
        if self.ff is not None:
            t = t + self.ff.tokens_forward(t, enabled)
        return from_tokens(t, x.ndim)

    def _cross(self, t: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        # Queries do not interact in cross-attention, so all frames of a sample fold into one
        # query sequence: the sample's keys/values are computed once, never repeated per frame.
        if context_mask is None:
            out = self.cross(rearrange(t, "b f h w c -> b (f h w) c"), context=context)
            return out.view(t.shape)
        has_tokens = context_mask.any(dim=-1)
        # An all-False row would softmax over nothing (NaN); let it attend everywhere and zero
        # its update below instead.
        keep = context_mask | ~has_tokens[:, None]
        out = self.cross(
            rearrange(t, "b f h w c -> b (f h w) c"), context=context, bias=keep[:, None, None, :]
        )
        return out.view(t.shape) * has_tokens.view(-1, 1, 1, 1, 1).to(out.dtype)
