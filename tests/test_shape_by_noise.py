"""benchmarks/shape_by_noise.py: one-shot x0 shape consistency from noised real videos."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.shape_by_noise import held_out_videos, shape_by_noise
from diffusion import GaussianDiffusion


class Oracle(nn.Module):
    """Predicts the true clean videos (objective x0), whatever the input."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, x, t, **kwargs):
        return self.x0.clone()


class Blind(nn.Module):
    """Predicts an empty video."""

    def forward(self, x, t, **kwargs):
        return torch.full_like(x, -1.0)


def _process(denoiser):
    return GaussianDiffusion(denoiser, image_size=16, num_frames=4, channels=1, timesteps=100, objective="x0")


def test_an_exact_denoiser_keeps_the_real_shape_and_a_blind_one_measures_nothing():
    probe = _process(Blind())
    videos, captions = held_out_videos(probe, 6, seed=3)
    assert videos.shape == (6, 1, 4, 16, 16) and len(captions) == 6
    rows = shape_by_noise(_process(Oracle(videos * 2 - 1)), videos, None, [10, 90])
    assert [row["t"] for row in rows] == [10, 90]
    for row in rows:
        assert row["shape_consistency"] == pytest.approx(1.0, abs=1e-6)
        assert row["mae"] == pytest.approx(0.0, abs=1e-6)
    blind = shape_by_noise(probe, videos, None, [10])
    assert blind[0]["shape_consistency"] is None and blind[0]["measured"] == 0
    assert blind[0]["mae"] > 0.01


def test_timesteps_are_checked():
    probe = _process(Blind())
    videos, _ = held_out_videos(probe, 2, seed=3)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 100\)"):
        shape_by_noise(probe, videos, None, [100])
