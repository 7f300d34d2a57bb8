"""Noise schedules of the variance-preserving (DDPM) process and the objective conversions.

The forward process is `x_t = alpha_t * x_0 + sigma_t * eps` with `alpha_t = sqrt(abar_t)`,
`sigma_t = sqrt(1 - abar_t)` (Ho et al. 2020, eq. 4), where `abar_t` is `alphas_cumprod`.
Timestep index `t` runs over `[0, timesteps)`; index `t` is step `t + 1` of the papers, so
`alphas_cumprod[0] = 1 - betas[0]` is already slightly noisy and `alphas_cumprod_prev[0] = 1`.

A network may predict the noise `eps`, the clean sample `x0`, or the velocity
`v = alpha_t * eps - sigma_t * x0` (Salimans & Ho 2022, "Progressive distillation", sec. 4).
Since `alpha_t**2 + sigma_t**2 == 1`, each is an affine function of any other given `x_t`;
the conversions below are the only place that knows this, so samplers and losses work in
`(x0, eps)` and never look at which objective a network was trained for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from jaxtyping import Float
from torch import Tensor

BETA_SCHEDULES = ("cosine", "linear", "sigmoid")
OBJECTIVES = ("noise", "x0", "v")
# Losses between a network output and its objective's target (GaussianDiffusion.loss_type).
LOSS_TYPES = ("l1", "l2", "huber")


# --- beta schedules (float64, shape (timesteps,)) -------------------------------------------


def _check_timesteps(timesteps: int) -> None:
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")


def _betas_from_alphas_cumprod(alphas_cumprod: Tensor, max_beta: float | int) -> Tensor:
    # beta_t = 1 - abar_t / abar_{t-1} (Nichol & Dhariwal 2021, sec. 3.2); clipping keeps the
    # last steps from being singular where abar reaches 0.
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0.0, max_beta)


def cosine_beta_schedule(timesteps: int, s: float | int = 0.008, max_beta: float | int = 0.9999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: `abar(t) = f(t) / f(0)`,
    `f(t) = cos(((t / T) + s) / (1 + s) * pi / 2) ** 2`.

    The paper clips betas at 0.999; `max_beta=0.9999` follows video-diffusion-pytorch so that
    its checkpoints sample with the schedule they were trained with.
    """
    _check_timesteps(timesteps)
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return _betas_from_alphas_cumprod(f / f[0], max_beta)


def linear_beta_schedule(
    timesteps: int, beta_start: float | int | None = None, beta_end: float | int | None = None
) -> Tensor:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 for 1000 steps. For other step counts
    both ends scale by `1000 / timesteps` (Nichol & Dhariwal 2021) so that the total noise
    added, and hence `abar` at the last step, stays about the same; below 21 steps the scaled
    ends are capped at 0.999."""
    _check_timesteps(timesteps)
    scale = 1000.0 / timesteps
    start = min(scale * 1e-4, 0.999) if beta_start is None else beta_start
    end = min(scale * 0.02, 0.999) if beta_end is None else beta_end
    if not 0.0 < start <= end < 1.0:
        raise ValueError(f"linear schedule needs 0 < beta_start <= beta_end < 1, got {start} and {end}")
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


def sigmoid_beta_schedule(
    timesteps: int,
    start: float | int = -3.0,
    end: float | int = 3.0,
    tau: float | int = 1.0,
    max_beta: float | int = 0.999,
) -> Tensor:
    """Jabri et al. 2022 ("Scalable Adaptive Computation for Iterative Generation", sec. 3):
    `abar(t)` follows a rescaled, reversed sigmoid over `[start, end] / tau`; it keeps more
    steps at high noise than cosine, which helps large images."""
    _check_timesteps(timesteps)
    if not start < end or tau <= 0:
        raise ValueError(f"sigmoid schedule needs start < end and tau > 0, got {start}, {end}, {tau}")
    t = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    abar = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alphas_cumprod(abar / abar[0], max_beta)


_BETA_SCHEDULE_FNS: dict[str, Callable[[int], Tensor]] = {
    "cosine": cosine_beta_schedule,
    "linear": linear_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
    alg. 1): shift and scale `sqrt(abar)` so that it keeps its first value and reaches exactly
    0 at the last timestep. Training then sees pure noise at the last step, as sampling
    starts from it; the last beta becomes 1."""
    root = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def beta_schedule(name: str, timesteps: int) -> Tensor:
    """The betas (float64, `(timesteps,)`) of the named schedule."""
    if name not in _BETA_SCHEDULE_FNS:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {name!r}")
    return _BETA_SCHEDULE_FNS[name](timesteps)


# --- the schedule as a set of per-timestep tables -------------------------------------------


@dataclass(frozen=True)
class NoiseSchedule:
    """Every per-timestep table the process and the samplers use, each `(timesteps,)`.

    The names are video-diffusion-pytorch's buffer names, so `GaussianDiffusion` registers
    each field as a buffer under the same name and old checkpoints load unchanged.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance) (Ho et al. eq. 6-7)
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        """Derive every table from `betas` in float64, then cast to `dtype`."""
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        betas = betas.to(torch.float64)
        # A last beta of 1 is a zero-terminal-SNR schedule (`rescale_zero_terminal_snr`).
        if not bool(((betas > 0) & (betas < 1)).all()) and not (
            bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all()) and float(betas[-1]) == 1.0
        ):
            raise ValueError("betas must all lie in (0, 1) (the last may be 1: zero terminal SNR)")
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - abar),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # The posterior variance is 0 at t = 0; its log is clipped so it stays finite.
            "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        return cls(**{name: value.to(dtype) for name, value in tables.items()})

    @classmethod
    def from_tables(cls, tables: dict[str, Tensor]) -> NoiseSchedule:
        return cls(**{f.name: tables[f.name] for f in fields(cls)})

    def tables(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio `alpha_t**2 / sigma_t**2` per timestep (Kingma et al. 2021)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)


def extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """`table[t]` for timesteps `t` `(B,)`, shaped `(B, 1, ..., 1)` to broadcast over `ndim` dims."""
    return table[t].view((-1,) + (1,) * (ndim - 1))


# --- objective conversions (alpha, sigma broadcastable against x_t) -------------------------


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * eps - sigma * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # alpha * x_t - sigma * v = (alpha**2 + sigma**2) * x0 = x0
    return alpha * x_t - sigma * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * x_t + alpha * v


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective


def prediction_to_x0_eps(
    objective: str,
    prediction: Float[Tensor, "b *dims"],
    x_t: Float[Tensor, "b *dims"],
    alpha: Tensor,
    sigma: Tensor,
) -> tuple[Float[Tensor, "b *dims"], Float[Tensor, "b *dims"]]:
    """A network output under `objective` as the pair `(x0, eps)` it implies for `x_t`."""
    check_objective(objective)
    if objective == "noise":
        return x0_from_eps(x_t, prediction, alpha, sigma), prediction
    if objective == "x0":
        return prediction, eps_from_x0(x_t, prediction, alpha, sigma)
    return x0_from_v(x_t, prediction, alpha, sigma), eps_from_v(x_t, prediction, alpha, sigma)


def objective_target(
    objective: str,
    x0: Float[Tensor, "b *dims"],
    eps: Float[Tensor, "b *dims"],
    alpha: Tensor,
    sigma: Tensor,
) -> Float[Tensor, "b *dims"]:
    """What a network trained for `objective` should output for `x_t = alpha x0 + sigma eps`."""
    check_objective(objective)
    if objective == "noise":
        return eps
    if objective == "x0":
        return x0
    return v_from_x0_eps(x0, eps, alpha, sigma)
