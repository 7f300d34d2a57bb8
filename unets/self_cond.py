"""Self-conditioning: the denoiser also sees its own previous estimate of the clean sample.

Chen, Zhang & Hinton 2022 ("Analog Bits", Sec. 3): the network is given, besides the noisy
input, an estimate of x0 from an earlier evaluation — during training, half the batch gets
the model's own estimate from a first pass (without gradient) and the other half zeros;
during sampling, the previous step's estimate, and zeros (here: None) at the first step.
The diffusion process decides what to feed; every registered U-Net takes it the same way:

- the estimate (same shape as `x`, in `x`'s data space) enters through `SelfCondInput`, a
  per-frame 3x3 convolution from `channels` to the width of the U-Net's input convolution,
  added to that convolution's output: the same place and rule as the low-resolution input
  (`unets.lowres_cond.LowresCondInput`, whose layer this is).
- None means "no estimate yet" and is computed as zeros, so the two can never differ (the
  projection's bias, once trained, is part of what a zero estimate adds).

The projection starts at zero output, so a U-Net built with `self_cond=True` computes what
the same weights without it did, and checkpoints written without it load unchanged (the
missing weights are taken as their zero start: `unets.frame_cond.fill_missing`).

Why a separate input rather than doubling the input convolution's channels (the paper's
concatenation): a sum after a zero-initialised projection is the same function class, and
it keeps the input convolution, hence pretrained and diffusers weights, as it was.
"""

from __future__ import annotations

from torch import Tensor

from unets.lowres_cond import LowresCondInput

__all__ = ["SelfCondInput", "add_self_cond_features", "self_cond_inputs"]


class SelfCondInput(LowresCondInput):
    """Zero-initialised per-frame 3x3 projection of the x0 estimate (B, C, F, H, W) to `dim`
    features, added to the output of a U-Net's input convolution (any of the U-Nets' layouts)."""


def self_cond_inputs(owner: str, enabled: bool, x: Tensor, self_cond: Tensor | None) -> Tensor | None:
    """The checked x0 estimate as a video (B, C, F, H, W) for input `x`, or None for a U-Net
    (`owner`, for messages) built without self-conditioning. An image `x` (B, C, H, W) takes
    an image estimate. With self-conditioning on and None given: zeros (no estimate yet)."""
    if not enabled:
        if self_cond is not None:
            raise ValueError(
                f"this {owner} was built without self-conditioning (self_cond=False), got self_cond; "
                "build it with self_cond=True to give it its previous x0 estimate"
            )
        return None
    if self_cond is None:
        estimate = x.new_zeros(x.shape)
    elif not isinstance(self_cond, Tensor) or tuple(self_cond.shape) != tuple(x.shape):
        shape = tuple(self_cond.shape) if isinstance(self_cond, Tensor) else type(self_cond).__name__
        raise ValueError(f"self_cond (the x0 estimate) must have the input's shape {tuple(x.shape)}, got {shape}")
    else:
        estimate = self_cond.to(x.device)
    return estimate if x.ndim == 5 else estimate[:, :, None]


def add_self_cond_features(module: SelfCondInput | None, h: Tensor, estimate: Tensor | None) -> Tensor:
    """The input convolution's output `h` plus the projected x0 estimate (what
    `self_cond_inputs` returned); `h` unchanged without it."""
    if estimate is None or module is None:
        return h
    return module(h, estimate)
