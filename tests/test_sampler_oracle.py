"""Every sampler, the diffusers-scheduler path and the timestep options, against the exact
denoiser of a Gaussian data distribution.

Data `x0 ~ N(mu, s^2)` per element. At noise level `(alpha, sigma)` the minimum-MSE clean-sample
prediction is `mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)`; the oracle computes
it at fractional timesteps too, at the noise level the process assigns them (`VPSigmas`).
The probability-flow ODE then has a closed-form solution, so the solvers' discretisation
error is measured exactly and its order fitted as the step count doubles.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import Tensor, nn

from diffusion import GaussianDiffusion
from diffusion.samplers import VPSigmas, available, sample_loop, spaced_timesteps
from diffusion.schedules import NoiseSchedule, beta_schedule, v_from_x0_eps

MU, STD = 0.2, 0.5
SHAPE = (4, 1, 4, 32, 32)  # 16384 elements: standard errors 0.0039 (mean), 0.0028 (std)
T = 1000


def noise_level(alphas_cumprod: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    if t.is_floating_point():
        ratio = VPSigmas(alphas_cumprod).t_to_sigma(t.cpu()).to(alphas_cumprod.dtype)
        alpha = 1 / (1 + ratio**2).sqrt()
        return alpha, ratio * alpha
    abar = alphas_cumprod[t]
    return abar.sqrt(), (1 - abar).sqrt()


class GaussianOracle(nn.Module):
    """The exact denoiser of N(mu, std^2) data in any objective, at any (fractional) timestep."""

    def __init__(self, alphas_cumprod: Tensor, objective: str) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.objective = objective
        self.timesteps_seen: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.timesteps_seen.append(t)
        alpha, sigma = (v.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) for v in noise_level(self.alphas_cumprod, t))
        residual = x - alpha * MU
        total = alpha**2 * STD**2 + sigma**2
        x0 = MU + alpha * STD**2 * residual / total
        eps = sigma * residual / total
        return {"noise": eps, "x0": x0, "v": v_from_x0_eps(x0, eps, alpha, sigma)}[self.objective]


def make(objective: str = "noise", schedule: str = "cosine", **kwargs) -> GaussianDiffusion:
    betas = beta_schedule(schedule, T)
    abar = torch.cumprod(1 - betas, 0).float()
    if kwargs.get("zero_terminal_snr"):
        from diffusion.schedules import rescale_zero_terminal_snr

        abar = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).float()
    oracle = GaussianOracle(abar, objective)
    return GaussianDiffusion(
        oracle, image_size=32, num_frames=4, channels=1, timesteps=T, beta_schedule=schedule,
        objective=objective, auto_normalize=False, **kwargs,
    )


def stats(diffusion: GaussianDiffusion, **kwargs) -> tuple[float, float]:
    out = diffusion.sample(batch_size=SHAPE[0], clip_denoised=False, generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.shape == SHAPE
    return out.mean().item(), out.std().item()


# (sampler, steps): enough steps that the discretisation error is below the tolerance (the
# first-order samplers need several times more than the second-order ones for that).
CASES = [("ddpm", None), ("ddim", 200), ("dpmpp_2m", 100), ("dpmpp_2m_sde", 200), ("euler", 200),
         ("euler_ancestral", 1000), ("heun", 100)]
STEPS = dict(CASES)


def test_every_sampler_is_covered():
    assert {name for name, _ in CASES} == set(available())


@pytest.mark.parametrize("sampler, steps", CASES)
@pytest.mark.parametrize("objective", ["noise", "x0", "v"])
def test_every_sampler_reproduces_the_data_distribution(sampler, steps, objective):
    mean, std = stats(make(objective), sampler=sampler, steps=steps)
    assert mean == pytest.approx(MU, abs=0.025)
    assert std == pytest.approx(STD, abs=0.025)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "heun", "dpmpp_2m_sde", "euler_ancestral"])
def test_karras_sigmas_call_the_model_at_fractional_timesteps_and_reproduce_the_data(sampler):
    diffusion = make("v")
    mean, std = stats(diffusion, sampler=sampler, steps=STEPS[sampler], karras=True)
    assert mean == pytest.approx(MU, abs=0.025)
    assert std == pytest.approx(STD, abs=0.025)
    seen = torch.cat(diffusion.denoise_fn.timesteps_seen)
    assert seen.is_floating_point() and bool((seen != seen.round()).any())


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_timestep_spacings(spacing, sampler):
    diffusion = make("noise")
    mean, std = stats(diffusion, sampler=sampler, steps=STEPS[sampler], spacing=spacing)
    assert mean == pytest.approx(MU, abs=0.025)
    # `leading` never visits the noisiest timestep: its first step sees noise slightly too
    # weak for pure noise, so allow it a little more.
    assert std == pytest.approx(STD, abs=0.04 if spacing == "leading" else 0.025)
    visited = sorted({int(t[0]) for t in diffusion.denoise_fn.timesteps_seen}, reverse=True)
    assert visited == spaced_timesteps(T, STEPS[sampler], spacing)


def test_spaced_timesteps():
    assert spaced_timesteps(10, 5, "linspace") == [9, 7, 4, 2, 0]
    assert spaced_timesteps(10, 5, "leading") == [8, 6, 4, 2, 0]
    assert spaced_timesteps(10, 5, "trailing") == [9, 7, 5, 3, 1]
    with pytest.raises(ValueError, match="spacing must be one of"):
        spaced_timesteps(10, 5, "uniform")


def test_zero_terminal_snr_samples_from_pure_noise():
    diffusion = make("v", zero_terminal_snr=True)
    assert diffusion.alphas_cumprod[-1].item() == 0.0
    for sampler, spacing in [("ddim", "trailing"), ("dpmpp_2m", "trailing"), ("ddpm", "linspace")]:
        mean, std = stats(diffusion, sampler=sampler, steps=STEPS[sampler], spacing=spacing)
        assert mean == pytest.approx(MU, abs=0.025), sampler
        assert std == pytest.approx(STD, abs=0.03), sampler
    with pytest.raises(ValueError, match="zero_terminal_snr=True needs objective='v' or 'x0'"):
        make("noise", zero_terminal_snr=True)


# --- convergence order on the exact ODE solution ---------------------------------------------


def _ode_error(sampler: str, steps: int, karras: bool) -> float:
    schedule = NoiseSchedule.from_betas(beta_schedule("linear", 1000), dtype=torch.float64)
    sigmas = VPSigmas(schedule.alphas_cumprod)
    oracle = GaussianOracle(schedule.alphas_cumprod, "x0")

    def model_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = (v.view(-1, 1) for v in noise_level(schedule.alphas_cumprod, t))
        x0 = oracle(x, t)
        return x0, (x - alpha * x0) / sigma

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_loop(sampler, model_fn, x.clone(), schedule, steps=steps, karras=karras)
    # The ODE maps the scaled start x * sqrt(1 + s_max^2) at sigma s_max to
    # mu + (x - mu) * std / sqrt(std^2 + s_max^2) at sigma 0.
    s_max = sigmas.sigma_max
    start = x * math.sqrt(1 + s_max**2)
    exact = MU + (start - MU) * STD / math.sqrt(STD**2 + s_max**2)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize(
    "sampler, karras, order",
    [("ddim", False, 1), ("euler", False, 1), ("euler", True, 1), ("heun", False, 2), ("heun", True, 2),
     ("dpmpp_2m", True, 2)],
)
def test_error_shrinks_with_the_expected_order(sampler, karras, order):
    errors = [_ode_error(sampler, steps, karras) for steps in (20, 40, 80)]
    fitted = math.log2(errors[0] / errors[2]) / 2
    assert order - 0.2 < fitted < order + 0.75, (errors, fitted)


def test_dpmpp_2m_is_second_order_on_the_timestep_grid_too():
    errors = [_ode_error("dpmpp_2m", steps, False) for steps in (40, 80, 160)]
    fitted = math.log2(errors[1] / errors[2])
    assert 1.6 < fitted < 2.6, (errors, fitted)


# --- any diffusers scheduler -------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("objective", ["noise", "v"])
@pytest.mark.parametrize(
    "make_scheduler, steps",
    [
        (lambda p: diffusers.DDIMScheduler(prediction_type=p, clip_sample=False), 200),
        (lambda p: diffusers.DPMSolverMultistepScheduler(prediction_type=p), 50),
        (lambda p: diffusers.EulerDiscreteScheduler(prediction_type=p, use_karras_sigmas=True), 200),
        (lambda p: diffusers.UniPCMultistepScheduler(prediction_type=p), 50),
    ],
)
def test_diffusers_schedulers_reproduce_the_data_distribution(make_scheduler, steps, objective):
    prediction = {"noise": "epsilon", "v": "v_prediction"}[objective]
    # Made for another schedule: the process sets its own betas.
    scheduler = make_scheduler(prediction)
    mean, std = stats(make(objective), scheduler=scheduler, steps=steps)
    assert mean == pytest.approx(MU, abs=0.025)
    assert std == pytest.approx(STD, abs=0.025)


def test_a_diffusers_ddim_scheduler_matches_our_ddim():
    diffusion = make("noise")
    ours = diffusion.sample(batch_size=2, sampler="ddim", steps=20, spacing="trailing", clip_denoised=False,
                            generator=torch.Generator().manual_seed(1))
    scheduler = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    theirs = diffusion.sample(batch_size=2, scheduler=scheduler, steps=20, clip_denoised=False,
                              generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_scheduler_errors():
    diffusion = make("v")
    with pytest.raises(ValueError, match="prediction_type='epsilon' but this process's objective is 'v'"):
        diffusion.sample(batch_size=1, scheduler=diffusers.DDIMScheduler(), steps=2)
    with pytest.raises(TypeError, match="scheduler must be a diffusers scheduler instance"):
        diffusion.sample(batch_size=1, scheduler=object(), steps=2)
    with pytest.raises(ValueError, match=r"scheduler= drives sampling by itself; leave out \['sampler'\]"):
        diffusion.sample(batch_size=1, scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
                         sampler="euler")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "heun"])
def test_sigma_samplers_on_cuda_match_the_cpu(sampler):
    cpu = make("v")
    gpu = make("v").cuda()
    kwargs = dict(batch_size=2, sampler=sampler, steps=10, karras=True, clip_denoised=False)
    expected = cpu.sample(generator=torch.Generator().manual_seed(0), **kwargs)
    got = gpu.sample(generator=torch.Generator().manual_seed(0), **kwargs)
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


# --- the sigma <-> timestep map, progress and images ---------------------------------------------


@given(t=st.floats(0.0, 999.0), schedule=st.sampled_from(["cosine", "linear", "sigmoid"]))
@settings(max_examples=50, deadline=None)
def test_fractional_timesteps_round_trip_and_hit_the_table(t, schedule):
    sigmas = VPSigmas(torch.cumprod(1 - beta_schedule(schedule, 1000), 0))
    tt = torch.tensor([t], dtype=torch.float64)
    assert sigmas.sigma_to_t(sigmas.t_to_sigma(tt)).item() == pytest.approx(t, abs=1e-6)
    whole = torch.tensor([float(int(t))], dtype=torch.float64)
    assert sigmas.t_to_sigma(whole).item() == pytest.approx(sigmas.sigmas[int(t)].item(), rel=1e-9)
    alpha, sigma = sigmas.alpha_sigma(tt)
    assert (alpha**2 + sigma**2).item() == pytest.approx(1.0)


def test_progress_callbacks_and_images_with_sigma_samplers():
    diffusion = make("v")
    videos = diffusion.sample(batch_size=1, sampler="heun", steps=3, progress=True)
    assert videos.shape == (1, 1, 4, 32, 32)
    images = diffusion.sample_images(batch_size=2, sampler="dpmpp_2m", steps=3, karras=True)
    assert images.shape == (2, 1, 32, 32)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['karas'\\]"):
        diffusion.sample_images(batch_size=1, sampler="euler", steps=3, karas=True)
    with pytest.raises(ValueError, match="karras=True applies to the sigma-space samplers, not 'ddim'"):
        diffusion.sample(batch_size=1, sampler="ddim", steps=3, karras=True)
