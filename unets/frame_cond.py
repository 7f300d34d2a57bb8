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
`_StartsAtZero._load_from_state_dict` and `fill_missing`). The network learns to use the
frames from there, as a fine-tuned image model learns its new temporal layers.

Without `cond_frames` a frame-conditioned U-Net sees zeros and an all-False mask: the
unconditional case of the training masks (`diffusion.frame_masks`).

Frame rate (`frame_rate_cond`, Make-A-Video conditions on fps, Sec. 3.3): `FrameRateEmbedding`
embeds an `fps` input (any positive number per sample: frames per second, or a frame skip)
and adds it to the timestep embedding; its output layer starts at zero, with the same
loading rule. Without `fps` nothing is added.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "FrameCondInput",
    "FrameRateEmbedding",
    "add_frame_features",
    "add_frame_rate",
    "check_conditioning_options",
    "check_frame_cond_option",
    "fill_missing",
    "frame_cond_inputs",
]

_log = logging.getLogger(__name__)


def check_frame_cond_option(value: Any, name: str = "frame_cond") -> None:
    """One of the conditioning config options of every U-Net (`frame_cond`, `frame_rate_cond`,
    `lowres_cond`, `self_cond`): a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_conditioning_options(config: Any) -> None:
    """A U-Net config's `frame_cond`, `frame_rate_cond`, `lowres_cond` and `self_cond` options: bools."""
    for name in ("frame_cond", "frame_rate_cond", "lowres_cond", "self_cond"):
        check_frame_cond_option(getattr(config, name), name)


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
            f"cond_frame_mask must have shape ({batch}, {frames}) (True = frame given), "
            f"got {tuple(cond_frame_mask.shape)}"
        )
    frames_5d = cond_frames if x.ndim == 5 else cond_frames[:, :, None]
    return frames_5d, mask.to(x.device)


def add_frame_features(h: Tensor, feats: Tensor, batch: int, num_frames: int) -> Tensor:
    """`h` plus per-frame features `feats` ((B * F, D, H, W), frames folded into the batch),
    `h` in any of the layouts the U-Nets use: (B, D, F, H, W), (B, D, H, W) for an image, or
    folded (B * F, D, H, W)."""
    if h.ndim == 5:
        return h + rearrange(feats, "(b f) d h w -> b d f h w", b=batch).to(h.dtype)
    if h.shape[0] == batch * num_frames:
        # Folded layout (and an image, F = 1, is the same thing).
        return h + feats.to(h.dtype)
    raise ValueError(f"features of shape {tuple(h.shape)} do not fit {batch} samples of {num_frames} frames")


class _StartsAtZero(nn.Module):
    """A module whose output is zero at initialisation and which a checkpoint from before it
    may lack entirely: it then loads as its zero-output start (`start_at_zero`). Parameters
    live on the module itself (no children), since `load_state_dict` asks each child about its
    own keys."""

    def start_at_zero(self) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        if not any(key.startswith(prefix) for key in state_dict):
            _log.info("no %s* weights in the checkpoint: %s starts at zero", prefix, type(self).__name__)
            self.start_at_zero()
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]


class FrameCondInput(_StartsAtZero):
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
        return add_frame_features(h, F.conv2d(folded, self.weight, self.bias, padding=1), batch, num_frames)

    def start_at_zero(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()


class ScalarEmbedding(_StartsAtZero):
    """A per-sample number (B,) -> an `emb_dim` vector added to the timestep embedding:
    sinusoidal features of `_angle_input(values)` over frequencies down to 1 / `max_period`,
    Linear, SiLU and a zero-initialised Linear. Only the last layer starts at zero: zeroing
    the hidden one too would leave both without gradient."""

    max_period: float = 1000.0

    def __init__(self, emb_dim: int, features: int = 64):
        super().__init__()
        half = features // 2
        self.register_buffer(
            "freqs", torch.exp(torch.arange(half) * -(math.log(self.max_period) / max(half - 1, 1))), persistent=False
        )
        hidden = nn.Linear(features, emb_dim)
        self.hidden_weight = nn.Parameter(hidden.weight.detach().clone())
        self.hidden_bias = nn.Parameter(hidden.bias.detach().clone())
        self.out_weight = nn.Parameter(torch.zeros(emb_dim, emb_dim))
        self.out_bias = nn.Parameter(torch.zeros(emb_dim))

    def start_at_zero(self) -> None:
        with torch.no_grad():
            self.out_weight.zero_()
            self.out_bias.zero_()

    def _angle_input(self, values: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, values: Tensor) -> Tensor:
        angles = self._angle_input(values.float())[:, None] * self.freqs[None]
        feats = torch.cat((angles.sin(), angles.cos()), dim=-1).to(self.hidden_weight.dtype)
        return F.linear(F.silu(F.linear(feats, self.hidden_weight, self.hidden_bias)), self.out_weight, self.out_bias)


class FrameRateEmbedding(ScalarEmbedding):
    """`fps` (B,) -> the timestep-embedding addend: features of log(fps) (rates from a
    fraction to hundreds spread over the frequencies)."""

    def _angle_input(self, fps: Tensor) -> Tensor:
        return torch.log(fps) * 100.0


def add_frame_rate(module: FrameRateEmbedding | None, emb: Tensor | None, fps: Any, owner: str) -> Tensor | None:
    """`emb` (B, E) plus the embedding of `fps` (a positive number or (B,) tensor of them);
    `emb` unchanged when `fps` is None. `fps` to a U-Net without `frame_rate_cond` is an error."""
    if fps is None:
        return emb
    if module is None or emb is None:
        raise ValueError(
            f"this {owner} was built without frame-rate conditioning (frame_rate_cond=False), got fps={fps!r}; "
            "build it with frame_rate_cond=True"
        )
    batch = emb.shape[0]
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Tensor)):
        raise TypeError(f"fps must be a positive number or a ({batch},) tensor, got {type(fps).__name__}")
    rate = torch.as_tensor(fps, dtype=torch.float32, device=emb.device).reshape(-1)
    if rate.shape[0] not in (1, batch) or not bool(torch.isfinite(rate).all() and (rate > 0).all()):
        raise ValueError(f"fps must be positive and finite, a scalar or ({batch},) values, got {fps!r}")
    return emb + module(rate.expand(batch)).to(emb.dtype)


def fill_missing(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` plus the zero-output start of every `FrameCondInput` /
    `FrameRateEmbedding` (and `unets.lowres_cond` / `unets.self_cond` part) of `model` that it has no weights for at all (a checkpoint written
    before them), for code that compares key sets before `load_state_dict`, such as
    `unets.io.load_weights`."""
    filled = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, _StartsAtZero):
            continue
        prefix = f"{name}." if name else ""
        if any(key.startswith(prefix) for key in filled):
            continue
        module.start_at_zero()
        for key, value in module.state_dict().items():
            filled[prefix + key] = value.detach().clone()
    return filled
