"""What every U-Net shares: `UnetMixin`.

A U-Net class derives from `(UnetMixin, nn.Module)`, sets `config_class`, stores its config
as `self.config` and implements `frame_multiple` / `size_multiple`. The mixin then provides
the rest of the common surface (docs/api.md, docs/design.md "U-Net call convention"):

- `from_config(config)` (what `unets.build` calls) and `save_pretrained(path)`;
- `temporal_parameters()` / `spatial_parameters()` (split by `spacetime.mark_temporal`);
- `enable_gradient_checkpointing()` plus `checkpointed(fn, *args)` to wrap each block;
- `forward_with_cond_scale(...)` (classifier-free guidance, Ho & Salimans 2022, eq. 6);
- input checks (`check_input`), per-sample condition dropout (`cond_keep_mask`) and the
  rejection of call-convention arguments a U-Net does not support (`reject_unsupported`).

The mixin knows nothing of diffusion: `t` is just another input.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from spacetime.params import spatial_parameters, temporal_parameters
from unets.config import UnetConfig

__all__ = ["UnetMixin", "guidance_mix"]

_log = logging.getLogger(__name__)


def guidance_mix(
    out_cond: Tensor, out_uncond: Tensor, cond_scale: float | int, guidance_rescale: float | int = 0.0
) -> Tensor:
    """`uncond + cond_scale * (cond - uncond)` (Ho & Salimans 2022, eq. 6). With
    `guidance_rescale` = phi > 0, the result's per-sample std is pulled back towards the
    conditional output's (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", eq. 15-16), which undoes the over-exposure of large scales."""
    guided = out_uncond + (out_cond - out_uncond) * cond_scale
    if guidance_rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    std_cond = out_cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True).clamp(min=1e-12)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


class UnetMixin:
    """Shared surface of every registered U-Net (use as `class X(UnetMixin, nn.Module)`)."""

    config_class: ClassVar[type[UnetConfig]]
    config: UnetConfig
    gradient_checkpointing: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The config dataclass is the one declaration of the options: the constructor takes
        # `*args, **options` and this makes `inspect.signature(cls)` list them.
        if "config_class" in cls.__dict__:
            cls.__signature__ = cls.config_class.signature()  # type: ignore[attr-defined]

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: UnetConfig | Mapping[str, Any]) -> nn.Module:
        """Build from a config instance or its `to_dict()`. The default passes the config's
        fields (nested parts as instances) as keyword arguments to the constructor."""
        if isinstance(config, Mapping):
            config = cls.config_class.from_dict(config)
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__}.from_config expects a {cls.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    # --- conditioning -------------------------------------------------------------------

    # What `cond` the forward takes, derived from the config: None (unconditional), "pooled"
    # (a `(B, D)` vector) or "tokens" (`(B, L, D)` token embeddings plus a `(B, L)` mask).
    COND_FORMATS: ClassVar[tuple[str | None, ...]] = (None, "pooled", "tokens")

    @property
    def cond_format(self) -> str | None:
        """None, "pooled" or "tokens": the condition this network takes (read-only)."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its cond_format")

    @property
    def cond_on_tokens(self) -> bool:
        """Read-only alias of `cond_format == "tokens"` (kept for callers of the old attribute)."""
        return self.cond_format == "tokens"

    @cond_on_tokens.setter
    def cond_on_tokens(self, value: bool) -> None:
        # Older callers set the attribute after building; the format now follows the config,
        # so only a value that agrees with it is accepted (and changes nothing).
        if bool(value) != self.cond_on_tokens:
            raise AttributeError(
                f"cond_on_tokens is derived from the config (cond_format={self.cond_format!r}); "
                f"got cond_on_tokens={value!r}: rebuild {type(self).__name__} with the conditioning "
                "options instead"
            )

    # --- shape limits -------------------------------------------------------------------

    @property
    def frame_multiple(self) -> int:
        """Frame counts must be a multiple of this (when time is enabled)."""
        raise NotImplementedError(f"{type(self).__name__} must define frame_multiple")

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be a multiple of this."""
        raise NotImplementedError(f"{type(self).__name__} must define size_multiple")

    def check_input(self, x: Tensor, enable_time: bool | Tensor, channels: int) -> None:
        """Raise `ValueError` unless `x` is an image `(B, C, H, W)` or a video
        `(B, C, F, H, W)` with `C == channels`, H and W multiples of `size_multiple` and, when
        time is enabled (for any sample), F a multiple of `frame_multiple`. Only shapes are
        read, so this costs nothing under `torch.compile`."""
        if x.ndim not in (4, 5):
            raise ValueError(
                f"input must be an image batch (B, C, H, W) or a video batch (B, C, F, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != channels:
            raise ValueError(f"input must have {channels} channels (dim 1), got {x.shape[1]}")
        height, width = x.shape[-2:]
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(f"height and width must be multiples of {m}, got {height}x{width}")
        if isinstance(enable_time, Tensor):
            if enable_time.dtype != torch.bool or enable_time.shape != (x.shape[0],):
                raise ValueError(
                    f"enable_time must be a bool or a bool tensor of shape ({x.shape[0]},), got a "
                    f"{enable_time.dtype} tensor of shape {tuple(enable_time.shape)}"
                )
        elif not isinstance(enable_time, bool):
            raise TypeError(f"enable_time must be a bool or a bool tensor, got {type(enable_time).__name__}")
        # A per-sample mask computes the temporal path for the whole batch, so its frames
        # must fit the temporal down/upsamplers even if some samples have time off.
        time_on = isinstance(enable_time, Tensor) or enable_time
        if x.ndim == 5 and time_on and x.shape[2] % self.frame_multiple:
            raise ValueError(
                f"frames must be a multiple of {self.frame_multiple}, got {x.shape[2]} "
                f"(or pass enable_time=False)"
            )

    # --- parameters ---------------------------------------------------------------------

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that mix information across frames (see `spacetime.params`)."""
        return temporal_parameters(self)  # type: ignore[arg-type]

    def spatial_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter; with `temporal_parameters()` covers each exactly once."""
        return spatial_parameters(self)  # type: ignore[arg-type]

    # --- gradient checkpointing ---------------------------------------------------------

    def enable_gradient_checkpointing(self, enabled: bool = True) -> UnetMixin:
        """Recompute each block's activations in the backward pass instead of storing them
        (opt-in: saves memory, costs about one extra forward). Returns the model."""
        self.gradient_checkpointing = bool(enabled)
        return self

    def checkpointed(self, fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """`fn(*args, **kwargs)`, checkpointed when enabled and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    # --- conditioning -------------------------------------------------------------------

    def cond_keep_mask(self, batch: int, null_cond_prob: float, device: torch.device) -> Tensor | None:
        """Per-sample bool mask `(B,)`, True = keep the condition, False = use the null
        embedding (classifier-free guidance training). None when every sample keeps it.

        While `forward_with_cond_scale` makes its batched call, the mask it set (conditional
        half kept, unconditional half dropped) is returned instead."""
        forced = self.__dict__.get("_guidance_keep")
        if forced is not None and forced.shape[0] == batch:
            self.__dict__["_guidance_keep_used"] = True
            return forced.to(device)
        if not 0.0 <= null_cond_prob <= 1.0:
            raise ValueError(f"null_cond_prob must be in [0, 1], got {null_cond_prob}")
        if null_cond_prob == 0.0:
            return None
        if null_cond_prob == 1.0:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        return torch.rand(batch, device=device) >= null_cond_prob

    def reject_unsupported(self, **given: Any) -> None:
        """Raise `ValueError` for call-convention arguments this U-Net does not support,
        given with a non-default value (`None`, `0.` and `False` are defaults)."""
        for key, value in given.items():
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
                continue
            if value is False:
                continue
            raise ValueError(f"{type(self).__name__} does not support {key}= (got {value!r}); leave it at its default")

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
        """Classifier-free guidance: `uncond + cond_scale * (cond - uncond)` (Ho & Salimans
        2022, eq. 6), optionally rescaled (`guidance_rescale`, Lin et al. 2023, sec. 3.4).
        `cond_scale == 1` (or no condition) makes a single call.

        `batched`: True runs both halves as one call on the inputs concatenated with
        themselves (twice the batch, half the calls); False makes two calls; None (default)
        batches and falls back to two calls if the device runs out of memory."""
        kwargs.pop("null_cond_prob", None)
        if cond_scale == 1.0 or cond is None:
            return self(x, t, cond=cond, cond_mask=cond_mask, null_cond_prob=0.0, **kwargs)  # type: ignore[operator]
        if batched is not False:
            try:
                pair = self._guidance_pair_batched(x, t, cond, cond_mask, kwargs)
            except torch.OutOfMemoryError:
                if batched:
                    raise
                _log.warning("batched guidance ran out of memory; using two calls per step from now on")
                self.__dict__["_guidance_batched_failed"] = True
                pair = None
            if pair is not None:
                return guidance_mix(pair[0], pair[1], cond_scale, guidance_rescale)
        out = self(x, t, cond=cond, cond_mask=cond_mask, null_cond_prob=0.0, **kwargs)  # type: ignore[operator]
        null = self(x, t, cond=cond, cond_mask=cond_mask, null_cond_prob=1.0, **kwargs)  # type: ignore[operator]
        return guidance_mix(out, null, cond_scale, guidance_rescale)

    def _guidance_pair_batched(
        self, x: Tensor, t: Tensor | None, cond: Tensor, cond_mask: Tensor | None, kwargs: dict[str, Any]
    ) -> tuple[Tensor, Tensor] | None:
        """(conditional, unconditional) outputs from one call on `[x; x]`, or None when this
        U-Net cannot take it (it does not drop conditions through `cond_keep_mask`, or an
        earlier batched call ran out of memory)."""
        if self.__dict__.get("_guidance_batched_failed"):
            return None
        batch = x.shape[0]

        def twice(value: Any) -> Any:
            # Per-sample inputs (first dim = batch) are repeated; shared ones pass as they are.
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch:
                return torch.cat([value, value])
            return value

        keep = torch.cat([torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)]).to(x.device)
        self.__dict__["_guidance_keep"] = keep
        self.__dict__["_guidance_keep_used"] = False
        try:
            out = self(  # type: ignore[operator]
                twice(x), twice(t), cond=twice(cond), cond_mask=twice(cond_mask), null_cond_prob=0.0,
                **{key: twice(value) for key, value in kwargs.items()},
            )
            used = self.__dict__.get("_guidance_keep_used", False)
        finally:
            self.__dict__.pop("_guidance_keep", None)
            self.__dict__.pop("_guidance_keep_used", None)
        if not used:
            _log.warning("%s does not drop conditions through cond_keep_mask; guidance uses two calls", type(self).__name__)
            self.__dict__["_guidance_batched_failed"] = True
            return None
        return out[:batch], out[batch:]

    # --- checkpoints --------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into folder `path`; `unets.load(path)`
        rebuilds the model. Returns the folder."""
        from unets.io import save_pretrained

        return save_pretrained(self, path)  # type: ignore[arg-type]
