"""Conditioning frames: known frames and their mask as extra input channels of any U-Net.

Make-A-Video's interpolation network (Singer et al. 2022, Sec. 3.4) is the base network
with masked input frames: the frames that are given, zeroed where they are not, and a
binary mask channel saying which they are. Every registered U-Net takes them the same way,
through `FrameCondInput`: a per-frame 3x3 convolution from `channels + 1` input channels to
the width of the U-Net's input convolution, added to that convolution's output.

Why added after the input conv rather than widening it: the projection starts at zero, so a
model built with `frame_cond=True` computes exactly what the same weights without it did,
and a checkpoint written without frame conditioning loads into it unchanged (its missing
projection is taken as the zero it would have been initialised to; see
`FrameCondInput._load_from_state_dict` and `fill_missing`). The network learns to use the
frames from there, as a fine-tuned image model learns its temporal layers (STYLE.md 12).

Without `cond_frames` a frame-conditioned U-Net sees zeros and an all-False mask: the
unconditional case of the training masks (`diffusion.frame_masks`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FrameCondInput", "check_frame_cond_option", "fill_missing", "frame_cond_inputs"]

_log = logging.getLogger(__name__)


def check_frame_cond_option(value: Any) -> None:
    """The `frame_cond` config option of every U-Net: a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"frame_cond must be a bool, got {value!r}")


def frame_cond_inputs(
    owner: str,
    enabled: bool,
    x: Tensor,
    cond_frames: Tensor | None,
    cond_frame_mask: Tensor | None,
) -> tuple[Tensor, Tensor] | None:
    """Checked `(cond_frames (B, C, F, H, W), mask (B, F) bool)` for input `x`, or None when
    the U-Net (`owner`, for messages) has no frame conditioning. An image `x` (B, C, H, W)
    takes `cond_frames` (B, C, H, W) and a mask (B,) or (B, 1). With frame conditioning on and
    nothing given, every frame is unknown (zeros, mask all False)."""
    given = cond_frames is not None or cond_frame_mask is not None
    if not enabled:
        if given:
            raise ValueError(
                f"this {owner} was built without frame conditioning (frame_cond=False), got "
                f"cond_frames/cond_frame_mask; build it with frame_cond=True to condition on known frames"
            )
        return None
    video = x.shape if x.ndim == 5 else (x.shape[0], x.shape[1], 1, *x.shape[2:])
    batch, frames = video[0], video[2]
    if not given:
        return (x.new_zeros(video), torch.zeros(batch, frames, dtype=torch.bool, device=x.device))
    if cond_frames is None or cond_frame_mask is None:
        missing = "cond_frames" if cond_frames is None else "cond_frame_mask"
        raise ValueError(f"cond_frames and cond_frame_mask go together: {missing} is missing")
    if not isinstance(cond_frames, Tensor) or tuple(cond_frames.shape) != tuple(x.shape):
        shape = tuple(cond_frames.shape) if isinstance(cond_frames, Tensor) else type(cond_frames).__name__
        raise ValueError(f"cond_frames must have the input's shape {tuple(x.shape)}, got {shape}")
    if not isinstance(cond_frame_mask, Tensor) or cond_frame_mask.dtype != torch.bool:
        raise ValueError(
            f"cond_frame_mask must be a bool tensor of shape ({batch}, {frames}) (True = frame given), got "
            f"{cond_frame_mask.dtype if isinstance(cond_frame_mask, Tensor) else type(cond_frame_mask).__name__}"
        )
    mask = cond_frame_mask.reshape(batch, 1) if x.ndim == 4 and cond_frame_mask.shape == (batch,) else cond_frame_mask
    if tuple(mask.shape) != (batch, frames):
        raise ValueError(
            f"cond_frame_mask must have shape ({batch}, {frames}) (True = frame given), got {tuple(cond_frame_mask.shape)}"
        )
    frames_5d = cond_frames if x.ndim == 5 else cond_frames[:, :, None]
    return frames_5d, mask.to(x.device)


class FrameCondInput(nn.Module):
    """Zero-initialised projection of (known frames, mask) to `dim` features per frame, added
    to the output of a U-Net's input convolution (module docstring)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        # Parameters held here, not in a child Conv2d: `_load_from_state_dict` below must see
        # every key of this module (load_state_dict asks each child on its own).
        self.weight = nn.Parameter(torch.zeros(dim, channels + 1, 3, 3))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h: Tensor, cond: tuple[Tensor, Tensor]) -> Tensor:
        """`h + features`, `h` the input conv's output in any of the layouts the U-Nets use:
        (B, D, F, H, W), (B, D, H, W) for an image, or frames folded into the batch
        (B * F, D, H, W). `cond` is what `frame_cond_inputs` returned."""
        frames, mask = cond
        batch, _, num_frames = frames.shape[:3]
        known = mask[:, None, :, None, None].to(frames.dtype)
        stacked = torch.cat((frames * known, known.expand(-1, 1, -1, *frames.shape[-2:])), dim=1)
        folded = rearrange(stacked.to(self.weight.dtype), "b c f h w -> (b f) c h w")
        feats = F.conv2d(folded, self.weight, self.bias, padding=1)
        if h.ndim == 5:
            return h + rearrange(feats, "(b f) d h w -> b d f h w", b=batch).to(h.dtype)
        if h.shape[0] == batch * num_frames:
            # Folded layout (and an image, F = 1, is the same thing).
            return h + feats.to(h.dtype)
        raise ValueError(f"features of shape {tuple(h.shape)} do not fit {batch} samples of {num_frames} frames")

    def _load_from_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint from before frame conditioning has none of these weights: take them as
        # the zeros they start from, so loading stays strict for every other key.
        if not any(key.startswith(prefix) for key in state_dict):
            _log.info("no %s* weights in the checkpoint: frame conditioning starts at zero", prefix)
            with torch.no_grad():
                for param in self.parameters():
                    param.zero_()
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]


def fill_missing(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` plus zeros for every `FrameCondInput` of `model` that it has no weights
    for at all (a checkpoint written before frame conditioning): for code that compares key
    sets before `load_state_dict`, such as `unets.io.load_weights`."""
    filled = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, FrameCondInput):
            continue
        prefix = f"{name}." if name else ""
        if any(key.startswith(prefix) for key in filled):
            continue
        for key, value in module.state_dict().items():
            filled[prefix + key] = torch.zeros_like(value)
    return filled
