"""Moving digits with a speed drawn per video (`MovingDigits(speeds=)`, `data.speeds`): mixed
motion for the frame-interpolation stage, where keyframes a fixed number of frames apart are
1, 2 or 4 px apart."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion.config import ConfigError, DataConfig, RunConfig
from diffusion.evaluate_interp import MAX_PSNR, interpolation_scores, linear_blend, psnr_per_video
from diffusion.frame_masks import interpolation_mask
from diffusion.moving_digits import DIRECTION_NAMES, DIRECTIONS, MovingDigits
from diffusion.presets import get_preset

SPEEDS = (0.25, 0.5, 1.0)


def _sha(videos: torch.Tensor) -> str:
    return hashlib.sha256(videos.numpy().tobytes()).hexdigest()


def test_without_speeds_videos_are_byte_identical_to_before():
    # Digests of these data sets before per-video speeds existed (main at the previous merge).
    default = MovingDigits(12, seed=5)
    assert _sha(default.videos()) == "017c74a54a495e2c52ade924bf214fc5ed1637929bbfc5ac48debe8799afea83"
    fine = MovingDigits(12, seed=5, speed=0.25, subpixel=True, image_size=16, digit_size=8, num_frames=29)
    assert _sha(fine.videos()) == "a240866fc37c73db5ea4a25135a3316c2de05f7912f94ad9cf5cb8d7bb5ca493"
    assert default.speed == 2.0 and default.speeds is None and default.frame_rate == 0.5
    assert torch.equal(MovingDigits(12, seed=5, speed=2.0).videos(), default.videos())
    assert np.all(default.video_speeds == 2.0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32), speeds=st.lists(st.sampled_from([0.25, 0.5, 0.75, 1.0, 2.0]), min_size=1,
                                                   max_size=4))
def test_speeds_are_drawn_from_the_set_and_reproducible(seed, speeds):
    options = {"image_size": 16, "num_frames": 5, "digit_size": 8, "seed": seed, "subpixel": True}
    data = MovingDigits(24, speeds=speeds, **options)
    again = MovingDigits(24, speeds=speeds, **options)
    assert set(data.video_speeds.tolist()) <= set(speeds)
    assert np.array_equal(data.video_speeds, again.video_speeds) and torch.equal(data.videos(), again.videos())
    # the speeds have a random stream of their own: digits and directions are those of speed=
    single = MovingDigits(24, speed=speeds[0], **options)
    assert np.array_equal(data.digit_labels, single.digit_labels) and data.captions == single.captions
    assert data.speed is None and data.frame_rate is None
    assert np.allclose(data.frame_rates, 1.0 / data.video_speeds)


def test_every_speed_of_the_set_is_used_and_the_seed_changes_them():
    data = MovingDigits(300, image_size=16, num_frames=5, digit_size=8, speeds=SPEEDS, seed=0)
    counts = [int((data.video_speeds == v).sum()) for v in SPEEDS]
    assert min(counts) > 60  # uniform over the set: 100 each expected
    other = MovingDigits(300, image_size=16, num_frames=5, digit_size=8, speeds=SPEEDS, seed=1)
    assert not np.array_equal(data.video_speeds, other.video_speeds)


def _centroids(video: torch.Tensor) -> np.ndarray:
    frames = video[0].double()
    mass = frames.sum(dim=(1, 2))
    xs = torch.arange(frames.shape[2], dtype=torch.float64)
    ys = torch.arange(frames.shape[1], dtype=torch.float64)
    return torch.stack(((frames.sum(dim=1) * xs).sum(dim=1) / mass, (frames.sum(dim=2) * ys).sum(dim=1) / mass),
                       dim=1).numpy()


def test_each_video_moves_at_its_own_speed():
    # 9 frames: at 1 px/frame the path is 8 px, which fits the room of 16 - 8: no bounce
    data = MovingDigits(30, image_size=16, num_frames=9, digit_size=8, speeds=SPEEDS, seed=4, subpixel=True)
    assert not data.bounces
    for index in range(len(data)):
        step = np.array(DIRECTIONS[DIRECTION_NAMES[data.direction_labels[index]]], dtype=np.float64)
        moves = np.diff(_centroids(data.render(index)), axis=0)
        assert np.abs(moves - data.video_speeds[index] * step).max() < 0.05


@pytest.mark.parametrize("factor", [2, 4])
def test_at_frame_rate_keeps_each_videos_speed(factor):
    coarse = MovingDigits(16, image_size=16, num_frames=5, digit_size=8, speeds=[1.0, 2.0], seed=3, subpixel=True)
    fine = coarse.at_frame_rate(factor)
    assert fine.speeds == (1.0 / factor, 2.0 / factor)
    assert np.allclose(fine.video_speeds * factor, coarse.video_speeds)
    assert torch.equal(fine.videos()[:, :, ::factor], coarse.videos())
    assert np.allclose(fine.frame_rates, factor * coarse.frame_rates)


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"speeds": [1.0], "speed": 1.0}, ValueError, "not both"),
        ({"speeds": []}, ValueError, "non-empty list"),
        ({"speeds": [0.5, 0]}, ValueError, "each of speeds must lie in (0, inf]"),
        ({"speeds": [True]}, TypeError, "each of speeds must be a number"),
        ({"speed": -1}, ValueError, "speed must lie in (0, inf]"),
    ],
)
def test_bad_speeds_are_refused(options, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        MovingDigits(2, **options)


def test_data_config_speeds_key():
    assert DataConfig(speeds=(0.25, 1)).to_dict()["speeds"] == [0.25, 1]
    assert "speeds" not in DataConfig().to_dict()
    for value, fragment in (([], "non-empty list"), ("fast", "non-empty list"), ([0.5, -1], r"data.speeds\[1\]"),
                            ([0.5, "x"], r"data.speeds\[1\]")):
        with pytest.raises(ConfigError, match=fragment):
            DataConfig(speeds=value)
    with pytest.raises(ConfigError, match="not both"):
        DataConfig(speed=0.5, speeds=[0.5])
    with pytest.raises(ConfigError, match="data.speeds is not a key of data.kind='folder'"):
        DataConfig(kind="folder", folder="videos", speeds=[1.0])


def test_interp_preset_mixes_speeds():
    config = RunConfig.from_dict(get_preset("moving-digits-interp"))
    assert config.data.speeds == [0.25, 0.5, 1.0] and config.data.speed is None


def test_true_frames_score_perfect_and_blending_fails_at_wide_spacing():
    # The metric on mixed speeds: the true frames are perfect at every spacing, while blending
    # is near-exact 1 px apart and clearly worse 4 px apart (two ghost digits).
    coarse = MovingDigits(12, image_size=16, num_frames=3, digit_size=8, speeds=[1.0, 4.0], seed=9, subpixel=True)
    truth = coarse.at_frame_rate(4).videos()
    between = ~interpolation_mask(truth.shape[2], 4)
    blend = psnr_per_video(linear_blend(truth, 4), truth, between)
    wide = torch.from_numpy(coarse.video_speeds == 4.0)
    assert bool(wide.any()) and bool((~wide).any())
    assert float(blend[~wide].min()) > float(blend[wide].max()) + 3.0

    class Oracle:
        betas = torch.zeros(1)

        def sample(self, *, cond_frames, cond_frame_mask, num_frames, batch_size, **options):
            return truth[: batch_size]

    results = interpolation_scores(Oracle(), truth, 4, batch_size=12, groups={"4 px apart": wide})
    assert results["model_psnr"]["per_video"] == [MAX_PSNR] * 12
    assert results["groups"]["4 px apart"]["gain_db"]["value"] > 3.0


class _Blender:
    """A stand-in stage that blends its given frames linearly and records the lengths asked."""

    betas = torch.zeros(1)

    def __init__(self, stride: int):
        self.stride, self.lengths = stride, []

    def sample(self, *, cond_frames, cond_frame_mask, num_frames, batch_size, **options):
        self.lengths.append(num_frames)
        return linear_blend(cond_frames, self.stride)


@pytest.mark.parametrize(("window", "lengths"), [(None, [29]), (3, [9, 9, 9, 5]), (2, [5] * 7), (8, [29]), (5, [17, 13])])
def test_windowed_interpolation_joins_windows_on_a_shared_given_frame(window, lengths):
    from diffusion.evaluate_interp import windowed_interpolation

    given = torch.rand(2, 1, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    stage = _Blender(4)
    out = windowed_interpolation(stage, given, 4, window)
    assert stage.lengths == lengths and out.shape == (2, 1, 29, 4, 4)
    # blending is local to each pair of given frames, so windows change nothing
    expected = linear_blend(torch.zeros(2, 1, 29, 4, 4).index_copy(2, torch.arange(0, 29, 4), given), 4)
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(out[:, :, ::4], given)
