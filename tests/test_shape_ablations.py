"""benchmarks/shape_ablations.py: the demo ablations that patch the library, and their scoring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.shape_ablations import frame_diff_error, shape_by_lag

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "shape_ablations.py"


def test_frame_diff_error_is_zero_for_an_error_shared_by_all_frames():
    target = torch.randn(2, 1, 4, 5, 5)
    same = target + torch.randn(2, 1, 1, 5, 5)  # the same error in every frame
    assert frame_diff_error(same, target).shape == target.shape
    assert frame_diff_error(same, target).abs().max() < 1e-6
    changing = target.clone()
    changing[:, :, 2] += 1.0  # one frame's error differs
    change = frame_diff_error(changing, target)
    assert torch.allclose(change[:, :, 1], torch.ones_like(change[:, :, 1]))  # frame 1 -> 2
    assert torch.allclose(change[:, :, 2], torch.ones_like(change[:, :, 2]))  # frame 2 -> 3
    assert change[:, :, 0].abs().max() < 1e-6 and change[:, :, 3].abs().max() < 1e-6


def test_shape_by_lag_is_one_on_real_videos_and_drops_for_changing_digits():
    from diffusion.moving_digits import MovingDigits

    data = MovingDigits(num_videos=6, image_size=16, num_frames=5, digit_size=8, speed=1.0, seed=3)
    videos = [data[i]["video"] for i in range(6)]
    lags = shape_by_lag(videos)
    assert len(lags) == 4
    assert all(abs(value - 1.0) < 1e-9 for value in lags)
    # Each frame from a different video: the digits' shapes differ between frames.
    mixed = torch.stack([videos[i][:, i % 5] for i in range(5)], dim=1)
    assert max(shape_by_lag([mixed])) < 0.99


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_patches_change_what_they_name():
    out = _python(
        "import torch\n"
        "from benchmarks.shape_ablations import apply_patch\n"
        "from unets.blocks import ResnetBlock\n"
        "from spacetime.attention import SpatioTemporalAttention\n"
        "torch.manual_seed(0)\n"
        "block = SpatioTemporalAttention(8, dim_head=4, heads=2, add_feed_forward=False)\n"
        "torch.nn.init.normal_(block.temporal.attn.to_out.weight)\n"
        "x = torch.randn(1, 8, 3, 4, 4)\n"
        "before, image_before = block(x), block(x[:, :, 0])\n"
        "apply_patch('joint-attention')\n"
        "after, image_after = block(x), block(x[:, :, 0])\n"
        "print('joint', float((before - after).abs().max()) > 1e-3, bool(torch.equal(image_before, image_after)))\n"
        "apply_patch('temporal-kernel-5')\n"
        "print('kernel', ResnetBlock(4, 4).block1.project.temporal.weight.shape[-1])\n"
    )
    assert "joint True True" in out
    assert "kernel 5" in out


def test_patched_training_runs_and_its_weights_need_the_patch(tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, str(SCRIPT), "run", "conv3d-16px", "--", "--threads", "1", "-q", "train", "--preset",
             "debug", "--out", str(run)]
    result = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = _python(
        "from diffusion import load_run\n"
        "from diffusion.config_fields import ConfigError\n"
        f"try:\n    load_run({str(run)!r})\nexcept ConfigError:\n    print('plain model refused')\n"
        "from benchmarks.shape_ablations import apply_patch\n"
        "apply_patch('conv3d-16px')\n"
        f"unet = load_run({str(run)!r}).denoise_fn\n"
        "print('patched', type(unet.downs[0].init_block.block1.project).__name__, "
        "type(unet.downs[1].init_block.block1.project).__name__)\n"
    )
    assert "plain model refused" in out
    assert "patched Conv3dBlock PseudoConv3d" in out
    score = [sys.executable, str(SCRIPT), "score", str(run), "--patch", "conv3d-16px", "--per-caption", "1",
             "--steps", "3", "--skip-guidance", "0.5"]
    result = subprocess.run(score, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sampled: direction" in result.stdout and "by frame distance" in result.stdout


@pytest.mark.parametrize("name", ["nonsense"])
def test_unknown_patch_is_refused(name):
    from benchmarks.shape_ablations import apply_patch

    with pytest.raises(ValueError, match="unknown patch"):
        apply_patch(name)
