"""Small space-time building blocks: RMSNorm, GEGLU feed-forward with token shift, and the
pixel-(un)shuffle Downsample / Upsample of make-a-video-pytorch (space, and optionally time).

Every layer takes an image `(B, C, H, W)` or a video `(B, C, F, H, W)` plus `enable_time`
(a bool or a bool tensor `(B,)`, see `spacetime.time`); an image is one frame with time off.

Make-A-Video compatibility: with their defaults these layers compute the same functions as
make-a-video-pytorch 0.4.0 with parameters of the same shapes (1x1 convolutions appear here as
`nn.Linear`, i.e. without their trailing 1x1x1 kernel dims). Each class docstring lists the
parameter-name correspondence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from jaxtyping import Bool, Float
from torch import Tensor, nn

from spacetime.params import mark_temporal
from spacetime.time import select_time, time_enabled

__all__ = [
    "Downsample",
    "FeedForward",
    "GEGLU",
    "RMSNorm",
    "Upsample",
    "check_input",
    "from_tokens",
    "to_tokens",
    "token_shift",
]


def check_input(x: Tensor, channels: int, layer: str) -> None:
    """Raise a ValueError unless `x` is an image `(B, C, H, W)` or video `(B, C, F, H, W)`
    with `C == channels`."""
    if x.ndim not in (4, 5):
        raise ValueError(
            f"{layer} expects an image (B, C, H, W) or a video (B, C, F, H, W), got a tensor "
            f"with {x.ndim} dims of shape {tuple(x.shape)}"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{layer} was built for {channels} channels, got {x.shape[1]} channels "
            f"(input shape {tuple(x.shape)}, channels on dim 1)"
        )


def to_tokens(x: Tensor) -> Tensor:
    """`(B, C, [F,] H, W)` -> contiguous channels-last `(B, F, H, W, C)` (F = 1 for images).

    The attention blocks work channels-last so that spatial attention needs no copy at all
    (`(b f) (h w) c` is a view) and the temporal fold is one copy of C channels rather than of
    q, k and v."""
    if x.ndim == 4:
        return rearrange(x, "b c h w -> b 1 h w c").contiguous()
    return rearrange(x, "b c f h w -> b f h w c").contiguous()


def from_tokens(t: Tensor, ndim: int) -> Tensor:
    """Inverse of `to_tokens` for an input that had `ndim` dims (contiguous channels-first)."""
    if ndim == 4:
        return rearrange(t, "b 1 h w c -> b c h w").contiguous()
    return rearrange(t, "b f h w c -> b c f h w").contiguous()


_EPS_SQ = 1e-24  # F.normalize clamps the norm at 1e-12, i.e. the sum of squares at 1e-24


class _RMSNormAct(torch.autograd.Function):
    """RMS norm, then optional FiLM `y * (scale + 1) + shift`, then optional SiLU, saving only
    the input and the per-position sum of squares for backward.

    Autograd through the plain expression saves every intermediate: the input, `x * factor`,
    the normed output, the FiLM output (SiLU's input) - four full-size activations per resnet
    half-block, the largest share of a U-Net's training memory. Here backward recomputes the
    cheap elementwise chain from the input instead; the forward no longer writes those
    tensors, so the step is no slower (measured on CPU, fp32). No double backward."""

    @staticmethod
    def forward(ctx, x, gamma, scale, shift, axis, dim_scale, silu):  # type: ignore[override]
        gamma_b = gamma.view(-1, *([1] * (x.ndim - 1 - axis)))
        stat_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        sum_sq = x.to(stat_dtype).square().sum(axis, keepdim=True)
        factor = (sum_sq.clamp_min(_EPS_SQ).rsqrt() * dim_scale).to(x.dtype)
        # No autograd inside forward, so the chain runs in place on one buffer.
        out = x * factor
        out.mul_(gamma_b)
        if scale is not None:
            out.mul_(scale + 1).add_(shift)
        if silu:
            F.silu(out, inplace=True)
        ctx.save_for_backward(x, gamma, scale, shift, sum_sq)
        ctx.axis, ctx.dim_scale, ctx.silu = axis, dim_scale, silu
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, gamma, scale, shift, sum_sq = ctx.saved_tensors
        axis, dim_scale = ctx.axis, ctx.dim_scale
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xc, grad = x.to(compute), grad_out.to(compute)
        gamma_b = gamma.to(compute).view(-1, *([1] * (x.ndim - 1 - axis)))
        factor = sum_sq.clamp_min(_EPS_SQ).rsqrt() * dim_scale
        normed = xc * factor
        film = normed * gamma_b
        grad_scale = grad_shift = None
        if ctx.silu:
            pre = film if scale is None else torch.addcmul(shift.to(compute), film, scale.to(compute) + 1)
            sig = torch.sigmoid(pre)
            # d silu(z) / dz = sig(z) * (1 + z * (1 - sig(z)))
            grad = grad * sig * (1 + pre * (1 - sig))
        if scale is not None:
            if ctx.needs_input_grad[3]:
                grad_shift = grad.sum_to_size(shift.shape).to(shift.dtype)
            if ctx.needs_input_grad[2]:
                grad_scale = (grad * film).sum_to_size(scale.shape).to(scale.dtype)
            grad = grad * (scale.to(compute) + 1)
        grad_gamma = None
        if ctx.needs_input_grad[1]:
            grad_gamma = (grad * normed).sum_to_size(gamma_b.shape).reshape(gamma.shape).to(gamma.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * gamma_b
            # n = x * c / ||x||  =>  dx = f * (dn - n * <n, dn> / c^2), f = c / ||x||; the
            # second term vanishes where the norm is clamped (F.normalize's gradient there).
            dot = (grad_normed * normed).sum(axis, keepdim=True) / dim_scale**2
            dot = torch.where(sum_sq > _EPS_SQ, dot, 0.0)
            grad_x = (factor * (grad_normed - normed * dot)).to(x.dtype)
        return grad_x, grad_gamma, grad_scale, grad_shift, None, None, None


class RMSNorm(nn.Module):
    """`x / ||x|| * sqrt(C) * gamma` over one axis (make-a-video's formulation: `F.normalize`
    with its eps of 1e-12, no mean subtraction, no bias).

    `axis=1` normalises the channels of `(B, C, ...)` tensors, `axis=-1` those of tokens
    `(..., C)`. make-a-video name: `gamma` (same).

    `forward(x, scale_shift=None, *, silu=False)` can also apply a FiLM `(scale, shift)`
    (`y * (scale + 1) + shift`, both broadcastable to `x`) and a SiLU after the norm, as
    the resnet blocks do: one fused autograd node that saves only `x` (see `_RMSNormAct`)."""

    def __init__(self, dim: int, *, axis: int = 1):
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm dim must be >= 1, got {dim}")
        self.axis = axis
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(
        self,
        x: Float[Tensor, "..."],
        scale_shift: tuple[Tensor, Tensor] | None = None,
        *,
        silu: bool = False,
    ) -> Float[Tensor, "..."]:
        axis = self.axis % x.ndim
        if x.shape[axis] != self.gamma.shape[0]:
            raise ValueError(
                f"RMSNorm was built for {self.gamma.shape[0]} features on axis {self.axis}, got "
                f"shape {tuple(x.shape)}"
            )
        scale, shift = (None, None) if scale_shift is None else scale_shift
        # Statistics in fp32 for half inputs (squares overflow fp16, and 1e-24 underflows it);
        # one reduction and a multiply by the per-position factor, no full-size division.
        return _RMSNormAct.apply(x, self.gamma, scale, shift, axis, self.scale, silu)


class _GeluGate(torch.autograd.Function):
    """`value * gelu(gate)`, saving only `value` and `gate`: autograd through the expression
    also keeps `gelu(gate)`, half as large again, which backward recomputes here for one
    elementwise pass."""

    @staticmethod
    def forward(ctx, value, gate):  # type: ignore[override]
        ctx.save_for_backward(value, gate)
        return value * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        value, gate = ctx.saved_tensors
        grad_value = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_value = grad_out * F.gelu(gate)
        if ctx.needs_input_grad[1]:
            grad_gate = torch.ops.aten.gelu_backward(grad_out * value, gate)
        return grad_value, grad_gate


def is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` is exactly an `nn.Linear` without hooks, so that a layer may use its
    weight directly (slice it, concatenate it with others) instead of calling it. A LoRA
    wrapper or a hook must see its own call."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def project_halves(x: Tensor, proj: nn.Module) -> tuple[Tensor, Tensor]:
    """`proj(x).chunk(2, -1)` as two contiguous tensors, each from its half of the weight:
    GELU and its backward on the strided half of one output run at about half the speed on
    CPU, and backward gets the two gradients without concatenating them. A projection that
    is not a plain linear (`is_plain_linear`) is called as itself."""
    if not is_plain_linear(proj):
        value, gate = proj(x).chunk(2, dim=-1)
        return value, gate
    inner = proj.weight.shape[0] // 2
    bias = proj.bias
    return (F.linear(x, proj.weight[:inner], None if bias is None else bias[:inner]),
            F.linear(x, proj.weight[inner:], None if bias is None else bias[inner:]))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer"): one bias-free
    projection to `2 * dim_out` features split into value and gate, `value * gelu(gate)`.
    Works on the last axis. make-a-video: `proj_in.0` (a 1x1x1 Conv3d) -> `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=False)

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d_out"]:
        value, gate = project_halves(x, self.proj)
        if not torch.is_grad_enabled():
            # Inference: GELU and the product overwrite this call's own temporaries.
            return value.mul_(torch.ops.aten.gelu_(gate))
        return _GeluGate.apply(value, gate)


def token_shift(t: Tensor) -> Tensor:
    """Token shift over time (Zhang et al. 2021, "Token Shift Transformer"): of channels-last
    tokens `(B, F, H, W, C)`, the last `C // 2` channels of each frame are replaced by those of
    the previous frame (zeros for the first frame). Same split as make-a-video's
    `shift_token` (`chunk(2)`: the first `ceil(C / 2)` channels stay)."""
    keep = (t.shape[-1] + 1) // 2
    stay, shift = t[..., :keep], t[..., keep:]
    # Negative right padding drops the last frame: frame i now holds frame i - 1.
    shift = F.pad(shift, (0, 0, 0, 0, 0, 0, 1, -1))
    return torch.cat((stay, shift), dim=-1)


class FeedForward(nn.Module):
    """Make-A-Video's feed-forward: GEGLU up-projection, token shift over time, RMSNorm (the
    NormFormer extra norm), projection back to `dim`. Returns the update (no residual).

    `inner_dim = int(dim * mult * 2 / 3)` keeps the parameter count of a plain `mult` MLP.
    `token_shift=True` (make-a-video's behaviour) shifts half the hidden channels by one frame
    when time is enabled; it is parameter-free, so the feed-forward's parameters stay spatial
    but the layer does mix neighbouring frames. With `token_shift=False` the layer acts on each
    frame independently.

    make-a-video names: `proj_in.0.weight` -> `proj_in.proj.weight`, `proj_out.0.gamma` ->
    `norm.gamma`, `proj_out.1.weight` -> `proj_out.weight` (drop the 1x1x1 kernel dims)."""

    def __init__(self, dim: int, mult: int | float = 4, *, token_shift: bool = True):
        super().__init__()
        inner_dim = int(dim * mult * 2 / 3)
        if inner_dim < 1:
            raise ValueError(
                f"FeedForward needs int(dim * mult * 2 / 3) >= 1, got dim={dim}, mult={mult}"
            )
        self.dim = dim
        self.token_shift = token_shift
        self.proj_in = GEGLU(dim, inner_dim)
        self.norm = RMSNorm(inner_dim, axis=-1)
        self.proj_out = nn.Linear(inner_dim, dim, bias=False)

    def tokens_forward(self, t: Tensor, enabled: bool | Tensor) -> Tensor:
        """The update for channels-last tokens `(B, F, H, W, C)`; `enabled` as returned by
        `spacetime.time.time_enabled`."""
        hidden = self.proj_in(t)
        if self.token_shift and enabled is not False:
            hidden = select_time(enabled, token_shift(hidden), hidden)
        return self.proj_out(self.norm(hidden))

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        enable_time: bool | Bool[Tensor, "b"] = True,
    ) -> Float[Tensor, "b c *frames h w"]:
        check_input(x, self.dim, "FeedForward")
        enabled = time_enabled(x, enable_time)
        return from_tokens(self.tokens_forward(to_tokens(x), enabled), x.ndim)


def _all_or_none(enabled: bool | Tensor, layer: str) -> bool:
    """A frame-count-changing layer cannot honour a per-sample mask (one output tensor holds
    one frame count), so a tensor mask must be all True or all False."""
    if isinstance(enabled, bool):
        return enabled
    on = bool(enabled.all())
    if not on and bool(enabled.any()):
        raise ValueError(
            f"{layer} changes the number of frames, so enable_time must be the same for every "
            f"sample; got a mixed per-sample mask {enabled.tolist()}. Split the batch, or use "
            "a Python bool."
        )
    return on


class Downsample(nn.Module):
    """Pixel-unshuffle downsampling by 2 in space (and by 2 in time if `downsample_time`),
    each followed by a bias-free 1x1 projection back to `dim` channels and optional SiLU, as in
    make-a-video. Time is downsampled only when time is enabled; `enable_time` must then be a
    bool or a tensor that is all True or all False (a mixed mask raises ValueError, since the
    samples would need different frame counts; the check reads the mask, so use a Python bool
    under `torch.compile(fullgraph=True)`). The time projection is a temporal parameter.

    make-a-video names: `down_space.1.weight` -> `down_space.weight`, `down_time.1.weight` ->
    `down_time.weight` (identical shapes)."""

    def __init__(
        self,
        dim: int,
        downsample_space: bool = True,
        downsample_time: bool = False,
        nonlin: bool = False,
    ):
        super().__init__()
        if not (downsample_space or downsample_time):
            raise ValueError("Downsample needs downsample_space or downsample_time (got neither)")
        self.dim = dim
        self.down_space = nn.Conv2d(dim * 4, dim, 1, bias=False) if downsample_space else None
        self.down_time = (
            mark_temporal(nn.Conv3d(dim * 2, dim, 1, bias=False)) if downsample_time else None
        )
        self.act = nn.SiLU() if nonlin else nn.Identity()

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        enable_time: bool | Bool[Tensor, "b"] = True,
    ) -> Float[Tensor, "b c ..."]:
        check_input(x, self.dim, "Downsample")
        enabled = time_enabled(x, enable_time)
        if self.down_space is not None:
            h, w = x.shape[-2:]
            if h % 2 or w % 2:
                raise ValueError(
                    f"Downsample halves height and width, which must be even; got {h}x{w}"
                )
            if x.ndim == 4:
                x = rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2)
                x = self.act(self.down_space(x))
            else:
                b = x.shape[0]
                x = rearrange(x, "b c f (h p1) (w p2) -> (b f) (c p1 p2) h w", p1=2, p2=2)
                x = rearrange(self.act(self.down_space(x)), "(b f) c h w -> b c f h w", b=b)
        if self.down_time is None or not _all_or_none(enabled, "Downsample(downsample_time=True)"):
            return x
        frames = x.shape[2]
        if frames % 2:
            raise ValueError(
                f"Downsample(downsample_time=True) halves the frame count, which must be even; "
                f"got {frames} frames"
            )
        x = rearrange(x, "b c (f p) h w -> b (c p) f h w", p=2)
        return self.act(self.down_time(x))


class Upsample(nn.Module):
    """Pixel-shuffle upsampling by 2 in space (and by 2 in time if `upsample_time`), as in
    make-a-video: a 1x1 projection to `factor * dim` channels, optional SiLU, then shuffle.

    Initialisation (make-a-video's): the projection's weight is one Kaiming-uniform `dim x dim`
    matrix repeated for each sub-position, with zero bias, so at init every output pixel (frame)
    of a 2x2 (2x) block is the same: nearest-neighbour upsampling of a linear map, free of
    checkerboard artefacts. Time is upsampled only when time is enabled (a per-sample tensor
    must be all True or all False, as for `Downsample`); the time projection is temporal.

    make-a-video names: `up_space.0.{weight,bias}` -> `up_space.{weight,bias}`,
    `up_time.0.{weight,bias}` -> `up_time.{weight,bias}` (identical shapes)."""

    def __init__(
        self,
        dim: int,
        upsample_space: bool = True,
        upsample_time: bool = False,
        nonlin: bool = False,
    ):
        super().__init__()
        if not (upsample_space or upsample_time):
            raise ValueError("Upsample needs upsample_space or upsample_time (got neither)")
        self.dim = dim
        self.up_space = nn.Conv2d(dim, dim * 4, 1) if upsample_space else None
        self.up_time = mark_temporal(nn.Conv3d(dim, dim * 2, 1)) if upsample_time else None
        self.act = nn.SiLU() if nonlin else nn.Identity()
        if self.up_space is not None:
            self._init_repeated(self.up_space, 4)
        if self.up_time is not None:
            self._init_repeated(self.up_time, 2)

    @staticmethod
    @torch.no_grad()
    def _init_repeated(conv: nn.Module, factor: int) -> None:
        out_channels, *rest = conv.weight.shape
        base = torch.empty(out_channels // factor, *rest, device=conv.weight.device)
        nn.init.kaiming_uniform_(base)
        # Output channel index is (c p): each base row is repeated for the p sub-positions.
        conv.weight.copy_(repeat(base, "o ... -> (o r) ...", r=factor))
        nn.init.zeros_(conv.bias)

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        enable_time: bool | Bool[Tensor, "b"] = True,
    ) -> Float[Tensor, "b c ..."]:
        check_input(x, self.dim, "Upsample")
        enabled = time_enabled(x, enable_time)
        if self.up_space is not None:
            if x.ndim == 4:
                x = rearrange(
                    self.act(self.up_space(x)), "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=2, p2=2
                )
            else:
                b = x.shape[0]
                y = self.act(self.up_space(rearrange(x, "b c f h w -> (b f) c h w")))
                x = rearrange(y, "(b f) (c p1 p2) h w -> b c f (h p1) (w p2)", b=b, p1=2, p2=2)
        if self.up_time is None or not _all_or_none(enabled, "Upsample(upsample_time=True)"):
            return x
        return rearrange(self.act(self.up_time(x)), "b (c p) f h w -> b c (f p) h w", p=2)
