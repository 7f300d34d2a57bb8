"""FlowMatching: rectified flow against the exact velocity of Gaussian data, training loss,
the timestep shift and the process-level options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import Tensor, nn

from diffusion import FlowMatching
from diffusion.flow import TIME_SCALE, flow_times, shift_time

MU, STD = 0.2, 0.5
SHAPE = (4, 1, 4, 32, 32)


class FlowOracle(nn.Module):
    """The exact velocity `E[noise - x0 | x_t]` for data N(mu, std^2), called as the
    convention says: `denoise_fn(x_t, 1000 t)`."""

    def __init__(self) -> None:
        super().__init__()
        self.times_seen: list[Tensor] = []

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        self.times_seen.append(time)
        t = (time / TIME_SCALE).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        alpha, sigma = 1 - t, t
        residual = x - alpha * MU
        total = alpha**2 * STD**2 + sigma**2
        x0 = MU + alpha * STD**2 * residual / total
        eps = sigma * residual / total
        return eps - x0


def make(**kwargs) -> FlowMatching:
    return FlowMatching(FlowOracle(), image_size=32, num_frames=4, channels=1, auto_normalize=False, **kwargs)


@pytest.mark.parametrize("sampler, steps", [("euler", 100), ("heun", 25)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_samplers_reproduce_the_data_distribution(sampler, steps, shift):
    flow = make(shift=shift)
    out = flow.sample(batch_size=SHAPE[0], sampler=sampler, steps=steps, clip_denoised=False,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == SHAPE
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(STD, abs=0.02)
    seen = torch.cat(flow.denoise_fn.times_seen)
    assert seen.max().item() == pytest.approx(TIME_SCALE) and seen.min().item() > 0


def _error(sampler: str, steps: int) -> float:
    flow = make()
    noise = torch.randn(2, 1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = flow.sample(batch_size=2, sampler=sampler, steps=steps, clip_denoised=False, noise=noise)
    # For Gaussian data the ODE's solution from noise n is
    # x_t = mu (1 - t) + sqrt((1 - t)^2 std^2 + t^2) * n, so at t = 0 it is mu + std * n.
    return (out - (MU + STD * noise)).abs().max().item()


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2)])
def test_flow_samplers_converge_with_their_order(sampler, order):
    errors = [_error(sampler, steps) for steps in (10, 20, 40)]
    fitted = math.log2(errors[0] / errors[2]) / 2
    assert order - 0.25 < fitted < order + 0.75, (errors, fitted)


@given(t=st.floats(0.0, 1.0), shift=st.floats(0.1, 10.0))
@settings(max_examples=50, deadline=None)
def test_shift_maps_the_unit_interval_onto_itself_monotonically(t, shift):
    a = shift_time(torch.tensor(t, dtype=torch.float64), shift).item()
    assert 0.0 <= a <= 1.0
    if shift > 1:
        assert a >= t - 1e-12
    b = shift_time(torch.tensor(min(t + 0.01, 1.0), dtype=torch.float64), shift).item()
    assert b >= a


def test_flow_times_run_from_one_to_zero():
    times = flow_times(4, 3.0)
    assert times[0].item() == 1.0 and times[-1].item() == 0.0
    assert bool((times[:-1] > times[1:]).all())


def test_training_loss_is_the_velocity_regression():
    flow = make()
    videos = torch.randn(3, 1, 4, 32, 32) * STD + MU
    noise = torch.randn_like(videos)
    times = torch.tensor([0.1, 0.5, 0.9])
    loss = flow(videos, noise=noise, times=times)
    x_t = (1 - times.view(-1, 1, 1, 1, 1)) * videos + times.view(-1, 1, 1, 1, 1) * noise
    expected = (FlowOracle()(x_t, times * TIME_SCALE) - (noise - videos)).abs().mean()
    torch.testing.assert_close(loss, expected)
    # Drawn times are logit-normal (median 1/2), all strictly inside (0, 1).
    drawn = flow.sample_times(4000, "cpu")
    assert 0.0 < drawn.min().item() and drawn.max().item() < 1.0
    assert drawn.median().item() == pytest.approx(0.5, abs=0.03)


def test_a_real_unet_trains_and_samples():
    import unets

    net = unets.build("space_time_unet", preset="debug", channels=1)
    flow = FlowMatching(net, image_size=8, num_frames=2 * net.frame_multiple, channels=1)
    videos = torch.rand(2, 1, 2 * net.frame_multiple, 8, 8)
    loss = flow(videos)
    loss.backward()
    assert loss.item() > 0 and any(p.grad is not None for p in net.parameters())
    out = flow.sample(batch_size=2, sampler="heun", steps=3)
    assert out.shape == videos.shape and 0 <= out.min().item() and out.max().item() <= 1
    mixed = flow.interpolate(videos, videos.flip(0), t=0.5, steps=3)
    assert mixed.shape == videos.shape


def test_flow_errors():
    with pytest.raises(ValueError, match="FlowMatching has no objective"):
        make(objective="v")
    with pytest.raises(ValueError, match="timestep_sampling"):
        make(timestep_sampling="cosine")
    flow = make()
    with pytest.raises(ValueError, match="sampler must be one of \\('euler', 'heun'\\), got 'dpmpp_2m'"):
        flow.sample(batch_size=1, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="FlowMatching samples with sampler and steps only"):
        flow.sample(batch_size=1, karras=True)
    with pytest.raises(ValueError, match="float times must lie in \\[0, 1\\]"):
        flow(torch.rand(1, 1, 4, 32, 32), times=torch.tensor([3.0]))
    with pytest.raises(ValueError, match="integer times must lie in \\[0, 1000\\)"):
        flow(torch.rand(1, 1, 4, 32, 32), times=torch.tensor([1000]))


def test_integer_times_are_quantiles_of_the_time_distribution():
    flow = FlowMatching(FlowOracle(), image_size=32, num_frames=4, channels=1, timesteps=1000)
    t = flow.times_from_index(torch.arange(1000))
    assert bool((t[1:] > t[:-1]).all()) and 0 < t[0].item() and t[-1].item() < 1
    assert t[499].item() < 0.5 < t[500].item()
    # The empirical deciles of drawn times match (seeded: the sample minimum, drawn[0], is
    # too variable to compare, so the comparison starts at the first decile).
    torch.manual_seed(0)
    drawn = flow.sample_times(20000, "cpu").sort().values
    torch.testing.assert_close(drawn[2000::2000], t[100::100], atol=0.02, rtol=0)


def test_flow_matching_runs_in_a_vae_latent_space():
    """With `vae=`, the flow trains and samples on the latents; data in and samples out stay
    pixel videos, and `encoded=True` takes cached latents."""
    pytest.importorskip("diffusers")
    from byo_models import tiny_unet2d, tiny_vae

    from spacetime import inflate

    torch.manual_seed(0)
    flow = FlowMatching(inflate(tiny_unet2d()), image_size=16, num_frames=2, channels=3, vae=tiny_vae())
    videos = torch.rand(2, 3, 2, 16, 16)
    loss = flow(videos)
    assert loss.ndim == 0 and torch.isfinite(loss)
    latents = flow.encode_latents(videos)
    assert latents.shape == (2, 4, 2, 8, 8)
    torch.manual_seed(1)
    from_latents = flow(latents, encoded=True, noise=torch.randn_like(latents), times=torch.full((2,), 0.5))
    torch.manual_seed(1)
    from_pixels = flow(videos, noise=torch.randn_like(latents), times=torch.full((2,), 0.5))
    torch.testing.assert_close(from_latents, from_pixels)
    samples = flow.sample(batch_size=2, steps=2)
    assert samples.shape == (2, 3, 2, 16, 16) and float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0
    assert flow.interpolate(videos, videos, t=0.5, steps=2).shape == videos.shape
