"""Low-resolution conditioning: the input of a spatial super-resolution stage, on any U-Net.

A super-resolution stage of a cascade (Imagen, Saharia et al. 2022, Sec. 2.5; Make-A-Video's
SR networks, Singer et al. 2022, Sec. 3.5) denoises a high-resolution video while it sees the
low-resolution one, upsampled to the output size and noise-augmented, plus the level of that
augmentation. Every registered U-Net takes them the same way, through `LowresCond`:

- the upsampled video (B, C, F, H, W) enters through `LowresCondInput`, a per-frame 3x3
  convolution from `channels` to the width of the U-Net's input convolution, added to that
  convolution's output (the same place and rule as `unets.frame_cond.FrameCondInput`);
- the augmentation level, a number in [0, 1] per sample (0: the clean upsampled video, 1: the
  process's full noise), goes through `NoiseLevelEmbedding` and is added to the timestep
  embedding. Imagen conditions on it so that at sampling time one can pick the level the
  network is told, independently of how noisy the base stage's output really is.

Both start at zero output, so a U-Net built with `lowres_cond=True` computes what the same
weights without it did, and checkpoints written without it load unchanged (the missing
weights are taken as their zero start: `unets.frame_cond.fill_missing`).

Why a separate input beside `frame_cond` rather than its channels: the low-res video is known
for every frame and every pixel, so it needs no mask; and a stage may want both (an SR stage
that also keeps given frames), which separate projections allow.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from unets.frame_cond import ScalarEmbedding, _StartsAtZero, add_frame_features

__all__ = ["LowresCond", "LowresCondInput", "NoiseLevelEmbedding", "add_lowres_features", "add_noise_level",
           "lowres_cond_inputs"]


def lowres_cond_inputs(
    owner: str,
    enabled: bool,
    x: Tensor,
    lowres_cond: Tensor | None,
    lowres_noise_level: Any,
) -> tuple[Tensor, Tensor] | None:
    """Checked `(video (B, C, F, H, W), level (B,) float)` for input `x`, or None when nothing
    is given. `owner` names the U-Net in messages. An image `x` (B, C, H, W) takes an image
    `lowres_cond`. `lowres_noise_level`: a number or (B,) values in [0, 1]; None means 0 (the
    condition is clean). Giving it to a U-Net built without `lowres_cond` is an error."""
    if lowres_cond is None:
        if lowres_noise_level is not None:
            raise ValueError("lowres_noise_level goes with lowres_cond: lowres_cond is missing")
        return None
    if not enabled:
        raise ValueError(
            f"this {owner} was built without low-resolution conditioning (lowres_cond=False), got lowres_cond; "
            "build it with lowres_cond=True to use it as a super-resolution stage"
        )
    if not isinstance(lowres_cond, Tensor) or tuple(lowres_cond.shape) != tuple(x.shape):
        shape = tuple(lowres_cond.shape) if isinstance(lowres_cond, Tensor) else type(lowres_cond).__name__
        raise ValueError(
            f"lowres_cond must be the low-resolution video upsampled to the input's shape {tuple(x.shape)}, got {shape}"
        )
    batch = x.shape[0]
    if lowres_noise_level is None:
        level = torch.zeros(batch, device=x.device)
    else:
        if isinstance(lowres_noise_level, bool) or not isinstance(lowres_noise_level, (int, float, Tensor)):
            raise TypeError(
                f"lowres_noise_level must be a number or a ({batch},) tensor in [0, 1], "
                f"got {type(lowres_noise_level).__name__}"
            )
        level = torch.as_tensor(lowres_noise_level, dtype=torch.float32, device=x.device).reshape(-1)
        if level.shape[0] not in (1, batch) or not bool(((level >= 0) & (level <= 1)).all()):
            raise ValueError(
                f"lowres_noise_level must lie in [0, 1], a scalar or ({batch},) values, got {lowres_noise_level!r}"
            )
        level = level.expand(batch)
    video = lowres_cond if x.ndim == 5 else lowres_cond[:, :, None]
    return video, level


class LowresCondInput(_StartsAtZero):
    """Zero-initialised per-frame 3x3 projection of the upsampled low-res video to `dim`
    features, added to the output of a U-Net's input convolution."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        # Parameters held here, not in a child Conv2d (see `_StartsAtZero`).
        self.weight = nn.Parameter(torch.zeros(dim, channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(dim))

    def start_at_zero(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()

    def forward(self, h: Tensor, video: Tensor) -> Tensor:
        """`h + features` in any of the U-Nets' layouts (`add_frame_features`)."""
        batch, _, frames = video.shape[:3]
        folded = rearrange(video.to(self.weight.dtype), "b c f h w -> (b f) c h w")
        return add_frame_features(h, F.conv2d(folded, self.weight, self.bias, padding=1), batch, frames)


class NoiseLevelEmbedding(ScalarEmbedding):
    """Augmentation level (B,) in [0, 1] -> the timestep-embedding addend: features of
    1000 * level (the scale of a timestep)."""

    max_period = 10000.0

    def _angle_input(self, level: Tensor) -> Tensor:
        return level * 1000.0


class LowresCond(nn.Module):
    """The two parts a U-Net with `lowres_cond=True` holds: `input` (the video's projection)
    and `level` (the augmentation level's embedding)."""

    def __init__(self, channels: int, dim: int, emb_dim: int):
        super().__init__()
        self.input = LowresCondInput(channels, dim)
        self.level = NoiseLevelEmbedding(emb_dim)


def add_noise_level(module: LowresCond | None, emb: Tensor, lowres: tuple[Tensor, Tensor] | None) -> Tensor:
    """`emb` (B, E) plus the embedding of the augmentation level of `lowres` (what
    `lowres_cond_inputs` returned); `emb` unchanged without it."""
    if lowres is None or module is None:
        return emb
    return emb + module.level(lowres[1]).to(emb.dtype)


def add_lowres_features(module: LowresCond | None, h: Tensor, lowres: tuple[Tensor, Tensor] | None) -> Tensor:
    """The input convolution's output `h` plus the projected low-res video; `h` unchanged
    without it."""
    if lowres is None or module is None:
        return h
    return module.input(h, lowres[0])
