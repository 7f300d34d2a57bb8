"""Videos longer than the model was trained on: autoregressive extension and sliding windows.

A video model is trained on clips of one length (its `num_frames`, 8 for the demo) and
degrades beyond it: its temporal attention has never seen more frames and an absolute frame
position embedding has no entry for them. Two ways to go further, both built from the
trained-length model alone:

- **Autoregressive extension** (`extend`): sample a window of the trained length whose first
  `context` frames are the last frames of the video so far (a `frame_cond` U-Net with a
  `future` mask, `diffusion.frame_masks`), append the new frames, repeat. Make-A-Video's
  "extrapolation" (Singer et al. 2022, Sec. 3.4) run in a loop. Each window only sees
  `context` frames of the past, so the video is coherent locally; what happened earlier is
  forgotten.
- **Sliding windows with fused overlaps** (`WindowedDenoiser`, `windowed`): at every
  denoising step the U-Net runs on overlapping windows of the trained length and the outputs
  are averaged where windows overlap (MultiDiffusion, Bar-Tal et al. 2023, eq. 3-5: the fused
  step is the least-squares agreement of the per-window steps, here with per-frame weights).
  Every sampler and every U-Net works unchanged, `frame_cond` or not. FreeNoise (Qiu et al.
  2023, Sec. 3.2) adds *noise rescheduling* (`free_noise`): the starting noise of the frames
  after the first window is a locally shuffled copy of the first window's, so that every
  window starts from related noise and draws related content instead of a new video.

Why the raw network outputs are fused, not the predicted clean video: for one noisy `x_t`
the eps, x0 and v predictions are affine in one another with coefficients that depend only
on the noise level, which every window shares; fusing any of them gives the same step.
`sample_long` picks between the two methods.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.frame_masks import future_mask
from diffusion.guidance import guided_output
from spacetime.checks import check_choice, check_int
from unets.base import guidance_mix

__all__ = [
    "LONG_METHODS",
    "WINDOW_WEIGHTS",
    "WindowedDenoiser",
    "extend",
    "free_noise",
    "fusion_weights",
    "has_frame_cond",
    "sample_long",
    "window_starts",
    "window_weights",
    "windowed",
]

logger = logging.getLogger(__name__)

LONG_METHODS = ("extend", "window")
# How a window's frames are weighted where windows overlap: "uniform" averages them;
# "triangular" and "cosine" taper towards the window's ends, whose frames the window sees
# with the least context on one side (the MultiDiffusion / FreeNoise choice is uniform).
WINDOW_WEIGHTS = ("uniform", "triangular", "cosine")

# Inputs of the U-Net call convention that carry a frame axis, and which axis it is.
_FRAME_AXIS = {"cond_frames": 2, "cond_frame_mask": 1, "self_cond": 2}


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window of `window` frames over a video of `frames`: every
    `stride` frames from 0, plus one window ending at the last frame when the stride does
    not land there. One window `[0]` when the video is no longer than a window."""
    check_int("frames", frames, low=1)
    check_int("window", window, low=1)
    check_int("stride", stride, low=1, high=window)
    if frames <= window:
        return [0]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts


def window_weights(window: int, kind: str = "triangular") -> Tensor:
    """`(window,)` positive float64 weights of a window's frames (see `WINDOW_WEIGHTS`)."""
    check_int("window", window, low=1)
    check_choice("weights", kind, WINDOW_WEIGHTS)
    position = torch.arange(window, dtype=torch.float64)
    if kind == "uniform":
        return torch.ones(window, dtype=torch.float64)
    if kind == "triangular":
        return torch.minimum(position + 1, window - position)
    # Half a sine period over the window, sampled at frame centres: never zero at the ends,
    # so a video's first and last frames (in one window only) keep a weight.
    return torch.sin(math.pi * (position + 0.5) / window)


def fusion_weights(frames: int, window: int, stride: int, kind: str = "triangular") -> Tensor:
    """`(windows, frames)` float64: row i holds window i's weight of each frame (zero outside
    it), normalised so that every frame's weights sum to 1 (`window_starts` gives the rows)."""
    starts = window_starts(frames, window, stride)
    length = min(window, frames)
    weights = torch.zeros(len(starts), frames, dtype=torch.float64)
    per_frame = window_weights(length, kind)
    for row, start in enumerate(starts):
        weights[row, start : start + length] = per_frame
    return weights / weights.sum(dim=0, keepdim=True)


def free_noise(
    shape: tuple[int, ...], window: int, stride: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """FreeNoise's rescheduled starting noise (Qiu et al. 2023, Sec. 3.2) of `shape`
    (B, C, F, H, W): the first `window` frames drawn, then each later block of `stride` frames
    a random permutation of the block `window` frames before it, so every frame's noise is one
    of the first window's. Drawn on the CPU (as `generator` is)."""
    if len(shape) != 5:
        raise ValueError(f"shape must be a video's (B, C, F, H, W), got {shape}")
    frames = shape[2]
    check_int("window", window, low=1)
    check_int("stride", stride, low=1, high=window)
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    for start in range(window, frames, stride):
        count = min(stride, frames - start)
        order = torch.randperm(count, generator=generator) + (start - window)
        noise[:, :, start : start + count] = noise[:, :, order]
    return noise


def _slice_frames(kwargs: dict[str, Any], start: int, stop: int, frames: int) -> dict[str, Any]:
    """`kwargs` with every per-frame input cut to frames `[start, stop)`."""
    out = dict(kwargs)
    for key, axis in _FRAME_AXIS.items():
        value = out.get(key)
        if isinstance(value, Tensor) and value.ndim > axis and value.shape[axis] == frames:
            out[key] = value.narrow(axis, start, stop - start)
    return out


class WindowedDenoiser(nn.Module):
    """A denoiser that runs `unet` on overlapping windows of `window` frames, `stride`
    frames apart, and fuses the outputs with `weights` (`WINDOW_WEIGHTS`); see the module
    docstring. Inputs of `window` frames or fewer, and images, go to `unet` unchanged.

    Follows the U-Net call convention: `cond`, `cond_mask`, `null_cond_prob`, per-frame inputs
    (`cond_frames`, `cond_frame_mask`, cut per window) and `forward_with_cond_scale` (batched
    guidance per window through the U-Net's own). Attributes it lacks are the U-Net's
    (`config`, `cond_format`, ...), so a process treats it as the model it wraps."""

    def __init__(self, unet: nn.Module, window: int, stride: int | None = None, weights: str = "triangular"):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be an nn.Module, got {type(unet).__name__}")
        check_int("window", window, low=1)
        stride = max(1, window // 2) if stride is None else stride
        check_int("stride", stride, low=1, high=window)
        check_choice("weights", weights, WINDOW_WEIGHTS)
        multiple = getattr(unet, "frame_multiple", 1)
        if isinstance(multiple, int) and multiple > 1 and window % multiple:
            raise ValueError(f"window must be a multiple of the U-Net's frame_multiple={multiple}, got {window}")
        self.unet = unet
        self.window = window
        self.stride = stride
        self.weights = weights

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "unet":
                raise
            return getattr(self._modules["unet"], name)

    def _fused(self, x: Tensor, call: Any, kwargs: dict[str, Any]) -> Tensor:
        frames = x.shape[2]
        starts = window_starts(frames, self.window, self.stride)
        weights = fusion_weights(frames, self.window, self.stride, self.weights).to(x.device, torch.float32)
        out = None
        for row, start in enumerate(starts):
            stop = start + self.window
            part = call(x[:, :, start:stop], _slice_frames(kwargs, start, stop, frames))
            if out is None:
                out = torch.zeros(part.shape[:2] + x.shape[2:], dtype=torch.float32, device=part.device)
            out[:, :, start:stop] += part.float() * weights[row, start:stop].view(1, 1, -1, 1, 1)
        assert out is not None, "window_starts gives at least one window"
        return out.to(x.dtype)

    def _single(self, x: Tensor) -> bool:
        return x.ndim != 5 or x.shape[2] <= self.window

    def forward(self, x: Tensor, t: Tensor | None = None, **kwargs: Any) -> Tensor:
        if self._single(x):
            return self.unet(x, t, **kwargs)
        return self._fused(x, lambda part, kw: self.unet(part, t, **kw), kwargs)

    def forward_with_cond_scale(
        self,
        x: Tensor,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        cond_scale: float | int = 1.0,
        *,
        cond_mask: Tensor | None = None,
        guidance_rescale: float | int = 0.0,
        batched: bool | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Classifier-free guidance on fused windows. The plain mix is linear, so each window
        is guided by the U-Net itself (one batched call) and the guided outputs are fused.
        The guidance rescale (Lin et al. 2023) is not linear (a per-video standard deviation):
        it is applied once, on the fused conditional and unconditional outputs."""
        kwargs.pop("null_cond_prob", None)
        if self._single(x) and hasattr(self.unet, "forward_with_cond_scale"):
            return self.unet.forward_with_cond_scale(x, t, cond, cond_scale, cond_mask=cond_mask,
                                                     guidance_rescale=guidance_rescale, batched=batched, **kwargs)
        if cond is None or cond_scale == 1.0:
            return self.forward(x, t, cond=cond, cond_mask=cond_mask, **kwargs)
        if guidance_rescale != 0.0:
            out = self.forward(x, t, cond=cond, cond_mask=cond_mask, null_cond_prob=0.0, **kwargs)
            null = self.forward(x, t, cond=cond, cond_mask=cond_mask, null_cond_prob=1.0, **kwargs)
            return guidance_mix(out, null, cond_scale, guidance_rescale)
        enable_time = kwargs.pop("enable_time", True)

        def guided(part: Tensor, window_kwargs: dict[str, Any]) -> Tensor:
            return guided_output(self.unet, part, t, cond=cond, cond_mask=cond_mask, cond_scale=cond_scale,
                                 enable_time=enable_time, batched=batched, extra=window_kwargs)

        return self._fused(x, guided, kwargs)


@contextlib.contextmanager
def windowed(
    process: Any, window: int | None = None, stride: int | None = None, weights: str = "triangular"
) -> Iterator[WindowedDenoiser]:
    """Within the block, `process` (a `GaussianDiffusion` or `FlowMatching`) denoises through
    a `WindowedDenoiser` around its U-Net (`window` default: the process's `num_frames`,
    `stride` default half of it), so `process.sample(num_frames=N)` with any sampler gives
    a long video. The U-Net is put back afterwards, also on error."""
    original = process.denoise_fn
    if isinstance(original, WindowedDenoiser):
        raise ValueError("this process already samples through sliding windows")
    wrapper = WindowedDenoiser(original, process.num_frames if window is None else window, stride, weights)
    process.denoise_fn = wrapper
    try:
        yield wrapper
    finally:
        process.denoise_fn = original


def has_frame_cond(process: Any) -> bool | None:
    """Whether the process's U-Net takes known frames (`frame_cond`); None when it does not
    say (a denoiser from elsewhere)."""
    value = getattr(getattr(process.denoise_fn, "config", None), "frame_cond", None)
    return value if isinstance(value, bool) else None


def _check_video(process: Any, video: Any) -> None:
    if not isinstance(video, Tensor) or video.ndim != 5:
        got = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ValueError(f"video must be a video batch (B, C, F, H, W) in [0, 1], got {got}")
    c, (h, w) = process.channels, process.image_hw
    if (video.shape[1], *video.shape[-2:]) != (c, h, w):
        raise ValueError(f"video must be (B, {c}, F, {h}, {w}) for this model, got {tuple(video.shape)}")


@torch.no_grad()
def extend(
    process: Any,
    video: Tensor,
    total_frames: int,
    *,
    context: int | None = None,
    cond: Any = None,
    cond_mask: Tensor | None = None,
    cond_scale: float | int = 1.0,
    sampler: str | None = None,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    replace_known: bool = True,
    **sample_options: Any,
) -> Tensor:
    """`video` (B, C, F0, H, W) in [0, 1] -> (B, C, total_frames, H, W): the given frames
    unchanged, then windows of the process's trained length (`num_frames`) sampled one after
    another, each conditioned on the last `context` frames so far (default: half a window)
    and contributing its `num_frames - context` new frames. The U-Net must be built with
    `frame_cond=True` and trained with `future` masks. `cond` (strings are encoded once),
    `cond_scale`, `sampler`, `steps`, `generator`, `replace_known` (the context frames put
    back into every prediction) and `sample_options` go to every `process.sample` call."""
    if has_frame_cond(process) is False:
        raise ValueError(
            "extend needs a U-Net built with frame_cond=True (conditioned on known frames); this one has "
            "frame_cond=False: use sliding windows (method='window') instead"
        )
    for key in ("cond_frames", "cond_frame_mask", "num_frames", "batch_size", "noise"):
        if key in sample_options:
            raise ValueError(f"extend sets {key} itself; leave it out")
    _check_video(process, video)
    window = process.num_frames
    if window < 2:
        raise ValueError(f"extension needs a model trained on at least 2 frames, got num_frames={window}")
    context = window // 2 if context is None else context
    check_int("context", context, low=1, high=window - 1)
    given = video.shape[2]
    if given < context:
        raise ValueError(f"the video must have at least context={context} frames, got {given}")
    check_int("total_frames", total_frames, low=given)
    batch = video.shape[0]
    cond, cond_mask = process.prepare_cond(cond, cond_mask, batch)
    mask = future_mask(window, context).expand(batch, window).clone()
    pieces, current = [video.float()], video.float()
    length = given
    while length < total_frames:
        known = current.new_zeros(batch, video.shape[1], window, *video.shape[-2:])
        known[:, :, :context] = current[:, :, -context:]
        new = min(window - context, total_frames - length)
        sampled = process.sample(
            cond=cond, cond_mask=cond_mask, cond_scale=cond_scale, sampler=sampler, steps=steps,
            generator=generator, num_frames=window, cond_frames=known, cond_frame_mask=mask,
            replace_known=replace_known, **sample_options,
        ).float().cpu()
        piece = sampled[:, :, context : context + new].to(video.device)
        pieces.append(piece)
        current = torch.cat((current[:, :, -context:], piece), dim=2)
        length += new
        logger.debug("extended to %d of %d frames", length, total_frames)
    return torch.cat(pieces, dim=2)


@torch.no_grad()
def sample_long(
    process: Any,
    num_frames: int,
    *,
    cond: Any = None,
    cond_mask: Tensor | None = None,
    cond_scale: float | int = 1.0,
    batch_size: int = 16,
    method: str = "window",
    context: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    weights: str = "triangular",
    noise_reschedule: bool = True,
    extend_cond: bool = True,
    sampler: str | None = None,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    **sample_options: Any,
) -> Tensor:
    """Sample videos of `num_frames` frames (B, C, num_frames, H, W) in [0, 1].

    Up to the trained length (`process.num_frames`) this is `process.sample`. Beyond it,
    `method="extend"` samples a first window without known frames and `extend`s it
    (`context`); with `extend_cond=False` only the first window follows `cond`, the later ones
    continue the known frames without it (a caption that names the *initial* motion, as
    moving digits' do, no longer describes it after a bounce). `method="window"` samples the whole length through a `WindowedDenoiser`
    (`window`, `stride`, `weights`), from FreeNoise's rescheduled noise unless
    `noise_reschedule=False`. The batch size is `cond`'s when a condition is given."""
    check_choice("method", method, LONG_METHODS)
    check_int("num_frames", num_frames, low=1)
    for key in ("cond_frames", "cond_frame_mask", "num_frames", "noise"):
        if key in sample_options:
            raise ValueError(f"sample_long sets {key} itself; leave it out")
    common = dict(cond_scale=cond_scale, sampler=sampler, steps=steps, generator=generator, **sample_options)
    trained = process.num_frames
    if num_frames <= trained:
        return process.sample(cond=cond, cond_mask=cond_mask, batch_size=batch_size, num_frames=num_frames, **common)
    cond, cond_mask = process.prepare_cond(cond, cond_mask, None)
    batch = batch_size if cond is None else cond.shape[0]
    if method == "extend":
        if has_frame_cond(process) is False:
            raise ValueError(
                "method 'extend' needs a U-Net built with frame_cond=True (conditioned on known frames); this one "
                "has frame_cond=False: use method 'window' (sliding windows) instead"
            )
        first = process.sample(cond=cond, cond_mask=cond_mask, batch_size=batch, num_frames=trained, **common)
        if not extend_cond:
            cond = cond_mask = None
        return extend(process, first, num_frames, context=context, cond=cond, cond_mask=cond_mask, **common)
    with windowed(process, window, stride, weights) as wrapper:
        noise = None
        if noise_reschedule:
            shape = (batch, process.latent_channels, num_frames, *process.latent_hw)
            noise = free_noise(shape, wrapper.window, wrapper.stride, generator=generator)
        return process.sample(cond=cond, cond_mask=cond_mask, batch_size=batch, num_frames=num_frames, noise=noise,
                              **common)
