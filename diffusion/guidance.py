"""Calling a denoiser under the U-Net call convention, with classifier-free guidance.

Classifier-free guidance (Ho & Salimans 2022, eq. 6) mixes the conditional and the
unconditional prediction:

    out = out_uncond + cond_scale * (out_cond - out_uncond)

`cond_scale == 1` is the plain conditional prediction and costs one call. The mix is applied
to the raw network output, whatever the objective: eps, x0 and v are affine in one another
for a fixed `x_t` with coefficients that do not depend on the condition, so guiding the raw
output is the same as guiding eps (the form of the paper). The guidance rescale of Lin et al.
2023 (sec. 3.4) is applied to the same raw output.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from unets.base import UnetMixin, guidance_mix

logger = logging.getLogger(__name__)

_warned_no_cond = False


def denoiser_kwargs(
    *,
    cond: Tensor | None = None,
    cond_mask: Tensor | None = None,
    null_cond_prob: float | int = 0.0,
    enable_time: Any = True,
    focus_present_mask: Tensor | None = None,
    prob_focus_present: float | int = 0.0,
) -> dict[str, Any]:
    """The keyword arguments that differ from the call convention's defaults.

    Only these are passed, so a plain module with `forward(x, t)` works unconditionally and a
    U-Net is never handed an option it would have to reject."""
    out: dict[str, Any] = {}
    if cond is not None:
        out["cond"] = cond
    if cond_mask is not None:
        out["cond_mask"] = cond_mask
    if null_cond_prob != 0.0:
        out["null_cond_prob"] = null_cond_prob
    if enable_time is not True:
        out["enable_time"] = enable_time
    if focus_present_mask is not None:
        out["focus_present_mask"] = focus_present_mask
    if prob_focus_present != 0.0:
        out["prob_focus_present"] = prob_focus_present
    return out


def guided_output(
    denoise_fn: nn.Module,
    x: Tensor,
    t: Tensor,
    *,
    cond: Tensor | None = None,
    cond_mask: Tensor | None = None,
    cond_scale: float | int = 1.0,
    enable_time: Any = True,
    guidance_rescale: float | int = 0.0,
    batched: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> Tensor:
    """The denoiser's output at `(x, t)` guided with `cond_scale` (and `guidance_rescale`).

    A U-Net of this library guides itself (`UnetMixin.forward_with_cond_scale`, one batched
    call on both halves unless `batched=False`). Another denoiser's own
    `forward_with_cond_scale` is used when it has one and no rescale is asked for; otherwise
    a conditional call and an unconditional one (`null_cond_prob=1.`) are mixed here."""
    global _warned_no_cond
    kwargs = denoiser_kwargs(cond=cond, cond_mask=cond_mask, enable_time=enable_time)
    # `extra`: inputs both halves share, such as known frames (`diffusion.frame_masks`).
    kwargs.update(extra or {})
    if cond_scale == 1.0 or cond is None:
        if cond is None and cond_scale != 1.0 and not _warned_no_cond:
            logger.warning("cond_scale=%s ignored: guidance needs a condition and none was given", cond_scale)
            _warned_no_cond = True
        return denoise_fn(x, t, **kwargs)
    if isinstance(denoise_fn, UnetMixin):
        return denoise_fn.forward_with_cond_scale(
            x, t, cond_scale=cond_scale, guidance_rescale=guidance_rescale, batched=batched, **kwargs
        )
    with_cond_scale = getattr(denoise_fn, "forward_with_cond_scale", None)
    if callable(with_cond_scale) and guidance_rescale == 0.0:
        return with_cond_scale(x, t, cond_scale=cond_scale, **kwargs)
    out_cond = denoise_fn(x, t, **kwargs)
    out_uncond = denoise_fn(x, t, null_cond_prob=1.0, **kwargs)
    return combine_guidance(out_cond, out_uncond, cond_scale, guidance_rescale)


combine_guidance = guidance_mix
