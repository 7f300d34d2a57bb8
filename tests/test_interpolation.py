"""Frame interpolation as a trainable stage: sub-pixel moving digits and their ground truth
(diffusion/moving_digits.py), the interpolation metric (diffusion/evaluate_interp.py,
`spacetime eval --interp`) and the `moving-digits-interp` preset."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion.cli import main
from diffusion.config import ConfigError, DataConfig, RunConfig
from diffusion.evaluate_interp import (
    MAX_PSNR,
    interpolation_scores,
    interpolation_table,
    linear_blend,
    pooled_gain,
    psnr_per_video,
)
from diffusion.frame_masks import interpolation_mask, temporal_super_resolution
from diffusion.moving_digits import DIRECTION_NAMES, DIRECTIONS, MovingDigits
from diffusion.presets import get_preset
from diffusion.run import open_run


def run_cli(*argv: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["--threads", "1", "-q", *argv])
    finally:
        torch.set_num_threads(threads)


def _digest(videos: torch.Tensor) -> str:
    return hashlib.sha256(videos.numpy().tobytes()).hexdigest()[:16]


# --- sub-pixel moving digits ----------------------------------------------------------------


def test_default_rendering_is_unchanged():
    # Digests of the videos these arguments gave before sub-pixel rendering existed.
    small = MovingDigits(6, image_size=16, num_frames=8, digit_size=8, speed=1.0, seed=3).videos()
    assert _digest(small) == "5ed9d08e389082a9" and float(small.sum()) == 982.5
    rgb = MovingDigits(6, image_size=32, num_frames=10, digit_size=14, speed=2.5, seed=1, channels=3).videos()
    assert _digest(rgb) == "b72a216b785cc75f"


@pytest.mark.parametrize("speed", [1.0, 2.0, 3.0])
def test_subpixel_at_whole_pixel_speeds_is_the_default(speed):
    options = {"image_size": 16, "num_frames": 9, "digit_size": 6, "speed": speed, "seed": 7}
    assert torch.equal(MovingDigits(12, **options).videos(), MovingDigits(12, subpixel=True, **options).videos())


def _centroids(video: torch.Tensor) -> np.ndarray:
    frames = video[0].double()
    mass = frames.sum(dim=(1, 2))
    ys, xs = torch.arange(frames.shape[1], dtype=torch.float64), torch.arange(frames.shape[2], dtype=torch.float64)
    cx = (frames.sum(dim=1) * xs).sum(dim=1) / mass
    cy = (frames.sum(dim=2) * ys).sum(dim=1) / mass
    return torch.stack((cx, cy), dim=1).numpy()


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), speed=st.sampled_from([0.25, 0.3, 0.5, 0.75]))
def test_subpixel_centroid_moves_by_speed_every_frame(seed, speed):
    frames = int(7 / speed) + 1  # the path fits in the 8 px of room: no bounce
    data = MovingDigits(8, image_size=16, num_frames=frames, digit_size=8, speed=speed, seed=seed, subpixel=True)
    assert not data.bounces
    for index in range(len(data)):
        step = np.array(DIRECTIONS[DIRECTION_NAMES[data.direction_labels[index]]], dtype=np.float64)
        moves = np.diff(_centroids(data.render(index)), axis=0)
        assert np.abs(moves - speed * step).max() < 0.05
        video = data.render(index)
        assert float(video.max()) <= 1.0 + 1e-6 and float(video.min()) >= 0.0
        # the digit's brightness is conserved while it moves
        mass = video[0].sum(dim=(1, 2))
        assert torch.allclose(mass, mass[0].expand_as(mass), rtol=1e-5)


def test_rounded_rendering_jumps_and_subpixel_glides():
    options = {"image_size": 16, "num_frames": 29, "digit_size": 8, "speed": 0.25, "seed": 1}
    rounded, smooth = MovingDigits(4, **options), MovingDigits(4, subpixel=True, **options)
    # rounded: most consecutive frames are identical (the digit waits, then jumps a pixel)
    still = (rounded.videos().diff(dim=2).abs().flatten(3).amax(dim=3) == 0).float().mean()
    assert float(still) > 0.5
    assert float((smooth.videos().diff(dim=2).abs().flatten(3).amax(dim=3) == 0).float().mean()) == 0.0


@pytest.mark.parametrize(("speed", "subpixel", "factor"), [(1.0, False, 4), (2.0, False, 2), (0.5, True, 4), (1.0, True, 3)])
def test_at_frame_rate_is_the_ground_truth(speed, subpixel, factor):
    coarse = MovingDigits(16, image_size=16, num_frames=8, digit_size=8, speed=speed, seed=11, subpixel=subpixel)
    fine = coarse.at_frame_rate(factor)
    assert fine.num_frames == factor * 7 + 1 and fine.speed == speed / factor and fine.subpixel
    assert fine.captions == coarse.captions and fine.frame_rate == factor * coarse.frame_rate
    assert torch.equal(fine.videos()[:, :, ::factor], coarse.videos())
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        coarse.at_frame_rate(0)


def test_data_config_subpixel_key():
    assert DataConfig(subpixel=True).to_dict()["subpixel"] is True
    assert "subpixel" not in DataConfig().to_dict()
    with pytest.raises(ConfigError, match="data.subpixel must be a bool"):
        DataConfig(subpixel="yes")
    with pytest.raises(ConfigError, match="data.subpixel is not a key of data.kind='folder'"):
        DataConfig(kind="folder", folder="videos", subpixel=True)
    with pytest.raises(TypeError, match="subpixel"):
        MovingDigits(2, subpixel=1)


# --- the metric -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), given_frames=st.integers(2, 5), stride=st.integers(1, 5), seed=st.integers(0, 99))
def test_linear_blend_keeps_given_frames_and_is_exact_on_linear_videos(batch, given_frames, stride, seed):
    frames = stride * (given_frames - 1) + 1
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, 2, frames, 3, 3, generator=g)
    blend = linear_blend(video, stride)
    assert blend.shape == video.shape
    assert torch.equal(blend[:, :, ::stride], video[:, :, ::stride])
    # a video linear in time is its own blend; a static one too
    a, b = torch.rand(batch, 2, 1, 3, 3, generator=g), torch.rand(batch, 2, 1, 3, 3, generator=g)
    ramp = a + (b - a) * torch.linspace(0, 1, frames).view(1, 1, frames, 1, 1)
    assert torch.allclose(linear_blend(ramp, stride), ramp, atol=1e-6)
    static = a.expand(-1, -1, frames, -1, -1)
    if stride > 1:
        between = ~interpolation_mask(frames, stride)
        assert psnr_per_video(linear_blend(static, stride), static, between).tolist() == [MAX_PSNR] * batch


def test_psnr_values():
    truth = torch.full((2, 1, 5, 4, 4), 0.5)
    assert psnr_per_video(truth, truth).tolist() == [MAX_PSNR, MAX_PSNR]
    off = truth + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1, 1)
    assert torch.allclose(psnr_per_video(off, truth), torch.tensor([20.0, 40.0]), atol=1e-4)
    with pytest.raises(ValueError, match="stride \\* \\(F - 1\\) \\+ 1 frames"):
        linear_blend(torch.rand(1, 1, 6, 2, 2), 4)


class _Oracle:
    """A stand-in stage that returns the true videos: the metric must score it perfect."""

    def __init__(self, truth: torch.Tensor):
        self.truth = truth
        self.betas = torch.zeros(1)
        self.calls = 0

    def sample(self, *, cond_frames, cond_frame_mask, num_frames, batch_size, replace_known, generator, **options):
        rows = self.truth[self.calls : self.calls + batch_size]
        self.calls += batch_size
        assert torch.equal(cond_frames[:, :, cond_frame_mask[0]], rows[:, :, cond_frame_mask[0]])
        assert float(cond_frames[:, :, ~cond_frame_mask[0]].abs().max()) == 0.0
        return rows


def test_scores_of_the_true_frames_are_perfect_and_beat_blending():
    coarse = MovingDigits(6, image_size=16, num_frames=5, digit_size=8, speed=1.0, seed=2)
    truth = coarse.at_frame_rate(4).videos()
    # diagonal motion: blending two shifted digits is not a shifted digit
    assert any(k >= 4 for k in coarse.direction_labels)
    diagonal = torch.tensor([k >= 4 for k in coarse.direction_labels])
    results = interpolation_scores(_Oracle(truth), truth, 4, batch_size=4,
                                   groups={"diagonal": diagonal, "none": torch.zeros(6, dtype=torch.bool)})
    assert results["model_psnr"]["per_video"] == [MAX_PSNR] * 6
    assert results["in_between_frames"] == 12 and results["frames"] == 17
    assert results["linear_psnr"]["mean"] < MAX_PSNR and results["gain_db"]["mean"] > 0
    assert results["pooled"]["gain_db"]["value"] > 0
    low, high = results["model_psnr"]["interval"]
    assert low == high == MAX_PSNR
    assert "gain over blending" in interpolation_table(results)
    # groups: empty ones left out; blending is exact on horizontal / vertical sub-pixel motion
    assert list(results["groups"]) == ["diagonal"] and results["groups"]["diagonal"]["num_videos"] == int(diagonal.sum())
    straight = [p for p, d in zip(results["linear_psnr"]["per_video"], diagonal.tolist()) if not d]
    assert all(p == MAX_PSNR for p in straight)


def test_pooled_psnr_of_equal_errors_is_the_psnr():
    psnr = torch.full((8,), 30.0)
    pooled = pooled_gain(psnr, psnr - 3.0)
    assert abs(pooled["model_psnr"]["value"] - 30.0) < 1e-9 and abs(pooled["gain_db"]["value"] - 3.0) < 1e-9
    assert pooled["gain_db"]["interval"] == pytest.approx([3.0, 3.0])


# --- command line and preset ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_interp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("interp") / "run"
    assert run_cli("train", "--preset", "debug", "--out", str(run), "--set", "model.frame_cond=true",
                   "--set", "trainer.frame_masks={interpolate: 1, future: 0, first_frame: 0, unconditional: 0, "
                   "strides: [3]}", "--set", "trainer.train_num_steps=1", "--set", "data.subpixel=true",
                   "--set", "data.speed=0.5") == 0
    return run


def test_eval_interp_writes_scores(tiny_interp_run, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert run_cli("eval", "--interp", str(tiny_interp_run), "--stride", "3", "--num-videos", "3", "--steps", "2",
                   "--out", str(out)) == 0
    results = json.loads(out.read_text())
    assert results["num_videos"] == 3 and results["stride"] == 3 and results["steps"] == 2
    assert len(results["model_psnr"]["per_video"]) == 3 and results["data_seed"] != 0
    assert all(0 < v <= MAX_PSNR for v in results["model_psnr"]["per_video"])
    assert "linear blending PSNR" in capsys.readouterr().out
    assert set(results["groups"]) <= {"horizontal or vertical", "diagonal"}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--stride", "4"], "needs stride * (F - 1) + 1 frames"),
        (["--stride", "3", "--data-seed", "0"], "must differ from the run's data.seed=0"),
        (["FOLDER"], "not both"),
        (["--stride", "3", "--speed", "0"], "speed must lie in (0, inf]"),
        (["--stride", "3", "--num-frames", "8"], "needs stride * (F - 1) + 1 frames"),
        (["--stride", "3", "--window", "5"], "--interp --window counts frames"),
    ],
)
def test_eval_interp_errors_are_one_line(tiny_interp_run, tmp_path, capsys, argv, fragment):
    argv = [str(tmp_path) if a == "FOLDER" else a for a in argv]
    assert run_cli("eval", "--interp", str(tiny_interp_run), *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spacetime: error: ") and err.count("\n") == 1 and fragment in err


def test_eval_interp_at_one_speed_and_length(tiny_interp_run, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert run_cli("eval", "--interp", str(tiny_interp_run), "--stride", "3", "--num-videos", "2", "--steps", "2",
                   "--speed", "1", "--num-frames", "7", "--window", "4", "--out", str(out)) == 0
    results = json.loads(out.read_text())
    assert results["speed"] == 1.0 and results["speeds"] is None and results["frames"] == 7
    assert results["window"] == 2
    assert results["in_between_frames"] == 4
    assert "at 1 px/frame (3 px between given frames)" in capsys.readouterr().out


def test_eval_interp_of_a_mixed_speed_run_splits_by_spacing(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "--preset", "debug", "--out", str(run), "--set", "model.frame_cond=true",
                   "--set", "trainer.frame_masks={interpolate: 1, future: 0, first_frame: 0, unconditional: 0, "
                   "strides: [3]}", "--set", "trainer.train_num_steps=1", "--set", "data.subpixel=true",
                   "--set", "data.speed=null", "--set", "data.speeds=[0.5, 1]") == 0
    out = tmp_path / "scores.json"
    assert run_cli("eval", "--interp", str(run), "--stride", "3", "--num-videos", "8", "--steps", "2",
                   "--out", str(out)) == 0
    results = json.loads(out.read_text())
    assert results["speed"] is None and results["speeds"] == [0.5, 1.0]
    spacing = {name: scores["num_videos"] for name, scores in results["groups"].items() if name.endswith("px apart")}
    assert set(spacing) <= {"1.5 px apart", "3 px apart"} and sum(spacing.values()) == 8
    table = capsys.readouterr().out
    assert "at speeds 0.5, 1 px/frame (one per video)" in table and "| all videos | 8 |" in table


def test_eval_speed_must_be_a_number(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("eval", "--interp", str(tmp_path), "--speed", "fast")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--speed: must be a number, got 'fast'" in err


def test_interp_preset_is_valid_and_trains(tmp_path):
    config = RunConfig.from_dict(get_preset("moving-digits-interp"))
    # trained on 9-frame clips (3 given frames), sampled at the cascade's 4 * (8 - 1) + 1 = 29
    assert config.diffusion.num_frames == 4 * (3 - 1) + 1 and config.diffusion.image_size == 16
    assert not any(get_preset("moving-digits-interp")["model"]["temporal_compression"])
    assert config.unet.unet_config().frame_cond and config.data.subpixel and 0.25 in config.data.speeds
    assert config.trainer.frame_masks["interpolate"] >= 0.5 and config.trainer.frame_masks["strides"] == [4]
    assert 0 < config.trainer.max_seconds <= 600
    run = tmp_path / "run"
    assert run_cli("train", "--preset", "moving-digits-interp", "--out", str(run), "--set", "trainer.train_num_steps=1",
                   "--set", "trainer.train_batch_size=2", "--set", "data.num_videos=4",
                   "--set", "trainer.num_sample_rows=1", "--set", "trainer.sample_kwargs={sampler: ddim, steps: 2}") == 0
    assert (run / "checkpoint-final" / "ema.safetensors").is_file()
    # the 9-frame stage fills in the cascade's 8 base frames: 29 frames, the given ones exact
    base = MovingDigits(2, image_size=16, num_frames=8, digit_size=8, speed=1.0, seed=5, subpixel=True).videos()
    process = open_run(run).diffusion
    filled = temporal_super_resolution(process, base, 4, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(0))
    assert filled.shape == (2, 1, 29, 16, 16) and torch.equal(filled[:, :, ::4], base)
