"""Long videos: window layouts, the windowed denoiser, FreeNoise noise, autoregressive
extension (diffusion/long_video.py), the per-window metrics (diffusion/evaluate_long.py) and
their command-line hooks."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import unets
from diffusion import FlowMatching, GaussianDiffusion
from diffusion.cli import main
from diffusion.evaluate_long import evaluate_long_videos, unfolded_path, window_scores
from diffusion.frame_masks import future_mask
from diffusion.long_video import (
    WINDOW_WEIGHTS,
    WindowedDenoiser,
    extend,
    free_noise,
    fusion_weights,
    sample_long,
    window_starts,
    window_weights,
    windowed,
)
from diffusion.moving_digits import DIRECTIONS, MovingDigits
from unets.base import guidance_mix


def _unet(*, frame_cond: bool = False, cond_dim: int | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = unets.build("unet3d", preset="debug", frame_cond=frame_cond, cond_dim=cond_dim)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def _process(*, frame_cond: bool = False, cond_dim: int | None = None, flow: bool = False, frames: int = 4):
    net = _unet(frame_cond=frame_cond, cond_dim=cond_dim)
    if flow:
        return FlowMatching(net, image_size=8, num_frames=frames, channels=3).eval()
    return GaussianDiffusion(net, image_size=8, num_frames=frames, timesteps=20).eval()


class PerFrame(nn.Module):
    """A denoiser with no temporal mixing: fusing its windows must give its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        b, c, f, h, w = x.shape
        folded = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        return self.conv(folded).reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


# --- layouts ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(frames=st.integers(1, 60), window=st.integers(1, 12), stride_part=st.integers(1, 12),
       kind=st.sampled_from(WINDOW_WEIGHTS))
def test_windows_cover_every_frame_and_weights_sum_to_one(frames, window, stride_part, kind):
    stride = min(stride_part, window)
    starts = window_starts(frames, window, stride)
    length = min(window, frames)
    assert starts[0] == 0 and starts[-1] + length == frames
    assert all(0 <= s <= frames - length for s in starts) and starts == sorted(set(starts))
    covered = torch.zeros(frames, dtype=torch.bool)
    for s in starts:
        covered[s : s + length] = True
    assert bool(covered.all())
    weights = fusion_weights(frames, window, stride, kind)
    assert weights.shape == (len(starts), frames)
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(frames, dtype=torch.float64))
    for row, s in enumerate(starts):
        outside = torch.ones(frames, dtype=torch.bool)
        outside[s : s + length] = False
        assert bool((weights[row][outside] == 0).all()) and bool((weights[row][~outside] > 0).all())
    if frames <= window:
        assert starts == [0] and bool((weights == 1).all())


def test_window_weights_taper_and_refuse_unknown_kinds():
    assert window_weights(4, "triangular").tolist() == [1.0, 2.0, 2.0, 1.0]
    assert window_weights(3, "uniform").tolist() == [1.0, 1.0, 1.0]
    cosine = window_weights(6, "cosine")
    assert bool((cosine > 0).all()) and cosine[0] < cosine[2]
    with pytest.raises(ValueError, match="weights must be one of .*got 'gauss'"):
        window_weights(4, "gauss")
    with pytest.raises(ValueError, match="stride must be an int <= 4, got 5"):
        window_starts(10, 4, 5)


# --- the windowed denoiser -------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(frames=st.integers(1, 14), window=st.integers(1, 6), stride_part=st.integers(1, 6),
       kind=st.sampled_from(WINDOW_WEIGHTS))
def test_fusing_a_per_frame_denoiser_gives_its_own_output(frames, window, stride_part, kind):
    torch.manual_seed(frames)
    model = PerFrame()
    x = torch.randn(2, 2, frames, 4, 4)
    wrapped = WindowedDenoiser(model, window, min(stride_part, window), kind)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, torch.zeros(2)), model(x), atol=1e-5, rtol=1e-5)


def test_windowed_unet_on_one_window_is_the_unet_exactly():
    net = _unet(cond_dim=16)
    x, t, cond = torch.randn(2, 3, 4, 8, 8), torch.tensor([3, 7]), torch.randn(2, 16)
    wrapped = WindowedDenoiser(net, 4, 2)
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, cond=cond), net(x, t, cond=cond))
        assert torch.equal(wrapped(x[:, :, :3], t, cond=cond), net(x[:, :, :3], t, cond=cond))
        assert torch.equal(wrapped.forward_with_cond_scale(x, t, cond, 3.0), net.forward_with_cond_scale(x, t, cond, 3.0))
    assert wrapped.cond_format == net.cond_format and wrapped.config is net.config


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_windowed_guidance_is_the_guidance_of_the_fused_outputs(rescale):
    net = _unet(cond_dim=16)
    x, t, cond = torch.randn(2, 3, 7, 8, 8), torch.tensor([3, 7]), torch.randn(2, 16)
    wrapped = WindowedDenoiser(net, 4, 2)
    with torch.no_grad():
        out = wrapped(x, t, cond=cond, null_cond_prob=0.0)
        null = wrapped(x, t, cond=cond, null_cond_prob=1.0)
        guided = wrapped.forward_with_cond_scale(x, t, cond, 4.0, guidance_rescale=rescale, batched=True)
        two_calls = wrapped.forward_with_cond_scale(x, t, cond, 4.0, guidance_rescale=rescale, batched=False)
    expected = guidance_mix(out, null, 4.0, rescale)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(two_calls, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, null)


def test_windowed_cuts_known_frames_per_window():
    net = _unet(frame_cond=True)
    x, t = torch.randn(1, 3, 6, 8, 8), torch.tensor([5])
    known = torch.randn(1, 3, 6, 8, 8)
    mask = torch.tensor([[True, True, False, False, True, False]])
    wrapped = WindowedDenoiser(net, 4, 2, "uniform")
    with torch.no_grad():
        fused = wrapped(x, t, cond_frames=known, cond_frame_mask=mask)
        first = net(x[:, :, :4], t, cond_frames=known[:, :, :4], cond_frame_mask=mask[:, :4])
        last = net(x[:, :, 2:], t, cond_frames=known[:, :, 2:], cond_frame_mask=mask[:, 2:])
    torch.testing.assert_close(fused[:, :, :2], first[:, :, :2])
    torch.testing.assert_close(fused[:, :, 4:], last[:, :, 2:])
    torch.testing.assert_close(fused[:, :, 2:4], (first[:, :, 2:] + last[:, :, :2]) / 2)


def test_windowed_process_restores_its_unet_and_keeps_known_frames():
    process = _process(frame_cond=True)
    net = process.denoise_fn
    known = torch.rand(1, 3, 7, 8, 8)
    mask = torch.tensor([[True, False, False, True, False, False, True]])
    with windowed(process, stride=3) as wrapper:
        assert process.denoise_fn is wrapper and wrapper.window == 4
        video = process.sample(num_frames=7, batch_size=1, sampler="ddim", steps=2, cond_frames=known,
                               cond_frame_mask=mask, replace_known=True, generator=torch.Generator().manual_seed(0))
    assert process.denoise_fn is net
    assert video.shape == (1, 3, 7, 8, 8)
    torch.testing.assert_close(video[:, :, mask[0]], known[:, :, mask[0]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("flow, sampler", [(False, "ddim"), (False, "euler"), (False, "dpmpp_2m"), (True, "euler")])
def test_sample_long_by_windows_with_any_sampler(flow, sampler):
    process = _process(cond_dim=16, flow=flow)
    cond = torch.randn(2, 16)
    video = sample_long(process, 10, cond=cond, cond_scale=3.0, method="window", sampler=sampler, steps=2,
                        generator=torch.Generator().manual_seed(0))
    assert video.shape == (2, 3, 10, 8, 8) and bool(torch.isfinite(video).all())
    assert not hasattr(process.denoise_fn, "window")


def test_free_noise_reuses_the_first_window_shuffled():
    noise = free_noise((2, 3, 13, 4, 4), 4, 2, generator=torch.Generator().manual_seed(0))
    first = noise[:, :, :4]
    for frame in range(4, 13):
        block = (frame - 4) // 2 * 2 + 4
        sources = [s - 4 for s in range(block, min(block + 2, 13))]
        assert any(torch.equal(noise[:, :, frame], noise[:, :, s]) for s in sources)
        assert any(torch.equal(noise[:, :, frame], first[:, :, s]) for s in range(4))
    again = free_noise((2, 3, 13, 4, 4), 4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, again)


# --- extension --------------------------------------------------------------------------------


@settings(max_examples=5, deadline=None)
@given(given_frames=st.integers(3, 5), more=st.integers(0, 6), context=st.integers(1, 3))
def test_extension_keeps_the_given_frames_and_reaches_the_total(given_frames, more, context):
    process = _process(frame_cond=True)
    video = torch.rand(2, 3, given_frames, 8, 8)
    total = given_frames + more
    out = extend(process, video, total, context=context, sampler="ddim", steps=2,
                 generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 3, total, 8, 8)
    assert torch.equal(out[:, :, :given_frames], video)
    assert bool(torch.isfinite(out).all())


def test_extension_windows_are_conditioned_on_the_last_frames(monkeypatch):
    process = _process(frame_cond=True)
    calls = []
    real = process.sample

    def spy(**kwargs):
        calls.append((kwargs["cond_frames"].clone(), kwargs["cond_frame_mask"].clone(), kwargs["replace_known"]))
        return real(**kwargs)

    monkeypatch.setattr(process, "sample", spy)
    video = torch.rand(1, 3, 4, 8, 8)
    out = extend(process, video, 8, context=2, sampler="ddim", steps=2)
    assert len(calls) == 2
    for index, (known, mask, replace) in enumerate(calls):
        assert replace and torch.equal(mask[0], future_mask(4, 2))
        assert torch.equal(known[:, :, :2], out[:, :, 2 + 2 * index : 4 + 2 * index])
        assert bool((known[:, :, 2:] == 0).all())


def test_extend_needs_a_frame_conditioned_unet():
    with pytest.raises(ValueError, match="frame_cond=True.*frame_cond=False.*method='window'"):
        extend(_process(), torch.rand(1, 3, 4, 8, 8), 8)
    with pytest.raises(ValueError, match="frame_cond=True"):
        sample_long(_process(), 8, method="extend", batch_size=1)
    process = _process(frame_cond=True)
    with pytest.raises(ValueError, match="context must be an int <= 3, got 4"):
        extend(process, torch.rand(1, 3, 4, 8, 8), 8, context=4)
    with pytest.raises(ValueError, match=r"video must be \(B, 3, F, 8, 8\)"):
        extend(process, torch.rand(1, 1, 4, 8, 8), 8)
    with pytest.raises(ValueError, match="method must be one of 'extend', 'window', got 'loop'"):
        sample_long(process, 8, method="loop")


def test_sample_long_extend_and_short_lengths():
    process = _process(frame_cond=True)
    video = sample_long(process, 9, method="extend", context=2, batch_size=2, sampler="ddim", steps=2)
    assert video.shape == (2, 3, 9, 8, 8)
    short = sample_long(process, 4, batch_size=1, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(3))
    plain = process.sample(batch_size=1, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(short, plain)


# --- metrics -----------------------------------------------------------------------------------


def _long_digits(count: int = 48, seed: int = 5) -> MovingDigits:
    return MovingDigits(count, image_size=16, num_frames=32, digit_size=8, speed=1.0, seed=seed)


def test_real_long_videos_score_full_marks():
    data = _long_digits()
    assert data.bounces
    results = evaluate_long_videos(data.videos(), data.captions, window=8, stride=4)
    assert results["direction_accuracy"] == 1.0
    assert results["shape_consistency"] > 0.999 and results["shape_drift"] > 0.999
    assert [row["start"] for row in results["per_window"]] == list(range(0, 25, 4))
    json.dumps(results)


def test_shuffled_captions_score_near_chance():
    data = _long_digits()
    captions = list(data.captions)
    random.Random(0).shuffle(captions)
    results = evaluate_long_videos(data.videos(), captions, window=8, stride=4)
    assert results["direction_accuracy"] < 0.4


def test_unfolding_straightens_a_bouncing_path():
    data = _long_digits(8)
    for index in range(len(data)):
        direction = data.captions[index].split("moving ")[1]
        path = unfolded_path(data.render(index), direction)
        steps = path[1:] - path[:-1]
        expected = torch.tensor([DIRECTIONS[direction]] * 31, dtype=torch.float64)
        torch.testing.assert_close(torch.from_numpy(steps), expected, atol=1e-5, rtol=0)


def test_a_digit_that_turns_back_mid_frame_is_wrong_there():
    video = torch.zeros(1, 16, 16, 16)
    xs = list(range(6)) + list(range(6, -4, -1))[1:11]  # right, then back left from x=5 (no edge)
    for frame, x in enumerate(xs[:16]):
        video[0, frame, 4:10, max(x, 0) + 1 : max(x, 0) + 6] = 1.0
    rows = window_scores(video, "the digit 1 moving right", 6, 5)
    assert rows[0]["direction_right"] and not rows[-1]["direction_right"]


# --- command line -------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    return main(["--threads", "1", "-q", *argv])


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("long") / "run"
    try:
        assert run_cli("train", "--preset", "debug", "--out", str(run), "--set", "trainer.train_num_steps=1") == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_cli_samples_and_scores_long_videos(debug_run, tmp_path):
    out = tmp_path / "long"
    assert run_cli("sample", "--checkpoint", str(debug_run), "--frames", "7", "--window-stride", "3",
                   "--prompt", "the digit 3 moving up", "--steps", "2", "--out", str(out)) == 0
    from diffusion import media

    (gif,) = out.glob("*.gif")
    assert media.read_video(gif, channels=1).shape[1] == 7
    assert run_cli("eval", str(out), "--window", "4", "--window-stride", "2") == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["window"] == 4 and [row["start"] for row in results["per_window"]] == [0, 2, 3]


@pytest.mark.parametrize("argv, message", [
    (["--frames", "8", "--long", "extend"], "--long extend needs a U-Net trained with frame_cond: true"),
    (["--frames", "8", "--context", "2"], "--context goes with --long extend"),
    (["--long", "window"], "go with --frames N"),
    (["--frames", "8", "--window-stride", "9"], "--window-stride must be at most the run's trained length 4, got 9"),
    (["--frames", "8", "--long", "loop"], "invalid choice: 'loop'"),
])
def test_cli_long_errors_are_one_line(debug_run, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if "loop" in argv else _no_exit():
        code = run_cli("sample", "--checkpoint", str(debug_run), *argv, "--steps", "1", "--out", str(tmp_path / "s"))
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_eval_window_errors(tmp_path, capsys):
    assert run_cli("eval", str(tmp_path), "--window-stride", "2") == 2
    assert "--window-stride goes with --window W" in capsys.readouterr().err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- benchmark scripts ---------------------------------------------------------------------------


def test_long_video_benchmark_quick(tmp_path):
    from benchmarks import long_video as long_bench

    argv = ["--quick", "--cases", "short,window,window-no-free-noise,extend,extend-first-cond", "--out", str(tmp_path)]
    assert long_bench.main(argv) == 0
    (report,) = tmp_path.glob("*-long-video.json")
    rows = json.loads(report.read_text())["rows"]
    assert [row["case"] for row in rows] == list(long_bench.CASES)
    assert [row["frames"] for row in rows] == [4, 9, 9, 9, 9]
    assert all(0.0 <= row["direction_accuracy"] <= 1.0 for row in rows)


def test_bouncing_crops_follow_the_bounce_law():
    from benchmarks.train_extend import BouncingCrops

    data = BouncingCrops(40, num_frames=8, image_size=16, digit_size=8, speed=1.0)
    videos = torch.stack([data[i]["video"] for i in range(len(data))])
    assert videos.shape == (40, 1, 8, 16, 16)
    results = evaluate_long_videos(videos, data.captions, window=8)
    assert results["direction_accuracy"] == 1.0 and results["shape_consistency"] > 0.999


def test_train_extend_quick(tmp_path):
    from benchmarks import train_extend
    from diffusion.run import load_run

    threads = torch.get_num_threads()
    try:
        assert train_extend.main(["--quick", "--bouncing", "--out", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    process = load_run(tmp_path / "run")
    assert process.denoise_fn.config.frame_cond is True
