"""The `enable_time` switch shared by every layer.

`enable_time` is a Python bool or a bool tensor of shape `(B,)`. A per-sample tensor lets one
batch mix images (single frames, no mixing across frames) and videos: layers compute the
temporal path for the whole batch and keep the result only where the mask is True, so the
shapes (and a compiled graph) never depend on the mask's values.
"""

from __future__ import annotations

import torch
from torch import Tensor

EnableTime = bool | Tensor


def check_enable_time(enable_time: EnableTime, batch: int) -> EnableTime:
    """Validate `enable_time` for a batch of `batch` samples and return it unchanged."""
    if isinstance(enable_time, bool):
        return enable_time
    if isinstance(enable_time, Tensor):
        if enable_time.dtype != torch.bool or enable_time.shape != (batch,):
            raise ValueError(
                f"enable_time must be a bool or a bool tensor of shape ({batch},), got a "
                f"{enable_time.dtype} tensor of shape {tuple(enable_time.shape)}"
            )
        return enable_time
    raise TypeError(f"enable_time must be a bool or a bool tensor, got {type(enable_time).__name__}")


def time_enabled(x: Tensor, enable_time: EnableTime) -> EnableTime:
    """What the temporal path should do for `x`: False for images `(B, C, H, W)` or when
    switched off, True when on for all samples, else the per-sample bool mask `(B,)`."""
    if x.ndim != 5:
        return False
    return check_enable_time(enable_time, x.shape[0])


def select_time(enabled: EnableTime, with_time: Tensor, without_time: Tensor) -> Tensor:
    """Per sample, `with_time` where time is enabled and `without_time` elsewhere.

    Both are `(B, ...)`; `enabled` is what `time_enabled` returned (never False here)."""
    if isinstance(enabled, bool):
        return with_time if enabled else without_time
    mask = enabled.view(-1, *([1] * (with_time.ndim - 1)))
    return torch.where(mask, with_time, without_time)
