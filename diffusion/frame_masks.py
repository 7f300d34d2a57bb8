"""Which frames are given: training masks and known frames for frame-conditioned U-Nets.

Make-A-Video trains one network to predict, interpolate and animate (Singer et al. 2022,
Sec. 3.4: "masked frame interpolation and extrapolation"): each training sample is shown
some of its own frames as a condition (`unets.frame_cond`) and learns to denoise the whole
video. The kinds of mask, drawn per sample with the probabilities of `FrameMasks`:

- `future`: the first k frames are given (k drawn in `context_frames`), predict the rest;
- `interpolate`: every s-th frame is given (s drawn in `strides`), fill the gaps;
- `first_frame`: image-to-video from frame 0;
- `unconditional`: nothing is given (the base model's task; keeps sampling without frames
  in distribution).

The loss is taken over all frames, the given ones included: the network still has to
denoise them (their noisy versions are its input like every other frame's), and a sample
whose frames are all given must not contribute a zero loss. Choice recorded in
docs/design.md.

At sampling time the given frames can, in addition, be put back into every prediction of the
clean video (`replace=True`, the "replacement" trick of Ho et al. 2022, Sec. 3.1, used here
on x0): the sampler's state then carries them, and they come back exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from spacetime.checks import check_int, check_number, did_you_mean

__all__ = [
    "STRATEGIES",
    "FrameMasks",
    "denoiser_extra",
    "draw_frame_masks",
    "first_frame_mask",
    "frame_kwargs",
    "frame_masks_option",
    "future_mask",
    "grid_frame_rate",
    "interpolation_mask",
    "known_frames",
    "masks_from_option",
    "paste_known",
    "temporal_super_resolution",
    "windowed_interpolation",
    "temporal_upsample_layout",
    "training_frame_inputs",
    "training_frames",
]

_log = logging.getLogger(__name__)

STRATEGIES = ("future", "interpolate", "first_frame", "unconditional")


def future_mask(frames: int, context: int) -> Tensor:
    """`(frames,)` bool: the first `context` frames given."""
    check_int("frames", frames, low=1)
    check_int("context", context, low=0)
    return torch.arange(frames) < context


def interpolation_mask(frames: int, stride: int) -> Tensor:
    """`(frames,)` bool: frames 0, s, 2s, ... given (the last one too when it falls on the
    grid, which is how `temporal_upsample_layout` places F frames in s * (F - 1) + 1)."""
    check_int("frames", frames, low=1)
    check_int("stride", stride, low=1)
    return torch.arange(frames) % stride == 0


def first_frame_mask(frames: int) -> Tensor:
    """`(frames,)` bool: only frame 0 given (image-to-video)."""
    return future_mask(frames, 1)


@dataclasses.dataclass
class FrameMasks:
    """Probabilities of each kind of training mask (they must sum to 1) and the ranges drawn
    from: `context_frames` = (min, max) given frames for `future`, `strides` = the strides
    for `interpolate`."""

    future: float | int = 0.25
    interpolate: float | int = 0.25
    first_frame: float | int = 0.25
    unconditional: float | int = 0.25
    context_frames: tuple[int, ...] = (1, 4)
    strides: tuple[int, ...] = (2, 4)

    def __post_init__(self) -> None:
        for name in STRATEGIES:
            check_number(name, float(getattr(self, name)), low=0.0, high=1.0)
        total = sum(float(getattr(self, name)) for name in STRATEGIES)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"the probabilities {list(STRATEGIES)} must sum to 1, got {total:g}")
        low_high = tuple(self.context_frames)
        if len(low_high) != 2:
            raise ValueError(f"context_frames must be (min, max), got {self.context_frames!r}")
        check_int("context_frames[0]", low_high[0], low=1)
        check_int("context_frames[1]", low_high[1], low=low_high[0])
        self.context_frames = low_high  # type: ignore[assignment]
        self.strides = tuple(self.strides)
        if not self.strides:
            raise ValueError("strides must name at least one stride, got ()")
        for s in self.strides:
            check_int("strides entry", s, low=1)

    @property
    def probabilities(self) -> Tensor:
        return torch.tensor([float(getattr(self, name)) for name in STRATEGIES])


FRAME_MASK_KEYS = tuple(f.name for f in dataclasses.fields(FrameMasks))


def frame_masks_option(where: str, value: Any) -> dict[str, Any] | None:
    """A run config's `frame_masks` value as the full `FrameMasks` fields (plain lists), or
    None: null / false for none, true for the defaults, a mapping of some fields (the rest
    default) or a `FrameMasks`. Errors name `where` and the key (`trainer.frame_masks.strides`)."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    elif isinstance(value, FrameMasks):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{where} must be a mapping of {', '.join(FRAME_MASK_KEYS)}, true (the defaults) or null, got {value!r}"
        )
    for key in value:
        if key not in FRAME_MASK_KEYS:
            raise ValueError(f"unknown {where} key {key!r}{did_you_mean(str(key), FRAME_MASK_KEYS)}; "
                             f"allowed keys: {', '.join(FRAME_MASK_KEYS)}")
    options = {**dataclasses.asdict(FrameMasks()), **value} if value else dataclasses.asdict(FrameMasks())
    for name in STRATEGIES:
        given = options[name]
        if isinstance(given, bool) or not isinstance(given, (int, float)):
            raise TypeError(f"{where}.{name} must be a probability (a number in [0, 1]), got {given!r}")
        check_number(f"{where}.{name}", float(given), low=0.0, high=1.0)
    for name in ("context_frames", "strides"):
        given = options[name]
        if isinstance(given, (str, bytes)) or not isinstance(given, (list, tuple)):
            raise TypeError(f"{where}.{name} must be a list of ints, got {given!r}")
        for index, entry in enumerate(given):
            check_int(f"{where}.{name}[{index}]", entry, low=1)
    try:
        masks = masks_from_option(options)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from None
    return {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(masks).items()}


def masks_from_option(options: Mapping[str, Any]) -> FrameMasks:
    """The `FrameMasks` of a `frame_masks_option` dict (lists as tuples)."""
    return FrameMasks(**{key: tuple(v) if isinstance(v, list) else v for key, v in options.items()})


def draw_frame_masks(
    batch: int, frames: int, masks: FrameMasks | None = None, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """`(mask (batch, frames) bool, kind (batch,) long index into STRATEGIES)`, one kind per
    sample. A `future` context is capped at `frames - 1` so that something is left to predict
    (on a one-frame video it gives nothing)."""
    check_int("batch", batch, low=1)
    check_int("frames", frames, low=1)
    masks = FrameMasks() if masks is None else masks
    kinds = torch.multinomial(masks.probabilities, batch, replacement=True, generator=generator)
    low, high = masks.context_frames
    contexts = torch.randint(low, high + 1, (batch,), generator=generator).clamp(max=frames - 1)
    strides = torch.tensor(masks.strides)[torch.randint(len(masks.strides), (batch,), generator=generator)]
    rows = []
    for kind, context, stride in zip(kinds.tolist(), contexts.tolist(), strides.tolist()):
        name = STRATEGIES[kind]
        if name == "future":
            rows.append(future_mask(frames, context))
        elif name == "interpolate":
            rows.append(interpolation_mask(frames, stride))
        elif name == "first_frame":
            rows.append(first_frame_mask(frames))
        else:
            rows.append(torch.zeros(frames, dtype=torch.bool))
    return torch.stack(rows), kinds


def known_frames(
    process: Any, cond_frames: Tensor, cond_frame_mask: Tensor, batch: int | None, *, encoded: bool = False
) -> tuple[Tensor, Tensor]:
    """Frames given in data space ([0, 1] pixels, as the process's data) -> `(x0 of them in the
    process's space (normalised, or the VAE's latents), mask (B, F) bool)`, checked against
    the batch size (None: any)."""
    if not isinstance(cond_frame_mask, Tensor) or cond_frame_mask.dtype != torch.bool or cond_frame_mask.ndim != 2:
        got = (f"{cond_frame_mask.dtype} {tuple(cond_frame_mask.shape)}" if isinstance(cond_frame_mask, Tensor)
               else type(cond_frame_mask).__name__)
        raise ValueError(f"cond_frame_mask must be a (B, F) bool tensor (True = frame given), got {got}")
    if not isinstance(cond_frames, Tensor) or cond_frames.ndim != 5:
        got = tuple(cond_frames.shape) if isinstance(cond_frames, Tensor) else type(cond_frames).__name__
        raise ValueError(f"cond_frames must be a video batch (B, C, F, H, W), got {got}")
    if tuple(cond_frame_mask.shape) != (cond_frames.shape[0], cond_frames.shape[2]):
        raise ValueError(
            f"cond_frame_mask must have shape (B, F) = {(cond_frames.shape[0], cond_frames.shape[2])} "
            f"for cond_frames {tuple(cond_frames.shape)}, got {tuple(cond_frame_mask.shape)}"
        )
    if batch is not None and cond_frames.shape[0] != batch:
        raise ValueError(f"cond_frames must have the batch size {batch}, got {cond_frames.shape[0]}")
    device = process.betas.device
    frames = cond_frames.to(device)
    mask = cond_frame_mask.to(device)
    # Unknown frames are zeroed before encoding so that whatever they held cannot leak in.
    frames = frames * mask[:, None, :, None, None].to(frames.dtype)
    if encoded:
        return frames, mask
    # Any frame count (sampling may run longer than training); channels and size must fit.
    c, (h, w) = process.channels, process.image_hw
    if (frames.shape[1], *frames.shape[-2:]) != (c, h, w):
        raise ValueError(f"cond_frames must be (B, {c}, F, {h}, {w}) pixels, got {tuple(frames.shape)}")
    x = process.normalize(frames)
    return (x if process.vae is None else process.vae.encode(x)), mask


def frame_kwargs(known: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The U-Net keyword arguments for known frames `known` (process space) and `mask`."""
    return {"cond_frames": known * mask[:, None, :, None, None].to(known.dtype), "cond_frame_mask": mask}


def denoiser_extra(
    frames: tuple[Tensor, Tensor, bool] | None, fps: Any = None, self_cond: Tensor | None = None
) -> dict[str, Any] | None:
    """The U-Net inputs a sampler passes at every step besides the text condition: known
    frames `(x0, mask, replace)`, the frame rate `fps` and the self-conditioning estimate
    `self_cond` (`diffusion.self_cond`; None: not given)."""
    extra = {} if frames is None else frame_kwargs(frames[0], frames[1])
    if fps is not None:
        extra["fps"] = fps
    if self_cond is not None:
        extra["self_cond"] = self_cond
    return extra or None


def paste_known(x0: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """`x0` with the given frames replaced by `known` (both `(B, C, F, H, W)`)."""
    return torch.where(mask[:, None, :, None, None], known.to(x0.dtype), x0)


def temporal_upsample_layout(frames: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Temporal super-resolution's input: `frames` (B, C, F, H, W) placed every `stride`-th
    position of a video of `stride * (F - 1) + 1` frames (zeros between), and the mask
    (B, stride * (F - 1) + 1) that says which are given."""
    if not isinstance(frames, Tensor) or frames.ndim != 5:
        got = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a video batch (B, C, F, H, W), got {got}")
    check_int("stride", stride, low=1)
    b, c, f, h, w = frames.shape
    total = stride * (f - 1) + 1
    video = frames.new_zeros(b, c, total, h, w)
    video[:, :, ::stride] = frames
    mask = interpolation_mask(total, stride).to(frames.device).expand(b, total).clone()
    return video, mask


def training_frames(
    process: Any,
    x_start: Tensor,
    cond_frames: Tensor | None,
    cond_frame_mask: Tensor | None,
    frame_masks: Any,
    encoded: bool,
) -> dict[str, Tensor]:
    """The U-Net's frame keyword arguments for a training batch whose clean data (process
    space) is `x_start`: either the frames given, or masks drawn by `frame_masks` (a
    `FrameMasks` or True for the default) over the batch's own frames."""
    if frame_masks not in (None, False):
        if cond_frames is not None or cond_frame_mask is not None:
            raise ValueError("give either frame_masks (drawn from the batch) or cond_frames/cond_frame_mask, not both")
        if frame_masks is True:
            frame_masks = FrameMasks()
        if not isinstance(frame_masks, FrameMasks):
            raise TypeError(f"frame_masks must be a FrameMasks, True or None, got {type(frame_masks).__name__}")
        if x_start.ndim != 5:
            raise ValueError(f"frame_masks needs a video batch (B, C, F, H, W), got shape {tuple(x_start.shape)}")
        mask, _ = draw_frame_masks(x_start.shape[0], x_start.shape[2], frame_masks)
        return frame_kwargs(x_start, mask.to(x_start.device))
    if cond_frames is None or cond_frame_mask is None:
        missing = "cond_frames" if cond_frames is None else "cond_frame_mask"
        raise ValueError(f"cond_frames and cond_frame_mask go together: {missing} is missing")
    known, mask = known_frames(process, cond_frames, cond_frame_mask, x_start.shape[0], encoded=encoded)
    return frame_kwargs(known, mask)


def temporal_super_resolution(
    process: Any, frames: Tensor, stride: int, *, replace_known: bool = True, **sample_options: Any
) -> Tensor:
    """Make-A-Video's frame interpolation stage: `frames` (B, C, F, H, W) in [0, 1] ->
    `stride * (F - 1) + 1` frames, the given ones every `stride`-th (`temporal_upsample_layout`),
    the rest sampled by `process` (a `GaussianDiffusion` whose U-Net has `frame_cond=True`).
    `replace_known` (default on) returns the given frames exactly; `sample_options` go to
    `process.sample` (`sampler`, `steps`, `cond`, `cond_scale`, `generator`, ...)."""
    for key in ("cond_frames", "cond_frame_mask", "num_frames", "batch_size"):
        if key in sample_options:
            raise ValueError(f"temporal_super_resolution sets {key} itself; leave it out")
    video, mask = temporal_upsample_layout(frames, stride)
    return process.sample(
        cond_frames=video, cond_frame_mask=mask, num_frames=video.shape[2], batch_size=video.shape[0],
        replace_known=replace_known, **sample_options,
    )


def _unet_option(process: Any, name: str) -> bool | None:
    """The `frame_cond` / `frame_rate_cond` setting of the process's U-Net, None when the
    denoiser has no such config (a plain module)."""
    config = getattr(getattr(process, "denoise_fn", None), "config", None)
    value = getattr(config, name, None)
    return value if isinstance(value, bool) else None


def training_frame_inputs(process: Any, dataset: Any, frame_masks: Any) -> dict[str, Any]:
    """The keyword arguments a trainer adds to every video step of `process`: `frame_masks`
    (a `FrameMasks`, from a `frame_masks_option` dict, a `FrameMasks` or True) and, for a U-Net
    with `frame_rate_cond`, `fps` = the data set's `frame_rate` (`MovingDigits`: frames per
    pixel travelled, 1 / speed). A data set without one trains without `fps`, with a warning."""
    out: dict[str, Any] = {}
    options = frame_masks_option("frame_masks", frame_masks)
    if options is not None:
        if _unet_option(process, "frame_cond") is False:
            raise ValueError(
                "frame_masks shows the U-Net some of each video's frames: build it with frame_cond=True "
                "(this one has frame_cond=False)"
            )
        out["frame_masks"] = masks_from_option(options)
    if _unet_option(process, "frame_rate_cond"):
        rate = getattr(dataset, "frame_rate", None)
        if rate is None:
            _log.warning("the U-Net has frame_rate_cond but the %s data set gives no frame_rate: training without "
                         "fps", type(dataset).__name__)
        else:
            check_number("the data set's frame_rate", float(rate), low=0.0, low_open=True)
            out["fps"] = float(rate)
    return out


def grid_frame_rate(inputs: Mapping[str, Any], sample_kwargs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A trainer's `sample_kwargs` for its sample grids, with the training frame rate as
    `fps` unless they set one."""
    if "fps" not in inputs:
        return None if sample_kwargs is None else dict(sample_kwargs)
    return {"fps": inputs["fps"], **(sample_kwargs or {})}


def windowed_interpolation(process: Any, given: Tensor, stride: int, window: int | None = None,
                           **sample_options: Any) -> Tensor:
    """`temporal_super_resolution` of `given` (B, C, F, H, W) in windows of `window` given
    frames, consecutive windows sharing one given frame (None: all F at once). A stage
    trained on short clips (the interpolation preset: 3 given frames) is then sampled at the
    length it was trained on; the shared frame is a given one, so the pieces join exactly."""
    if window is None or window >= given.shape[2]:
        return temporal_super_resolution(process, given, stride, **sample_options)
    check_int("window", window, low=2)
    pieces, start = [], 0
    while start < given.shape[2] - 1:
        end = min(start + window, given.shape[2])
        filled = temporal_super_resolution(process, given[:, :, start:end], stride, **sample_options)
        pieces.append(filled if not pieces else filled[:, :, 1:])
        start = end - 1
    return torch.cat(pieces, dim=2)
