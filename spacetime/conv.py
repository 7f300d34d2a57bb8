"""Pseudo-3D convolution (Make-A-Video, Singer et al. 2022, Sec. 3.2): a 2D convolution on each
frame followed by a 1D convolution over frames at each pixel. The 1D part is Dirac-initialised
with zero bias, so a pretrained image model is unchanged when it is first run on video.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from spacetime.layers import check_input
from spacetime.params import mark_temporal
from spacetime.time import EnableTime, select_time, time_enabled

__all__ = ["PseudoConv3d", "TemporalConv"]


class TemporalConv(nn.Module):
    """1D convolution over frames, applied at every pixel, `dim -> dim` channels; identity at
    init (Dirac weight, zero bias). Marked temporal.

    `causal=True` pads only on the past side, so frame t sees frames t-k+1..t (any kernel size);
    otherwise the kernel is centred and must be odd. Images and samples with time disabled pass
    through unchanged. This is the half of `PseudoConv3d` that `inflate()` places after a
    third-party 2D convolution.

    The weight has `nn.Conv1d`'s shape `(dim, dim, kernel_size)` (make-a-video's
    `temporal_conv.{weight,bias}` load as `weight`, `bias`); it runs as a `(k, 1)` 2D
    convolution straight on `(B, C, F, H * W)`, which saves the two `(b h w) c f` permute
    copies a 1D convolution would need."""

    def __init__(self, dim: int, kernel_size: int = 3, *, causal: bool = False):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"TemporalConv kernel_size must be >= 1, got {kernel_size}")
        if not causal and kernel_size % 2 == 0:
            raise ValueError(
                f"TemporalConv kernel_size must be odd unless causal=True (a centred kernel keeps "
                f"the frame count), got {kernel_size}"
            )
        self.dim = dim
        self.kernel_size = kernel_size
        self.causal = causal
        self.weight = nn.Parameter(torch.empty(dim, dim, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()
        mark_temporal(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to the identity over time: a one on the tap that reads the output's own frame
        (the centre tap, or the last one when causal, since all padding is then in the past)."""
        nn.init.zeros_(self.weight)
        tap = self.kernel_size - 1 if self.causal else self.kernel_size // 2
        self.weight[:, :, tap].copy_(torch.eye(self.dim))
        nn.init.zeros_(self.bias)

    def conv(self, x: Tensor) -> Tensor:
        """The convolution over frames of a video `(B, C, F, H, W)`, for every sample."""
        # A (k, 1) 2D convolution over (B, C, F, H*W): same result as the (k, 1, 1) 3D one, but
        # CPU PyTorch has no oneDNN path for 3D kernels (it falls back to slow_conv3d), and the
        # 2D kernel is several times faster forward + backward there (benchmarks/unet.py); on
        # CUDA both reach cuDNN.
        b, c, f, h, w = x.shape
        weight = self.weight[..., None]
        tokens = x.reshape(b, c, f, h * w)
        if self.causal:
            tokens = F.pad(tokens, (0, 0, self.kernel_size - 1, 0))
            out = F.conv2d(tokens, weight, self.bias)
        else:
            out = F.conv2d(tokens, weight, self.bias, padding=(self.kernel_size // 2, 0))
        return out.view(b, c, f, h, w)

    def apply_time(self, x: Tensor, enabled: EnableTime) -> Tensor:
        """`x` `(B, C, F, H, W)` with `enabled` from `time_enabled`."""
        if enabled is False:
            return x
        return select_time(enabled, self.conv(x), x)

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        enable_time: bool | Bool[Tensor, "b"] = True,
    ) -> Float[Tensor, "b c *frames h w"]:
        check_input(x, self.dim, "TemporalConv")
        return self.apply_time(x, time_enabled(x, enable_time))

    def extra_repr(self) -> str:
        return f"{self.dim}, kernel_size={self.kernel_size}, causal={self.causal}"


class PseudoConv3d(nn.Module):
    """Spatial `kernel_size x kernel_size` convolution on each frame (`dim -> dim_out`), then a
    `TemporalConv` over frames (`temporal_kernel_size`, default `kernel_size`; none when
    `kernel_size == 1`, as in make-a-video). `causal_time=True` makes the temporal part causal.

    Images `(B, C, H, W)` and `enable_time=False` use only the spatial convolution; a bool
    tensor `(B,)` chooses per sample. The spatial kernel must be odd ("same" padding).

    make-a-video names: `spatial_conv.{weight,bias}` -> `spatial.{weight,bias}`,
    `temporal_conv.{weight,bias}` -> `temporal.{weight,bias}` (identical shapes)."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        kernel_size: int = 3,
        *,
        temporal_kernel_size: int | None = None,
        causal_time: bool = False,
    ):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"PseudoConv3d kernel_size must be odd and >= 1, got {kernel_size}")
        temporal_kernel_size = kernel_size if temporal_kernel_size is None else temporal_kernel_size
        self.dim = dim
        self.dim_out = dim_out
        self.spatial = nn.Conv2d(dim, dim_out, kernel_size, padding=kernel_size // 2)
        self.temporal = (
            TemporalConv(dim_out, temporal_kernel_size, causal=causal_time)
            if kernel_size > 1
            else None
        )

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        enable_time: bool | Bool[Tensor, "b"] = True,
    ) -> Float[Tensor, "b c_out *frames h w"]:
        check_input(x, self.dim, "PseudoConv3d")
        enabled = time_enabled(x, enable_time)
        if x.ndim == 4:
            return self.spatial(x)
        b = x.shape[0]
        x = self.spatial(rearrange(x, "b c f h w -> (b f) c h w"))
        x = rearrange(x, "(b f) c h w -> b c f h w", b=b)
        if self.temporal is None:
            return x
        return self.temporal.apply_time(x, enabled)
