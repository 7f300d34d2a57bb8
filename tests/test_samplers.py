"""Samplers against the exact optimal denoiser of a Gaussian data distribution.

Data `x0 ~ N(mu, s^2)` independently per pixel. Then `x_t = alpha x0 + sigma eps` is Gaussian
and the minimum-MSE predictions are analytic (`v_t = alpha^2 s^2 + sigma^2`):

    E[x0 | x_t]  = mu + alpha s^2 (x_t - alpha mu) / v_t
    E[eps | x_t] = sigma (x_t - alpha mu) / v_t

Plugged in as the model, a correct sampler must return samples with mean `mu` and std `s`,
up to the sample-count tolerance and the sampler's own discretisation error. That error is
known exactly for Gaussian data too: each step maps `x - alpha mu` linearly, so its variance
can be propagated step by step in float64 (`predicted_std`). Few-step runs are checked against
that prediction; many-step runs against the data distribution itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from diffusion import GaussianDiffusion
from diffusion.samplers import ddim_sample, ddim_timesteps, ddpm_sample, sample_loop
from diffusion.schedules import NoiseSchedule, beta_schedule, prediction_to_x0_eps, v_from_x0_eps

MU, STD = 0.2, 0.5
# 4 x 1 x 4 x 32 x 32 = 16384 independent pixels: standard errors 0.0039 (mean), 0.0028 (std).
SHAPE = (4, 1, 4, 32, 32)
N = math.prod(SHAPE)
SE_MEAN = STD / math.sqrt(N)
SE_STD = STD / math.sqrt(2 * N)


class OptimalGaussianDenoiser(nn.Module):
    """The exact minimum-MSE denoiser for data ~ N(mu, std^2) per pixel, in any objective."""

    def __init__(self, alphas_cumprod: Tensor, objective: str, mu: float = MU, std: float = STD) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.objective, self.mu, self.var = objective, mu, std**2

    def x0_eps(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x.ndim - 1)))
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        total = abar * self.var + (1 - abar)
        residual = x - alpha * self.mu
        return self.mu + alpha * self.var * residual / total, sigma * residual / total

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        x0, eps = self.x0_eps(x, t)
        if self.objective == "noise":
            return eps
        if self.objective == "x0":
            return x0
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x.ndim - 1)))
        return v_from_x0_eps(x0, eps, abar.sqrt(), (1 - abar).sqrt())


def make_diffusion(
    objective: str, timesteps: int = 1000, schedule: str = "cosine", hw: tuple[int, int] = SHAPE[3:]
) -> GaussianDiffusion:
    betas = beta_schedule(schedule, timesteps)
    abar = NoiseSchedule.from_betas(betas).alphas_cumprod
    (_, c, f), (h, w) = SHAPE[:3], hw
    return GaussianDiffusion(
        OptimalGaussianDenoiser(abar, objective),
        image_size=(h, w),
        num_frames=f,
        channels=c,
        timesteps=timesteps,
        beta_schedule=schedule,
        objective=objective,
        auto_normalize=False,
    )


def predicted_std(schedule: NoiseSchedule, sampler: str, steps: int, eta: float, mu=MU, std=STD) -> float:
    """The exact std of the sampler's output for Gaussian data and the optimal denoiser.

    Each step maps `y = x_t - alpha_t mu` to `c * y + (fresh noise of variance q)`."""
    tables = NoiseSchedule.from_betas(schedule.betas.double(), dtype=torch.float64)
    abar = tables.alphas_cumprod
    var = 1.0  # x_T ~ N(0, 1)
    times = list(range(len(abar) - 1, -1, -1)) if sampler == "ddpm" else ddim_timesteps(len(abar), steps)
    for i, i_prev in zip(times, times[1:] + [-1]):
        alpha, sigma = abar[i].sqrt(), (1 - abar[i]).sqrt()
        total = alpha**2 * std**2 + sigma**2
        gain_x0, gain_eps = alpha * std**2 / total, sigma / total
        if sampler == "ddpm":
            c = tables.posterior_mean_coef1[i] * gain_x0 + tables.posterior_mean_coef2[i]
            q = tables.posterior_variance[i] if i > 0 else 0.0
        else:
            abar_prev = abar[i_prev] if i_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            q = eta**2 * (1 - abar_prev) / (1 - abar[i]) * (1 - abar[i] / abar_prev)
            c = abar_prev.sqrt() * gain_x0 + (1 - abar_prev - q).clamp(min=0).sqrt() * gain_eps
        var = c**2 * var + q
    return float(var.sqrt())


def sample_stats(diffusion: GaussianDiffusion, **kwargs) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    out = diffusion.sample(batch_size=SHAPE[0], clip_denoised=False, generator=gen, **kwargs)
    assert out.shape == SHAPE
    return out.mean().item(), out.std().item()


def test_discretisation_error_vanishes_with_many_steps():
    # The exact std of each sampler's output (float64 recurrence): a few steps of DDIM shrink
    # the spread of Gaussian data visibly, many steps reproduce it.
    schedule = NoiseSchedule.from_betas(beta_schedule("cosine", 1000))
    assert abs(predicted_std(schedule, "ddpm", 1000, 1.0) - STD) < 0.005 * STD
    for eta in (0.0, 1.0):
        errors = [abs(predicted_std(schedule, "ddim", steps, eta) - STD) for steps in (10, 50, 250, 1000)]
        assert errors == sorted(errors, reverse=True)
        assert errors[0] > 0.1 * STD and errors[-1] < 0.005 * STD
    assert abs(predicted_std(schedule, "ddim", 250, 0.0) - STD) < 0.007 * STD


# The full 1000-step chain, once per objective: DDPM (0.4 % discretisation error in the std)
# and DDIM with 250 steps and eta 0 (0.6 %); the tolerance allows 1 % for it.
@pytest.mark.parametrize(
    "objective, sampler, steps", [("noise", "ddpm", None), ("x0", "ddim", 250), ("v", "ddim", 250)]
)
def test_many_steps_reproduce_the_data_distribution(objective, sampler, steps):
    diffusion = make_diffusion(objective)
    mean, std = sample_stats(diffusion, sampler=sampler, steps=steps)
    assert abs(mean - MU) < 5 * SE_MEAN
    assert abs(std - STD) < 5 * SE_STD + 0.01 * STD


# A 100-step chain: every sampler, few steps, stochastic or not, against its exact output std.
@pytest.mark.parametrize("objective", ["noise", "x0", "v"])
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0), ("ddim", 40, 0.5)])
def test_samplers_match_their_exact_discretisation(objective, sampler, steps, eta):
    diffusion = make_diffusion(objective, timesteps=100)
    expected = predicted_std(diffusion.schedule, sampler, steps, eta)
    # The discretisation error is real but bounded; a wrong coefficient shows up far beyond it.
    assert 0.7 * STD < expected <= STD
    mean, std = sample_stats(diffusion, sampler=sampler, steps=steps, eta=eta)
    assert abs(mean - MU) < 5 * SE_MEAN
    assert abs(std - expected) < 5 * SE_STD


@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
def test_other_schedules_match_their_exact_discretisation(schedule):
    diffusion = make_diffusion("v", timesteps=100, schedule=schedule)
    expected = predicted_std(diffusion.schedule, "ddim", 20, 1.0)
    mean, std = sample_stats(diffusion, sampler="ddim", steps=20, eta=1.0)
    assert abs(mean - MU) < 5 * SE_MEAN
    assert abs(std - expected) < 5 * SE_STD


def optimal_model_fn(schedule: NoiseSchedule):
    denoiser = OptimalGaussianDenoiser(schedule.alphas_cumprod, "noise")
    return lambda x, t: denoiser.x0_eps(x, t)


def test_ddim_with_eta_one_over_all_steps_is_ddpm():
    schedule = NoiseSchedule.from_betas(beta_schedule("linear", 100))
    model_fn = optimal_model_fn(schedule)
    x = torch.randn(4, 1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    ddpm = ddpm_sample(model_fn, x, schedule, generator=torch.Generator().manual_seed(2))
    ddim = ddim_sample(model_fn, x, schedule, eta=1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_samplers_hold_no_state():
    schedule = NoiseSchedule.from_betas(beta_schedule("cosine", 30))
    model_fn = optimal_model_fn(schedule)
    x = torch.randn(2, 1, 8, 8)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.3)):
        runs = [
            sample_loop(sampler, model_fn, x, schedule, eta=eta, generator=torch.Generator().manual_seed(5))
            for _ in range(2)
        ]
        assert torch.equal(runs[0], runs[1])
        assert not torch.equal(runs[0], x)
    # Deterministic DDIM needs no generator and leaves its input untouched.
    before = x.clone()
    first = ddim_sample(model_fn, x, schedule, steps=7)
    assert torch.equal(first, ddim_sample(model_fn, x, schedule, steps=7))
    assert torch.equal(x, before)


def test_the_same_model_in_every_objective_samples_the_same():
    noise = torch.randn(*SHAPE[:3], 8, 8, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for objective in ("noise", "x0", "v"):
        diffusion = make_diffusion(objective, timesteps=100, hw=(8, 8))
        for sampler, steps, eta in (("ddpm", None, 0.0), ("ddim", 20, 0.0), ("ddim", 20, 1.0)):
            outputs[objective, sampler, eta] = diffusion.sample(
                batch_size=SHAPE[0], sampler=sampler, steps=steps, eta=eta, noise=noise,
                generator=torch.Generator().manual_seed(4), clip_denoised=True,
            )
    for (objective, sampler, eta), out in outputs.items():
        torch.testing.assert_close(out, outputs["noise", sampler, eta], atol=2e-4, rtol=1e-4)


def test_model_fn_receives_every_timestep_once_in_order():
    schedule = NoiseSchedule.from_betas(beta_schedule("cosine", 20))
    seen: list[int] = []

    def model_fn(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        seen.append(int(t[0]))
        return torch.zeros_like(x), x

    ddpm_sample(model_fn, torch.randn(3, 1, 4, 4), schedule)
    assert seen == list(range(19, -1, -1))
    seen.clear()
    ddim_sample(model_fn, torch.randn(3, 1, 4, 4), schedule, steps=5)
    assert seen == ddim_timesteps(20, 5) == [19, 14, 10, 5, 0]


@pytest.mark.parametrize("timesteps", [1, 2, 7, 1000])
def test_ddim_timesteps_are_distinct_descending_and_span_the_chain(timesteps):
    for steps in sorted({1, min(2, timesteps), max(1, timesteps // 3), timesteps}):
        times = ddim_timesteps(timesteps, steps)
        assert len(times) == len(set(times)) == steps
        assert times == sorted(times, reverse=True)
        assert times[0] == timesteps - 1
        assert steps == 1 or times[-1] == 0


def test_sampler_errors_name_what_is_allowed():
    schedule = NoiseSchedule.from_betas(beta_schedule("cosine", 10))
    model_fn = optimal_model_fn(schedule)
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"sampler must be one of \('ddpm', 'ddim', .*'heun'\), got 'plms'"):
        sample_loop("plms", model_fn, x, schedule)
    with pytest.raises(ValueError, match="steps must be at most timesteps=10, got 11"):
        sample_loop("ddim", model_fn, x, schedule, steps=11)
    with pytest.raises(ValueError, match="steps must be at most timesteps=10, got 11"):
        sample_loop("ddpm", model_fn, x, schedule, steps=11)
    with pytest.raises(ValueError, match="use sampler='ddim'"):
        sample_loop("ddpm", model_fn, x, schedule, steps=5)
    with pytest.raises(ValueError, match="eta applies to sampler 'ddim' and the ancestral samplers"):
        sample_loop("ddpm", model_fn, x, schedule, eta=1.0)
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        ddim_timesteps(10, 0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_sample(model_fn, x, schedule, eta=-0.5)
    with pytest.raises(ValueError, match=r"t_start must lie in \[0, 10\)"):
        ddpm_sample(model_fn, x, schedule, t_start=10)


def test_prediction_conversion_is_the_only_objective_knowledge_the_sampler_needs():
    # The model_fn the process builds returns exactly the optimal (x0, eps) for every objective.
    x = torch.randn(3, 1, 2, 4, 4)
    t = torch.tensor([0, 50, 98])
    for objective in ("noise", "x0", "v"):
        diffusion = make_diffusion(objective, timesteps=100)
        x0, eps = diffusion.model_predictions(x, t, clip_denoised=False)
        ref_x0, ref_eps = diffusion.denoise_fn.x0_eps(x, t)
        torch.testing.assert_close(x0, ref_x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(eps, ref_eps, atol=1e-4, rtol=1e-4)
        alpha = diffusion.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        sigma = diffusion.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        out = diffusion.denoise_fn(x, t)
        torch.testing.assert_close(prediction_to_x0_eps(objective, out, x, alpha, sigma)[0], x0)
