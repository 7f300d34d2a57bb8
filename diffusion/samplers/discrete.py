"""The samplers on the timestep grid of the DDPM process (ancestral DDPM, DDIM): plain
functions of `(model_fn, x, schedule, ...)` with no hidden state.

`model_fn(x_t, t) -> (x0, eps)` is the denoiser already converted to the pair of clean-sample
and noise predictions (see `diffusion.schedules.prediction_to_x0_eps`); guidance and
thresholding happen inside it. So the samplers never see the training objective, and any
model expressed in any objective gives the same trajectory for the same noise.

`x` is the starting noise `x_T ~ N(0, I)`; every further random draw comes from `generator`
(on any device), so a seeded generator makes sampling reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion.samplers.sigma import spaced_timesteps
from diffusion.schedules import NoiseSchedule, extract

ModelFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# callback(step, t, x_t, x0): called once per step, before the update, for progress or logging.
Callback = Callable[[int, int, Tensor, Tensor], None]

DISCRETE_SAMPLERS = ("ddpm", "ddim")


def _timestep_batch(x: Tensor, t: int) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device, so a CPU-seeded generator reproduces on any device.
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def ddpm_step(
    x0: Float[Tensor, "b *dims"],
    x_t: Float[Tensor, "b *dims"],
    t: Int[Tensor, " b"],
    schedule: NoiseSchedule,
    noise: Float[Tensor, "b *dims"],
) -> Float[Tensor, "b *dims"]:
    """One ancestral step: a draw from `q(x_{t-1} | x_t, x_0 = x0)` (Ho et al. 2020, eq. 6-7),
    with the fixed "small" variance beta-tilde. No noise is added at `t == 0`."""
    mean = extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0 + extract(
        schedule.posterior_mean_coef2, t, x_t.ndim
    ) * x_t
    std = (0.5 * extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)).exp()
    not_last = (t != 0).to(x_t.dtype).view((-1,) + (1,) * (x_t.ndim - 1))
    return mean + not_last * std * noise


def ddpm_sample(
    model_fn: ModelFn,
    x: Float[Tensor, "b *dims"],
    schedule: NoiseSchedule,
    *,
    t_start: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Float[Tensor, "b *dims"]:
    """Ancestral sampling over every timestep from `t_start` (default: the last) down to 0.

    `x` is `x_{t_start}`; with the default that is pure noise."""
    num_timesteps = schedule.num_timesteps
    start = num_timesteps - 1 if t_start is None else t_start
    if not 0 <= start < num_timesteps:
        raise ValueError(f"t_start must lie in [0, {num_timesteps}), got {t_start}")
    for step, i in enumerate(range(start, -1, -1)):
        t = _timestep_batch(x, i)
        x0, _ = model_fn(x, t)
        if callback is not None:
            callback(step, i, x, x0)
        x = ddpm_step(x0, x, t, schedule, _randn_like(x, generator))
    return x


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """The `steps` timesteps DDIM visits, descending (`spaced_timesteps`); with the default
    `linspace` spacing the first step starts from the noisiest timestep and the last lands
    on timestep 0."""
    return spaced_timesteps(num_timesteps, steps, spacing)


def ddim_step(
    x0: Float[Tensor, "b *dims"],
    eps: Float[Tensor, "b *dims"],
    abar_prev: Tensor,
    sigma: Tensor,
    noise: Float[Tensor, "b *dims"],
) -> Float[Tensor, "b *dims"]:
    """Song et al. 2021 (DDIM), eq. 12: `x_prev = sqrt(abar_prev) x0 +
    sqrt(1 - abar_prev - sigma**2) eps + sigma z`."""
    direction = (1.0 - abar_prev - sigma**2).clamp(min=0.0).sqrt()
    return abar_prev.sqrt() * x0 + direction * eps + sigma * noise


def ddim_sample(
    model_fn: ModelFn,
    x: Float[Tensor, "b *dims"],
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    eta: float | int = 0.0,
    spacing: str = "linspace",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Float[Tensor, "b *dims"]:
    """DDIM over `steps` timesteps (default: all of them).

    `eta` scales the noise of each step (Song et al. 2021, eq. 16): 0 is the deterministic
    DDIM, 1 over all timesteps is exactly the ancestral DDPM sampler."""
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    num_timesteps = schedule.num_timesteps
    times = ddim_timesteps(num_timesteps, num_timesteps if steps is None else steps, spacing)
    abar = schedule.alphas_cumprod
    for step, (i, i_prev) in enumerate(zip(times, times[1:] + [-1])):
        t = _timestep_batch(x, i)
        x0, eps = model_fn(x, t)
        if callback is not None:
            callback(step, i, x, x0)
        abar_t = abar[i]
        # Past timestep 0 the target is the clean sample itself: abar = 1, no noise.
        abar_prev = abar[i_prev] if i_prev >= 0 else torch.ones_like(abar_t)
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)).clamp(min=0.0).sqrt()
        noise = _randn_like(x, generator) if eta > 0.0 and i_prev >= 0 else torch.zeros_like(x)
        x = ddim_step(x0, eps, abar_prev, sigma, noise)
    return x
