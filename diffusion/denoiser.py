"""Foreign U-Nets under the call convention (docs/design.md): one adapter per foreign signature.

A diffusers-style U-Net (`UNet2DConditionModel`, `UNet3DConditionModel`, `UNetMotionModel`,
or what `spacetime.inflate` makes of a 2D one) is called as

    model(sample, timestep, encoder_hidden_states=..., encoder_attention_mask=...,
          added_cond_kwargs=..., return_dict=False)

and returns a tensor, a tuple, or an output object with `.sample`. `as_denoiser(model)` wraps
it so that `GaussianDiffusion` and the trainer can call it as any U-Net of this library:
`forward(x, t, cond=None, cond_mask=None, null_cond_prob=0., enable_time=True)`.

The null condition (classifier-free guidance, Ho & Salimans 2022): for a model conditioned on
token embeddings the adapter's null condition is a fixed tensor `null_cond` of shape `(L, D)`;
dropped samples (training with `null_cond_prob`, and the unconditional half of guided
sampling) get it in place of their tokens, with an all-True mask. Its default is zeros
(`L = 1`, the model's `cross_attention_dim`): it needs no text encoder and is what the
adapter can build from the U-Net alone. Stable Diffusion itself was trained with the encoding
of the empty caption as its null; `set_null_cond(tokens)` installs that (or any other) tensor,
and `GaussianDiffusion.use_empty_caption_null()` does it with its own text encoder. The null
is a buffer, so it is saved with the model and a resumed run keeps it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

__all__ = ["DiffusersDenoiser", "as_denoiser", "is_diffusers_style"]

logger = logging.getLogger(__name__)

# The focus-present arguments are Unet3D's (video-diffusion-pytorch); a foreign U-Net has no
# equivalent, and the process only passes them when the user asked for them.
_UNSUPPORTED = ("focus_present_mask", "prob_focus_present")


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _inner_2d(model: nn.Module) -> nn.Module:
    """The 2D model inside an inflated one (`spacetime.inflate`), else the model itself."""
    from spacetime.inflate import InflatedModel

    return model.model if isinstance(model, InflatedModel) else model


def is_diffusers_style(model: Any) -> bool:
    """Whether `model` takes `(sample, timestep, encoder_hidden_states=...)` rather than the
    call convention; an inflated model is judged by the 2D model it holds."""
    if not isinstance(model, nn.Module) or isinstance(model, DiffusersDenoiser):
        return False
    params = _forward_params(_inner_2d(model))
    return "sample" in params and "timestep" in params and "cond" not in params


def _main_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"the U-Net returned {type(out).__name__}; expected a tensor, a tuple starting with one, "
        "or an object with a .sample tensor"
    )


class DiffusersDenoiser(nn.Module):
    """A diffusers-style U-Net under the call convention; see the module docstring.

    `cond_format` is "tokens" when the U-Net has cross-attention (`cross_attention_dim` in its
    config), else None. A plain 2D U-Net given a video runs on each frame (frames folded into
    the batch); an inflated or video U-Net gets the video. `added_cond_kwargs` (SDXL-style
    extra conditions) are passed on as given to the constructor."""

    def __init__(
        self,
        model: nn.Module,
        *,
        null_cond: Tensor | None = None,
        added_cond_kwargs: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not is_diffusers_style(model):
            raise TypeError(
                f"as_denoiser expects a diffusers-style U-Net (forward(sample, timestep, "
                f"encoder_hidden_states=...)), got {type(model).__name__}"
            )
        from spacetime.inflate import InflatedModel

        self.model = model
        inner = _inner_2d(model)
        self._video_native = isinstance(model, InflatedModel) or "num_frames" in _forward_params(inner) or (
            type(inner).__name__ in ("UNet3DConditionModel", "UNetMotionModel")
        )
        self._takes_enable_time = isinstance(model, InflatedModel)
        # diffusers' UNetMotionModel (0.3x-0.4x) takes its tokens per frame `(B*F, L, D)`;
        # UNet3DConditionModel and inflated models repeat per-video tokens themselves.
        self._tokens_per_frame = type(inner).__name__ == "UNetMotionModel"
        params = _forward_params(inner)
        self._takes_mask = "encoder_attention_mask" in params
        self._takes_states = "encoder_hidden_states" in params
        self.added_cond_kwargs = dict(added_cond_kwargs or {})
        config = getattr(inner, "config", None)
        cross = getattr(config, "cross_attention_dim", None)
        if isinstance(cross, (list, tuple)):
            cross = cross[0]
        self.cross_attention_dim: int | None = int(cross) if cross is not None and self._takes_states else None
        if self.cross_attention_dim is not None:
            default = torch.zeros(1, self.cross_attention_dim)
            self.register_buffer("null_cond", default if null_cond is None else self._check_null(null_cond))
        elif null_cond is not None:
            raise ValueError(f"null_cond given, but {type(inner).__name__} takes no condition (no cross_attention_dim)")

    # --- what the process reads ----------------------------------------------------------

    @property
    def cond_format(self) -> str | None:
        return "tokens" if self.cross_attention_dim is not None else None

    @property
    def config(self) -> Any:
        return getattr(_inner_2d(self.model), "config", None)

    def temporal_parameters(self):
        from spacetime.params import temporal_parameters

        return temporal_parameters(self.model)

    def spatial_parameters(self):
        from spacetime.params import spatial_parameters

        return spatial_parameters(self.model)

    def enable_gradient_checkpointing(self) -> None:
        enable = getattr(self.model, "enable_gradient_checkpointing", None)
        if not callable(enable):
            raise TypeError(f"{type(self.model).__name__} has no enable_gradient_checkpointing()")
        enable()

    def _check_null(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[1] != self.cross_attention_dim:
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(
                f"null_cond must be token embeddings (L, {self.cross_attention_dim}) (the U-Net's "
                f"cross_attention_dim), got {got}"
            )
        return tokens.detach().float().clone()

    def set_null_cond(self, tokens: Float[Tensor, "l d"]) -> None:
        """Install the null condition, e.g. the text encoder's tokens for the empty caption."""
        if self.cross_attention_dim is None:
            raise ValueError("set_null_cond: this U-Net takes no condition")
        self.null_cond = self._check_null(tokens).to(self.null_cond.device)

    # --- the call convention -------------------------------------------------------------

    def _with_null(
        self, cond: Tensor, cond_mask: Tensor | None, drop: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Replace the conditions of the samples where `drop` is True by the null condition,
        padding (or extending with the null) so that both have the same length."""
        null = self.null_cond.to(cond.dtype)
        length = max(cond.shape[1], null.shape[0])
        batch = cond.shape[0]
        if cond_mask is None and (length != cond.shape[1] or length != null.shape[0]):
            cond_mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
        if cond.shape[1] < length:
            cond = torch.cat([cond, cond.new_zeros(batch, length - cond.shape[1], cond.shape[2])], dim=1)
            assert cond_mask is not None
            cond_mask = torch.cat([cond_mask, cond_mask.new_zeros(batch, length - cond_mask.shape[1])], dim=1)
        null_tokens = torch.cat([null, null.new_zeros(length - null.shape[0], null.shape[1])], dim=0)
        cond = torch.where(drop.view(-1, 1, 1), null_tokens.expand_as(cond), cond)
        if cond_mask is not None:
            null_mask = torch.arange(length, device=cond.device) < null.shape[0]
            cond_mask = torch.where(drop.view(-1, 1), null_mask.expand_as(cond_mask), cond_mask)
        return cond, cond_mask

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        t: Tensor,
        cond: Float[Tensor, "b l d"] | None = None,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        null_cond_prob: float | int = 0.0,
        enable_time: Any = True,
        **unsupported: Any,
    ) -> Float[Tensor, "b c *frames h w"]:
        extra = sorted(set(unsupported))
        if extra:
            known = [name for name in extra if name in _UNSUPPORTED]
            raise TypeError(
                f"{type(_inner_2d(self.model)).__name__} (a diffusers-style U-Net) does not take "
                f"{known or extra}; only cond, cond_mask, null_cond_prob and enable_time are passed on"
            )
        batch = x.shape[0]
        kwargs: dict[str, Any] = {}
        if self.cross_attention_dim is not None:
            if cond is None:
                # Unconditional use of a conditioned model: everything gets the null.
                cond = self.null_cond.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
                cond_mask = None
            else:
                if cond.ndim != 3 or cond.shape[-1] != self.cross_attention_dim:
                    raise ValueError(
                        f"cond must be token embeddings (B, L, {self.cross_attention_dim}) for this U-Net "
                        f"(cross_attention_dim={self.cross_attention_dim}), got shape {tuple(cond.shape)}"
                    )
                if null_cond_prob > 0:
                    drop = torch.rand(batch, device=x.device) < null_cond_prob
                    cond, cond_mask = self._with_null(cond, cond_mask, drop)
            kwargs["encoder_hidden_states"] = cond.to(x.dtype)
            if cond_mask is not None and self._takes_mask and not bool(cond_mask.all()):
                kwargs["encoder_attention_mask"] = cond_mask
        elif cond is not None:
            raise ValueError(f"{type(_inner_2d(self.model)).__name__} takes no condition, but cond was given")
        elif self._takes_states:
            kwargs["encoder_hidden_states"] = None
        if self.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        if t.ndim == 0:
            t = t.expand(batch)
        if x.ndim == 5 and not self._video_native:
            frames = x.shape[2]
            folded = rearrange(x, "b c f h w -> (b f) c h w")
            kwargs = {k: _repeat(v, batch, frames) for k, v in kwargs.items()}
            out = _main_output(self.model(folded, t.repeat_interleave(frames), return_dict=False, **kwargs))
            return rearrange(out, "(b f) c h w -> b c f h w", b=batch)
        if self._takes_enable_time and enable_time is not True:
            kwargs["enable_time"] = enable_time
        if self._tokens_per_frame and x.ndim == 5:
            kwargs = {k: _repeat(v, batch, x.shape[2]) for k, v in kwargs.items()}
        return _main_output(self.model(x, t, return_dict=False, **kwargs))


def _repeat(value: Any, batch: int, frames: int) -> Any:
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat_interleave(frames, dim=0)
    if isinstance(value, dict):
        return {k: _repeat(v, batch, frames) for k, v in value.items()}
    return value


def as_denoiser(model: Any, **options: Any) -> nn.Module:
    """`model` under the call convention: a diffusers-style U-Net (or an inflated one) is
    wrapped in `DiffusersDenoiser(model, **options)`; a module that already follows the
    convention is returned as it is (options are then refused)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"as_denoiser expects an nn.Module, got {type(model).__name__}")
    if is_diffusers_style(model):
        return DiffusersDenoiser(model, **options)
    if options:
        raise TypeError(
            f"as_denoiser options {sorted(options)} apply to diffusers-style U-Nets only; "
            f"{type(model).__name__} already follows the call convention"
        )
    return model
