"""Samplers of the probability-flow ODE / SDE written in sigma space (Karras et al. 2022).

Any Gaussian process `x_t = alpha_t x0 + sigma_t eps` is, after dividing by `alpha_t`, the
variance-exploding process `x = x0 + sigma eps` with `sigma = sigma_t / alpha_t` (Karras et al.
2022, "Elucidating the Design Space of Diffusion-Based Generative Models", sec. 4). Its ODE is
`dx / dsigma = (x - D(x, sigma)) / sigma` with `D` the clean-sample prediction, so one set of
solvers serves both the DDPM process (`VPSigmas`) and rectified flow (`FlowSigmas`: there
`sigma = t / (1 - t)`). The samplers here are plain functions of
`(denoiser, x, sigmas, ...)` where `denoiser(x, sigma) -> x0` works on that scaled `x`.

Fractional timesteps: a sigma between two table entries maps to a continuous timestep by
linear interpolation of `log sigma` over the timestep index (k-diffusion's
`DiscreteSchedule`, diffusers' `_sigma_to_t`). The network is called at that float timestep;
the U-Nets embed timesteps sinusoidally, which is defined for any real `t`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
# callback(step, sigma, x, x0): once per step, after the first model call of the step.
SigmaCallback = Callable[[int, float, Tensor, Tensor], None]
Noise = Callable[[Tensor], Tensor]

SPACINGS = ("linspace", "leading", "trailing")
# Zero-terminal-SNR schedules end at abar = 0, i.e. sigma = inf; solvers in sigma space start
# from this floor instead (as diffusers does), which changes nothing visible in float32.
MIN_ALPHAS_CUMPROD = 2.0**-24


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """`steps` distinct training timesteps, descending (Lin et al. 2023, table 2):

    - `linspace`: evenly over `[0, T - 1]`, rounded (first step at the noisiest timestep);
    - `leading`: `0, k, 2k, ...` with `k = T // steps` (Stable Diffusion's default; never
      reaches the last timestep);
    - `trailing`: `T - 1, T - 1 - k, ...` with `k = T / steps` (always starts at the last
      timestep, which zero-terminal-SNR schedules need)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if steps > num_timesteps:
        raise ValueError(f"steps must be at most timesteps={num_timesteps}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if spacing == "linspace":
        if steps == 1:
            return [num_timesteps - 1]
        # Spacing (T - 1) / (steps - 1) >= 1, so the rounded values are distinct.
        grid = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        return grid.tolist()
    if spacing == "leading":
        stride = num_timesteps // steps
        return [i * stride for i in range(steps)][::-1]
    stride = num_timesteps / steps
    return [round(num_timesteps - 1 - i * stride) for i in range(steps)]


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float | int = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: `steps` sigmas from `sigma_max` down to `sigma_min`, evenly
    spaced in `sigma ** (1 / rho)`, which spends more steps at low noise."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class VPSigmas:
    """sigma <-> timestep for a DDPM schedule: `sigma_t = sqrt((1 - abar_t) / abar_t)`,
    fractional timesteps by interpolating `log sigma` linearly over the index."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = alphas_cumprod.detach().to("cpu", torch.float64).clamp(min=MIN_ALPHAS_CUMPROD)
        self.sigmas = ((1.0 - abar) / abar).sqrt()
        self.log_sigmas = self.sigmas.log()
        if not bool((self.log_sigmas[1:] > self.log_sigmas[:-1]).all()):
            raise ValueError("the schedule's noise level must increase strictly with the timestep")

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The continuous timestep of `sigma` (float64), clamped to `[0, T - 1]`."""
        log_sigma = sigma.to(torch.float64).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        low = high - 1
        frac = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        return low.to(torch.float64) + frac

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The inverse of `sigma_to_t` (float64)."""
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2) if self.num_timesteps > 1 else t.long()
        if self.num_timesteps == 1:
            return self.sigmas[low]
        frac = t - low
        return ((1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[low + 1]).exp()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The process's `(alpha_t, sigma_t)` (float64) at fractional timesteps `t`."""
        ratio = self.t_to_sigma(t)
        alpha = 1.0 / (1.0 + ratio**2).sqrt()
        return alpha, ratio * alpha

    def timestep_sigmas(self, timesteps: list[int]) -> Tensor:
        """The sigmas of the given (descending) timesteps, followed by 0."""
        return torch.cat([self.sigmas[timesteps], self.sigmas.new_zeros(1)])

    @staticmethod
    def input_scale(sigma: Tensor) -> Tensor:
        """The factor `alpha` that takes the scaled `x` back to the process's `x_t`."""
        return 1.0 / (1.0 + sigma.to(torch.float64) ** 2).sqrt()

    def karras(self, steps: int, rho: float | int = 7.0) -> Tensor:
        return torch.cat([karras_sigmas(self.sigma_min, self.sigma_max, steps, rho), self.sigmas.new_zeros(1)])


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The ODE's derivative `dx / dsigma` (Karras et al. 2022, eq. 4 with sigma(t) = t)."""
    return (x - denoised) / sigma


def _steps(sigmas: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    return [(i, sigmas[i], sigmas[i + 1]) for i in range(sigmas.numel() - 1)]


def _report(callback: SigmaCallback | None, i: int, sigma: Tensor, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(i, float(sigma), x, x0)


def sample_euler(
    denoiser: Denoiser, x: Float[Tensor, "b *dims"], sigmas: Tensor, *, callback: SigmaCallback | None = None
) -> Float[Tensor, "b *dims"]:
    """Euler's method on the ODE (Karras et al. 2022, alg. 1 without the correction). On a
    timestep grid this is exactly deterministic DDIM (Song et al. 2021, eq. 13)."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        _report(callback, i, sigma, x, denoised)
        x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
    return x


def sample_heun(
    denoiser: Denoiser, x: Float[Tensor, "b *dims"], sigmas: Tensor, *, callback: SigmaCallback | None = None
) -> Float[Tensor, "b *dims"]:
    """Heun's second-order method (Karras et al. 2022, alg. 1): an Euler step, corrected by
    the average of the slopes at both ends; the last step, to sigma 0, stays Euler. Costs
    `2 * steps - 1` model calls."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        _report(callback, i, sigma, x, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        x_euler = x + d * dt
        if float(sigma_next) == 0.0:
            x = x_euler
            continue
        d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next))
        x = x + (d + d_next) / 2 * dt
    return x


def _ancestral_split(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    # Going from sigma to sigma_next with fresh noise of std sigma_up: the deterministic part
    # goes to sigma_down, where sigma_down**2 + sigma_up**2 = sigma_next**2 (as in DDPM's
    # posterior at eta = 1).
    if eta == 0.0 or float(sigma_next) == 0.0:
        return sigma_next, torch.zeros_like(sigma_next)
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp(min=0).sqrt()
    up = torch.minimum(up, sigma_next)
    return (sigma_next**2 - up**2).sqrt(), up


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Float[Tensor, "b *dims"],
    sigmas: Tensor,
    *,
    noise: Noise,
    eta: float | int = 1.0,
    callback: SigmaCallback | None = None,
) -> Float[Tensor, "b *dims"]:
    """Euler steps to `sigma_down`, then fresh noise up to `sigma_next` (`eta` scales it;
    0 is `sample_euler`)."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        _report(callback, i, sigma, x, denoised)
        down, up = _ancestral_split(sigma, sigma_next, float(eta))
        x = x + to_d(x, sigma, denoised) * (down - sigma)
        if float(up) > 0:
            x = x + noise(x) * up
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser, x: Float[Tensor, "b *dims"], sigmas: Tensor, *, callback: SigmaCallback | None = None
) -> Float[Tensor, "b *dims"]:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, alg. 2): exact integration of the
    linear part in `lambda = -log sigma`, the clean-sample prediction extrapolated linearly
    from the previous step. One model call per step; the first and the last step are first
    order (DDIM)."""
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if float(sigma_next) == 0.0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        if old_denoised is None or h_last is None:
            estimate = denoised
        else:
            r = h_last / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Float[Tensor, "b *dims"],
    sigmas: Tensor,
    *,
    noise: Noise,
    eta: float | int = 1.0,
    callback: SigmaCallback | None = None,
) -> Float[Tensor, "b *dims"]:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5, midpoint variant as in k-diffusion):
    the second-order multistep update of the SDE, adding noise `eta` times the amount that
    keeps the marginals (0 makes it the ODE solver)."""
    eta = float(eta)
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if float(sigma_next) == 0.0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        x = (sigma_next / sigma) * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * denoised
        if old_denoised is not None and h_last is not None:
            r = h_last / h
            x = x - 0.5 * torch.expm1(-h - eta_h) / r * (denoised - old_denoised)
        if eta > 0:
            x = x + noise(x) * sigma_next * (-torch.expm1(-2 * eta_h)).clamp(min=0).sqrt()
        old_denoised, h_last = denoised, h
    return x
