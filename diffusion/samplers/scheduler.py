"""Sampling driven by a diffusers scheduler instance (`DDIMScheduler`, `DPMSolverMultistepScheduler`,
`EulerDiscreteScheduler`, `UniPCMultistepScheduler`, ...).

The scheduler is rebuilt from its own config with this process's betas (`trained_betas`), so
its `alphas_cumprod` are exactly the ones the model was trained with, whatever schedule the
given instance was made for. It receives the model output in its own `prediction_type`, which
must name the process's objective: a mismatch would silently turn eps into x0, so it is an
error. Diffusers is imported by the caller's scheduler only; nothing here needs it installed.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from diffusion.samplers.discrete import Callback, ModelFn
from diffusion.samplers.sigma import VPSigmas
from diffusion.schedules import NoiseSchedule, objective_target

# GaussianDiffusion objective -> diffusers prediction_type
PREDICTION_TYPES = {"noise": "epsilon", "x0": "sample", "v": "v_prediction"}


def scheduler_for_process(scheduler: Any, betas: Tensor, objective: str) -> Any:
    """A copy of `scheduler` set to `betas`; raises if it is not a diffusers DDPM-family
    scheduler or its prediction type is not `objective`."""
    config = getattr(scheduler, "config", None)
    missing = [name for name in ("set_timesteps", "step", "scale_model_input") if not callable(getattr(scheduler, name, None))]
    if config is None or missing or not callable(getattr(type(scheduler), "from_config", None)):
        raise TypeError(
            f"scheduler must be a diffusers scheduler instance (config, set_timesteps, scale_model_input, step), "
            f"got {type(scheduler).__name__}"
        )
    prediction = config.get("prediction_type", "epsilon")
    wanted = PREDICTION_TYPES[objective]
    if prediction != wanted:
        raise ValueError(
            f"{type(scheduler).__name__} has prediction_type={prediction!r} but this process's objective is "
            f"{objective!r}, which diffusers calls {wanted!r}; make it with prediction_type={wanted!r}"
        )
    overrides: dict[str, Any] = {
        "num_train_timesteps": int(betas.shape[0]),
        "trained_betas": betas.detach().to("cpu", torch.float64).tolist(),
    }
    # The betas handed over are already final; rescaling them again would change the process.
    if "rescale_betas_zero_snr" in config:
        overrides["rescale_betas_zero_snr"] = False
    rebuilt = type(scheduler).from_config(config, **overrides)
    abar = getattr(rebuilt, "alphas_cumprod", None)
    expected = torch.cumprod(1.0 - betas.detach().to("cpu", torch.float64), dim=0)
    if not isinstance(abar, Tensor) or abar.shape != expected.shape or not torch.allclose(
        abar[:-1].to(torch.float64), expected[:-1], rtol=1e-4, atol=1e-6
    ):
        raise ValueError(
            f"{type(scheduler).__name__} does not take this process's betas (trained_betas); use a scheduler of the "
            "DDPM family (DDIM, DPM-Solver, Euler, Heun, UniPC, ...)"
        )
    return rebuilt


def scheduler_sample(
    scheduler: Any,
    model_fn: ModelFn,
    noise: Tensor,
    schedule: NoiseSchedule,
    objective: str,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Sample with `scheduler` (see `scheduler_for_process`) from unit noise `noise` in
    `steps` steps (default 50). `model_fn` is called at the scheduler's timesteps, fractional
    ones (Karras sigmas) included, and its `(x0, eps)` handed to the scheduler in its
    prediction type."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    sched = scheduler_for_process(scheduler, schedule.betas, objective)
    sched.set_timesteps(50 if steps is None else steps, device=noise.device)
    sigmas_map = VPSigmas(schedule.alphas_cumprod)
    x = noise * float(sched.init_noise_sigma)
    step_kwargs: dict[str, Any] = {"return_dict": False}
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = generator
    for step, t in enumerate(sched.timesteps):
        model_input = sched.scale_model_input(x, t)
        times = t.reshape(1).expand(x.shape[0]).to(x.device)
        x0, eps = model_fn(model_input, times)
        if callback is not None:
            callback(step, int(round(float(t))), model_input, x0)
        if times.is_floating_point():
            alpha, sigma = sigmas_map.alpha_sigma(times[:1].cpu())
        else:
            abar = schedule.alphas_cumprod.cpu()[times[:1].cpu()].to(torch.float64)
            alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        out = objective_target(
            objective, x0, eps, alpha.to(x.device, x.dtype), sigma.to(x.device, x.dtype)
        )
        x = sched.step(out, t, x, **step_kwargs)[0]
    return x
