"""Self-conditioning: the denoiser also sees its own latest estimate of the clean video.

Chen, Zhang & Hinton 2022 ("Analog Bits", Sec. 3): in training, for a random part of the
batch (`self_cond_prob`, 0.5 in the paper) the denoiser first estimates x0 without gradients
and is then trained on the same noisy input together with that estimate (the other samples
get zeros, so it also learns to start without one); in sampling, each step is given the
previous step's predicted x0 (zeros at the first step). The model refines its own estimate
instead of redrawing the video at every step, which on the moving-digits demo keeps the
digit's shape from frame to frame better at the same number of steps (README, "The main
job"). It costs one extra forward pass without gradients on that part of the batch.

A U-Net takes the estimate as its `self_cond=` input when it is built with `self_cond=True`
(`unets.self_cond`); `GaussianDiffusion` and `FlowMatching` switch self-conditioning on by
themselves for such a U-Net (`uses_self_cond`). Samplers get it through the process's model
function, so every sampler (and a diffusers scheduler) works unchanged; for higher-order
samplers the estimate is that of the latest model call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["SelfCondEstimate", "training_estimate", "uses_self_cond"]


def uses_self_cond(denoise_fn: Any) -> bool:
    """True for a denoiser built to take its own estimate (`config.self_cond` True)."""
    return bool(getattr(getattr(denoise_fn, "config", None), "self_cond", False))


def _rows(value: Any, index: Tensor, batch: int) -> Any:
    """`value` restricted to the rows in `index` when it is a per-sample tensor."""
    if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[index]
    return value


@torch.no_grad()
def training_estimate(
    denoise_fn: Callable[..., Tensor],
    x_t: Tensor,
    times: Tensor,
    kwargs: dict[str, Any],
    prob: float,
    to_x0: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> Tensor:
    """The `self_cond` input of one training batch: the denoiser's x0 estimate (no gradients)
    for a random `prob` share of the samples, zeros for the rest. `to_x0(prediction, x_t,
    times)` turns the denoiser's output into x0 on those rows; `kwargs` are the denoiser's
    other inputs (per-sample tensors are cut to the chosen rows)."""
    batch = x_t.shape[0]
    estimate = torch.zeros_like(x_t)
    chosen = torch.rand(batch, device=x_t.device) < prob
    if not bool(chosen.any()):
        return estimate
    index = chosen.nonzero().squeeze(1)
    rows = {key: _rows(value, index, batch) for key, value in kwargs.items()}
    rows["self_cond"] = estimate[index]
    prediction = denoise_fn(x_t[index], times[index], **rows)
    estimate[index] = to_x0(prediction.to(x_t.dtype), x_t[index], times[index])
    return estimate


class SelfCondEstimate:
    """The sampling side: holds the latest x0 estimate of one sampling run (zeros before the
    first call, and again whenever the batch shape changes)."""

    def __init__(self) -> None:
        self.x0: Tensor | None = None

    def current(self, x: Tensor) -> Tensor:
        if self.x0 is None or self.x0.shape != x.shape:
            self.x0 = torch.zeros_like(x)
        return self.x0

    def update(self, x0: Tensor) -> None:
        self.x0 = x0.detach()
