"""Exponential moving average of a model's weights, for sampling.

Samples from the averaged weights are markedly better than from the raw ones (Ho et al. 2020,
DDPM, App. B uses decay 0.9999; video-diffusion-pytorch 0.995 every 10 steps). As there,
the average is held equal to the model until `start_step`, so early, poor weights do not
linger in it, and is updated every `update_every` steps.

Sharded models (FSDP2, whose parameters are DTensors) are averaged shard by shard: the EMA
copy is sharded like the model, and each rank updates its own local pieces without any
communication.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that shares, rather than copies, frozen text encoders.

    A diffusion model's text encoder (and its cache of encoded captions) is no part of the
    trained weights; `diffusion.text.TextEncoder.__deepcopy__` returns the encoder itself,
    so the copy (an EMA model, a sampling copy) shares it instead of duplicating hundreds
    of megabytes of weights and re-encoding every caption."""
    return copy.deepcopy(model)


class EMA:
    """Keeps `ema_model`, the moving average of `model`'s parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, *, beta: float = 0.995, update_every: int = 10, start_step: int = 2000):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {beta}")
        if update_every < 1:
            raise ValueError(f"update_ema_every must be >= 1, got {update_every}")
        if start_step < 0:
            raise ValueError(f"step_start_ema must be >= 0, got {start_step}")
        self.beta = float(beta)
        self.update_every = update_every
        self.start_step = start_step
        self.ema_model = frozen_copy(model)
        self.ema_model.requires_grad_(False)
        self.ema_model.eval()

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from diffusion.distributed import local_tensor

        ema_params = [local_tensor(p) for p in self.ema_model.parameters()]
        params = [local_tensor(p.detach()) for p in model.parameters()]
        if len(ema_params) != len(params):
            raise RuntimeError("the model's parameters changed since its EMA copy was made")
        return ema_params, params

    @torch.no_grad()
    def _copy_buffers(self, model: nn.Module) -> None:
        for ema_buffer, buffer in zip(self.ema_model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        ema_params, params = self._pairs(model)
        for ema, param in zip(ema_params, params):
            ema.copy_(param)
        self._copy_buffers(model)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Called once per optimizer step with the step's index (0-based, before it counts)."""
        if step % self.update_every != 0:
            return
        if step < self.start_step:
            self.copy_from(model)
            return
        ema_params, params = self._pairs(model)
        floating = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floating:
            # ema <- beta * ema + (1 - beta) * p, i.e. lerp towards p by (1 - beta)
            torch._foreach_lerp_([e for e, _ in floating], [p.to(e.dtype) for e, p in floating], 1.0 - self.beta)
        self._copy_buffers(model)
