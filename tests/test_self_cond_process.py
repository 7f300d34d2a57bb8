"""Self-conditioning in the processes (diffusion.self_cond): what the denoiser is given in
training and at every sampling step, for GaussianDiffusion and FlowMatching."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from diffusion import FlowMatching, GaussianDiffusion
from diffusion.config import ConfigError, RunConfig
from diffusion.self_cond import SelfCondEstimate, training_estimate, uses_self_cond


class SpyDenoiser(nn.Module):
    """A denoiser that records the `self_cond` it is given; output = a fixed mix of its inputs."""

    def __init__(self, self_cond: bool = True):
        super().__init__()
        self.config = types.SimpleNamespace(self_cond=self_cond)
        self.weight = nn.Parameter(torch.tensor(0.3))
        self.calls: list[torch.Tensor | None] = []

    def forward(self, x, t, *, self_cond=None, **kwargs):
        self.calls.append(None if self_cond is None else self_cond.detach().clone())
        out = self.weight * x
        if self_cond is not None:
            out = out + 0.5 * self_cond
        return out


def _process(cls=GaussianDiffusion, **kwargs):
    spy = SpyDenoiser(kwargs.pop("spy_self_cond", True))
    options = {"objective": "v"} if cls is GaussianDiffusion else {}
    process = cls(spy, image_size=4, num_frames=3, channels=1, timesteps=50, **options, **kwargs)
    return process, spy


def test_uses_self_cond_reads_the_config():
    assert uses_self_cond(SpyDenoiser(True))
    assert not uses_self_cond(SpyDenoiser(False))
    assert not uses_self_cond(nn.Linear(2, 2))


@pytest.mark.parametrize("cls", [GaussianDiffusion, FlowMatching])
def test_training_gives_the_estimate_to_a_share_of_the_batch(cls):
    torch.manual_seed(0)
    process, spy = _process(cls, self_cond_prob=0.5)
    assert process.self_cond
    videos = torch.rand(64, 1, 3, 4, 4)
    loss = process(videos)
    loss.backward()
    assert torch.isfinite(loss)
    # First call: the no-grad estimate on the chosen rows (given zeros); second: the whole
    # batch with the estimate on the chosen rows, zeros on the others.
    assert len(spy.calls) == 2
    estimate_input, final = spy.calls
    assert estimate_input.abs().sum() == 0
    rows = final.flatten(1).abs().sum(1) > 0
    assert final.shape == videos.shape
    assert 0 < int(rows.sum()) < 64  # about half (64 draws at p = 0.5)
    assert estimate_input.shape[0] == int(rows.sum())
    assert float(final.abs().max()) <= 1.0  # pixel-space estimates are kept in [-1, 1]


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_training_share_bounds(prob):
    process, spy = _process(self_cond_prob=prob)
    process(torch.rand(8, 1, 3, 4, 4))
    final = spy.calls[-1]
    if prob == 0.0:
        assert len(spy.calls) == 1 and final.abs().sum() == 0
    else:
        assert len(spy.calls) == 2 and bool((final.flatten(1).abs().sum(1) > 0).all())


def test_no_self_cond_for_a_plain_denoiser():
    process, spy = _process(spy_self_cond=False)
    assert not process.self_cond
    process(torch.rand(4, 1, 3, 4, 4))
    process.sample(batch_size=2, sampler="ddim", steps=3)
    assert all(call is None for call in spy.calls)


def test_training_estimate_is_the_x0_of_the_prediction():
    process, spy = _process(self_cond_prob=1.0)
    x_t, times = torch.randn(5, 1, 3, 4, 4), torch.randint(0, 50, (5,))
    estimate = training_estimate(spy, x_t, times, {}, 1.0, process._training_x0)
    prediction = spy(x_t, times, self_cond=torch.zeros_like(x_t))
    assert torch.allclose(estimate, process._training_x0(prediction, x_t, times))
    assert not estimate.requires_grad


@pytest.mark.parametrize("cls,sampler", [(GaussianDiffusion, "ddim"), (GaussianDiffusion, "dpmpp_2m"),
                                         (FlowMatching, "euler")])
def test_sampling_feeds_the_previous_x0(cls, sampler):
    process, spy = _process(cls)
    seen, returned = [], []
    original = process.model_predictions

    def recording(x, t, **kwargs):
        seen.append(kwargs.get("self_cond"))
        x0, eps = original(x, t, **kwargs)
        returned.append(x0.clone())
        return x0, eps

    process.model_predictions = recording
    process.sample(batch_size=3, sampler=sampler, steps=4, generator=torch.Generator().manual_seed(0))
    assert len(seen) >= 4
    assert seen[0].abs().sum() == 0
    for given, before in zip(seen[1:], returned[:-1]):
        assert torch.equal(given, before)
    # Each sampling run starts again from zeros.
    seen.clear()
    process.sample(batch_size=3, sampler=sampler, steps=2)
    assert seen[0].abs().sum() == 0


def test_estimate_restarts_on_a_new_shape():
    state = SelfCondEstimate()
    x = torch.ones(2, 1, 3, 4, 4)
    assert state.current(x).abs().sum() == 0
    state.update(x)
    assert torch.equal(state.current(x), x)
    assert state.current(torch.ones(3, 1, 3, 4, 4)).abs().sum() == 0


def test_self_cond_prob_is_checked():
    with pytest.raises(ValueError, match="self_cond_prob"):
        _process(self_cond_prob=1.5)
    with pytest.raises(ConfigError, match="diffusion.self_cond_prob"):
        RunConfig.from_dict({"unet": "space_time_unet", "model": {"dim": 8},
                             "diffusion": {"image_size": 8, "num_frames": 2, "self_cond_prob": -0.1}})


def _tiny_unet():
    import unets

    return unets.build("space_time_unet", dim=8, channels=1, dim_mult=(1, 2), self_attns=(False, True),
                       temporal_compression=(False, False), resnet_block_depths=(1, 1), attn_heads=1,
                       attn_dim_head=8, cond_dim=6, self_cond=True)


def test_a_self_cond_unet_trains_and_samples_with_guidance():
    torch.manual_seed(0)
    process = GaussianDiffusion(_tiny_unet(), image_size=8, num_frames=4, channels=1, timesteps=20,
                                objective="v", null_cond_prob=0.2)
    assert process.self_cond
    loss = process(torch.rand(4, 1, 4, 8, 8), cond=torch.randn(4, 6))
    loss.backward()
    assert torch.isfinite(loss)
    assert process.denoise_fn.self_cond_in.weight.grad is not None
    process.eval()
    videos = process.sample(cond=torch.randn(2, 6), cond_scale=3.0, sampler="ddim", steps=3)
    assert videos.shape == (2, 1, 4, 8, 8) and torch.isfinite(videos).all()


def test_windowed_sampling_cuts_the_estimate_per_window():
    from diffusion.long_video import sample_long

    torch.manual_seed(0)
    process = GaussianDiffusion(_tiny_unet(), image_size=8, num_frames=4, channels=1, timesteps=20, objective="v")
    process.eval()
    videos = sample_long(process, 10, method="window", cond=torch.randn(1, 6), sampler="ddim", steps=2)
    assert videos.shape == (1, 1, 10, 8, 8)
