"""Samplers: plain functions of `(model_fn, x, schedule, ...)` with no hidden state.

`model_fn(x_t, t) -> (x0, eps)` is the denoiser already converted to the pair of clean-sample
and noise predictions (see `diffusion.schedules.prediction_to_x0_eps`); guidance and
thresholding happen inside it, so a sampler never sees the training objective (eps, x0 and
v models give the same trajectory) nor whether it runs in pixel or latent space.

Two families:
- `ddpm`, `ddim` (`diffusion.samplers.discrete`) step over the training timesteps;
- `euler`, `euler_ancestral`, `heun`, `dpmpp_2m`, `dpmpp_2m_sde` (`diffusion.samplers.sigma`)
  solve the probability-flow ODE / SDE in sigma space, optionally on Karras et al.'s sigmas,
  which calls the model at fractional timesteps (`model_fn` then gets a float `t`).

`sample_loop(name, ...)` runs any of them; `available()` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion.samplers.discrete import (
    DISCRETE_SAMPLERS,
    Callback,
    ModelFn,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
)
from diffusion.samplers.sigma import (
    SPACINGS,
    Denoiser,
    VPSigmas,
    karras_sigmas,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    spaced_timesteps,
    to_d,
)
from diffusion.schedules import NoiseSchedule

__all__ = [
    "SAMPLERS", "SPACINGS", "Callback", "Denoiser", "ModelFn", "VPSigmas", "available", "ddim_sample",
    "ddim_step", "ddim_timesteps", "ddpm_sample", "ddpm_step", "karras_sigmas", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_loop",
    "progress_bar", "sampler_uses_noise", "sigma_denoiser", "sigma_sample", "spaced_timesteps", "to_d",
]

# name -> (function, whether it draws noise, its default eta)
_SIGMA_SAMPLERS: dict[str, tuple[Callable[..., Tensor], bool, float]] = {
    "dpmpp_2m": (sample_dpmpp_2m, False, 0.0),
    "dpmpp_2m_sde": (sample_dpmpp_2m_sde, True, 1.0),
    "euler": (sample_euler, False, 0.0),
    "euler_ancestral": (sample_euler_ancestral, True, 1.0),
    "heun": (sample_heun, False, 0.0),
}
SAMPLERS = DISCRETE_SAMPLERS + tuple(_SIGMA_SAMPLERS)


def available() -> tuple[str, ...]:
    """Every sampler name `sample_loop` (and `GaussianDiffusion.sample(sampler=...)`) takes."""
    return SAMPLERS


def check_sampler(sampler: str, allowed: tuple[str, ...] = SAMPLERS) -> str:
    if sampler not in allowed:
        from spacetime.checks import did_you_mean

        raise ValueError(f"sampler must be one of {allowed}, got {sampler!r}{did_you_mean(str(sampler), allowed)}")
    return sampler


def sampler_uses_noise(sampler: str, eta: float | int | None) -> bool:
    if sampler == "ddpm":
        return True
    if sampler == "ddim":
        return bool(eta)
    _, noisy, default = _SIGMA_SAMPLERS[sampler]
    return noisy and (default if eta is None else eta) > 0


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device, so a CPU-seeded generator reproduces on any device.
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def sigma_denoiser(model_fn: ModelFn, sigmas: VPSigmas | object) -> Denoiser:
    """`model_fn` (on the process's `x_t` and timesteps) as a sigma-space denoiser: the scaled
    `x` is multiplied back by the process's `input_scale(sigma)`, the model called at the
    (fractional) timestep `sigma_to_t(sigma)`."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        t = sigmas.sigma_to_t(sigma.reshape(1))  # type: ignore[attr-defined]
        scale = sigmas.input_scale(sigma).to(device=x.device, dtype=x.dtype)  # type: ignore[attr-defined]
        times = t.to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        x0, _ = model_fn(x * scale, times)
        return x0

    return denoiser


def sigma_sample(
    sampler: str,
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    *,
    eta: float | int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Run the named sigma-space sampler from unit-variance `noise` down the `sigmas`
    (descending, ending at 0); returns the clean sample."""
    fn, noisy, default_eta = _SIGMA_SAMPLERS[check_sampler(sampler, tuple(_SIGMA_SAMPLERS))]
    sigmas = sigmas.to(torch.float64)
    if not bool((sigmas[:-1] > sigmas[1:]).all()) or float(sigmas[-1]) != 0.0:
        raise ValueError("sigmas must be strictly decreasing and end at 0")
    # Pure noise as the process's x_T, seen in the scaled space at the first sigma.
    x = noise * float((1.0 + sigmas[0] ** 2).sqrt())
    kwargs: dict[str, object] = {"callback": callback}
    if noisy:
        kwargs["eta"] = default_eta if eta is None else eta
        kwargs["noise"] = lambda like: randn_like(like, generator)
    elif eta not in (None, 0, 0.0):
        raise ValueError(f"eta applies to samplers 'ddim', 'euler_ancestral' and 'dpmpp_2m_sde', got eta={eta} with {sampler!r}")
    return fn(denoiser, x, sigmas, **kwargs)


def sample_loop(
    sampler: str,
    model_fn: ModelFn,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    eta: float | int | None = None,
    spacing: str = "linspace",
    karras: bool | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run the named sampler from the noise `x` on a DDPM `schedule`.

    `ddpm` visits every timestep: `steps` may only be left out or equal `timesteps`, and
    `eta` must be left out. The others take `steps` (default: 50, `ddim`: every timestep)
    on the timesteps chosen by `spacing` (`linspace`, `leading`, `trailing`), or, with
    `karras=True` (sigma-space samplers only), on Karras et al.'s sigmas between the
    schedule's smallest and largest. `eta` scales the fresh noise of `ddim`,
    `euler_ancestral` and `dpmpp_2m_sde` (defaults 0, 1, 1). `karras=None` is each sampler's
    default: Karras sigmas for `heun`, the timestep grid for the others."""
    check_sampler(sampler)
    if karras is None:
        # Heun's trapezoid assumes the slope changes linearly over a step. On a timestep grid
        # the first step of a cosine schedule falls from sigma ~ 10^2..10^3 to ~ 5, where the
        # slope does not, and the correction then amplifies the change in the clean-sample
        # prediction by sigma / sigma_next (on the demo, direction 0% at 10 steps); Karras
        # sigmas shrink geometrically at high noise. Euler and the exponential integrators
        # (DDIM, DPM-Solver++) have no such term.
        karras = sampler == "heun"
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    num_timesteps = schedule.num_timesteps
    if eta is not None and not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if sampler == "ddpm":
        if steps is not None and steps != num_timesteps:
            if isinstance(steps, int) and not isinstance(steps, bool) and steps > num_timesteps:
                raise ValueError(f"steps must be at most timesteps={num_timesteps}, got {steps}")
            raise ValueError(
                f"sampler 'ddpm' runs all {num_timesteps} timesteps, got steps={steps!r}; "
                "use sampler='ddim' (eta=1 for an ancestral sampler) or 'dpmpp_2m' for fewer steps"
            )
        if eta not in (None, 0, 0.0):
            raise ValueError(f"eta applies to sampler 'ddim' and the ancestral samplers, got eta={eta} with 'ddpm'")
        if karras:
            raise ValueError("karras=True applies to the sigma-space samplers, not 'ddpm'")
        return ddpm_sample(model_fn, x, schedule, generator=generator, callback=callback)
    if sampler == "ddim":
        if karras:
            raise ValueError("karras=True applies to the sigma-space samplers, not 'ddim' (use 'euler', its equivalent)")
        return ddim_sample(
            model_fn, x, schedule, steps=steps, eta=0.0 if eta is None else eta, spacing=spacing,
            generator=generator, callback=callback,
        )
    sigmas_map = VPSigmas(schedule.alphas_cumprod)
    count = min(50, num_timesteps) if steps is None else steps
    if karras:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        sigmas = sigmas_map.karras(count)
    else:
        sigmas = sigmas_map.timestep_sigmas(spaced_timesteps(num_timesteps, count, spacing))
    sigma_callback = None
    if callback is not None:
        report = callback

        def sigma_callback(step: int, sigma: float, x_scaled: Tensor, x0: Tensor) -> None:
            t = float(sigmas_map.sigma_to_t(torch.tensor([sigma], dtype=torch.float64)))
            report(step, round(t), x_scaled * float(sigmas_map.input_scale(torch.tensor(sigma))), x0)

    return sigma_sample(
        sampler, sigma_denoiser(model_fn, sigmas_map), x, sigmas, eta=eta, generator=generator,
        callback=sigma_callback,
    )


def progress_bar(name: str, num_timesteps: int, steps: int | None) -> tuple[Any, Callback]:
    """A tqdm bar over the sampler's steps and the callback that advances it."""
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("progress=True needs tqdm: pip install 'spacetime-video[train]'") from error
    if name == "ddpm" or (steps is None and name == "ddim"):
        total = num_timesteps
    else:
        total = 50 if steps is None else steps
    bar = tqdm(total=total, desc=f"{name} sampling")

    def callback(step: int, t: int, x: Tensor, x0: Tensor) -> None:
        bar.update(1)

    return bar, callback
