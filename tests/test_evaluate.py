"""The moving-digits metrics: near perfect on real videos, near chance on mismatched ones."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusion import evaluate
from diffusion.moving_digits import DIRECTION_NAMES, DIRECTIONS, MovingDigits, write_moving_digits


@pytest.fixture(scope="module")
def real():
    data = MovingDigits(160, seed=11)
    return data.videos(), list(data.captions)


def test_ground_truth_scores_high(real):
    videos, captions = real
    results = evaluate.evaluate_videos(videos, captions)
    assert results["num_videos"] == 160
    assert results["direction_accuracy"] >= 0.95
    assert results["digit_accuracy"] >= 0.85
    assert results["direction_undetected"] == 0 and results["digit_undetected"] == 0
    assert set(results["per_direction"]) == set(DIRECTION_NAMES)
    assert sum(row["count"] for row in results["per_digit"].values()) == 160
    json.dumps(results)  # plain JSON types only


@pytest.mark.parametrize(
    "arguments",
    [
        {"channels": 3, "seed": 12},
        {"image_size": 48, "digit_size": 16, "num_frames": 12, "speed": 2.5, "seed": 13},
        {"image_size": 24, "digit_size": 10, "num_frames": 6, "speed": 1, "seed": 14},
    ],
)
def test_ground_truth_scores_high_at_other_settings(arguments):
    data = MovingDigits(60, **arguments)
    results = evaluate.evaluate_videos(data.videos(), data.captions)
    assert results["direction_accuracy"] >= 0.95
    assert results["digit_accuracy"] >= 0.85


def test_ground_truth_with_noise_and_blur_still_scores_high(real):
    # generated samples are never clean: a grey floor, speckle noise, soft edges
    videos, captions = real
    generator = torch.Generator().manual_seed(1)
    noisy = (0.8 * videos + 0.1 + 0.1 * torch.randn(videos.shape, generator=generator)).clamp(0, 1)
    results = evaluate.evaluate_videos(noisy, captions)
    assert results["direction_accuracy"] >= 0.95 and results["digit_accuracy"] >= 0.85
    blurred = torch.nn.functional.avg_pool3d(videos, (1, 3, 3), stride=1, padding=(0, 1, 1))
    results = evaluate.evaluate_videos(blurred, captions)
    assert results["direction_accuracy"] >= 0.95 and results["digit_accuracy"] >= 0.85


def test_shuffled_captions_score_near_chance(real):
    videos, captions = real
    shuffled = list(captions)
    random.Random(0).shuffle(shuffled)
    results = evaluate.evaluate_videos(videos, shuffled)
    # chance is 1/8 and 1/10; with 160 videos the binomial spread is about 3 points
    assert results["direction_accuracy"] <= 0.25
    assert results["digit_accuracy"] <= 0.22
    assert results["joint_accuracy"] <= 0.06


def test_noise_and_blank_videos_score_low(real):
    _, captions = real
    noise = torch.rand(40, 1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    results = evaluate.evaluate_videos(noise, captions[:40])
    assert results["direction_accuracy"] <= 0.25 and results["digit_accuracy"] <= 0.3
    blank = torch.zeros(10, 1, 8, 32, 32)
    results = evaluate.evaluate_videos(blank, captions[:10])
    assert results["direction_accuracy"] == 0 and results["digit_accuracy"] == 0
    assert results["direction_undetected"] == 10 and results["digit_undetected"] == 10


def test_a_still_digit_has_no_direction(real):
    videos, _ = real
    still = videos[0][:, :1].expand(-1, 8, -1, -1)
    assert evaluate.motion_direction(still) is None
    assert evaluate.classify_digit(still) is not None


@given(
    direction=st.sampled_from(DIRECTION_NAMES),
    size=st.integers(3, 8),
    speed=st.floats(0.6, 3.0),
    num_frames=st.integers(3, 8),
    brightness=st.floats(0.5, 1.0),
)
def test_motion_direction_of_a_moving_square(direction, size, speed, num_frames, brightness):
    dx, dy = DIRECTIONS[direction]
    canvas = 48
    video = torch.zeros(3, num_frames, canvas, canvas)
    start = canvas // 2 - size // 2
    for t in range(num_frames):
        x = round(start + dx * speed * (t - num_frames // 2))
        y = round(start + dy * speed * (t - num_frames // 2))
        video[:, t, y : y + size, x : x + size] = brightness
    assert evaluate.motion_direction(video) == direction


def test_unparsable_captions_and_mismatched_lengths_raise(real):
    videos, captions = real
    with pytest.raises(ValueError, match="not a moving-digits caption"):
        evaluate.evaluate_videos(videos[:2], [captions[0], "a cat playing the piano"])
    with pytest.raises(ValueError, match="2 videos but 3 captions"):
        evaluate.evaluate_videos(videos[:2], captions[:3])
    with pytest.raises(ValueError, match="1 or 3"):
        evaluate.motion_direction(torch.rand(2, 4, 8, 8))


def test_evaluate_folder_and_table(tmp_path, caplog):
    write_moving_digits(tmp_path, 30, seed=21)
    (tmp_path / "broken.gif").write_bytes(b"GIF89a not really")
    (tmp_path / "broken.txt").write_text("the digit 1 moving up")
    caplog.set_level(logging.WARNING, logger="diffusion.evaluate")
    results = evaluate.evaluate_folder(tmp_path)
    assert results["num_videos"] == 30
    assert results["skipped"] == [str(tmp_path / "broken.gif")]
    assert any("broken.gif" in r.getMessage() for r in caplog.records)
    assert results["direction_accuracy"] >= 0.95 and results["digit_accuracy"] >= 0.85
    table = evaluate.results_table(results)
    assert "| direction accuracy | " in table and "| up and to the left |" in table
    assert "| unreadable (skipped) | 1 |" in table
    (tmp_path / "000003.txt").unlink()
    with pytest.raises(ValueError, match="000003.gif"):
        evaluate.evaluate_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos found"):
        evaluate.evaluate_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        evaluate.evaluate_folder(tmp_path / "missing")


def test_classifier_is_deterministic():
    first = evaluate.digit_classifier()
    evaluate.digit_classifier.cache_clear()
    second = evaluate.digit_classifier()
    frames = MovingDigits(10, seed=5).videos()[:, 0, 0].numpy()
    rows = [evaluate.digit_features(frame) for frame in frames]
    assert (first.decision_function(rows) == second.decision_function(rows)).all()


def test_shape_consistency_is_one_on_ground_truth_and_drops_when_the_digit_morphs():
    data = MovingDigits(40, image_size=16, digit_size=8, speed=1.0, num_frames=8, seed=3)
    videos = data.videos()
    results = evaluate.evaluate_videos(videos, data.captions)
    assert results["shape_consistency"] == pytest.approx(1.0, abs=1e-6)
    low, high = results["intervals"]["shape_consistency"]
    assert low <= results["shape_consistency"] <= high
    # the second half of each video shows another video's digit: the shape changes mid-way
    morphed = videos.clone()
    morphed[:, :, 4:] = videos.roll(1, dims=0)[:, :, 4:]
    assert evaluate.evaluate_videos(morphed, data.captions)["shape_consistency"] < 0.9


def test_shape_consistency_of_one_video():
    data = MovingDigits(1, image_size=16, digit_size=8, speed=1.0, num_frames=8, seed=5)
    video = data.videos()[0]
    assert evaluate.shape_consistency(video) == pytest.approx(1.0)
    assert evaluate.shape_consistency(torch.zeros_like(video)) is None  # nothing to compare
    gone = video.clone()
    gone[:, 1:] = 0  # the digit vanishes after the first frame
    assert evaluate.shape_consistency(gone) is None
    half = video.clone()
    half[:, 4:] = 0  # vanishes half-way: those frames count as 0
    assert evaluate.shape_consistency(half) == pytest.approx(3 / 7)


def test_wilson_interval_known_values():
    low, high = evaluate.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = evaluate.wilson_interval(58, 64)
    assert low == pytest.approx(0.8099, abs=2e-3) and high == pytest.approx(0.9563, abs=2e-3)


@given(st.integers(0, 500), st.integers(1, 500))
def test_wilson_interval_contains_the_rate(hits, count):
    hits = min(hits, count)
    low, high = evaluate.wilson_interval(hits, count)
    assert 0.0 <= low <= hits / count <= high <= 1.0


def test_results_table_prints_intervals(real):
    videos, captions = real
    table = evaluate.results_table(evaluate.evaluate_videos(videos[:16], captions[:16]))
    assert "95% interval" in table and "shape consistency | 1.000 (1.000-1.000)" in table
    assert "direction accuracy | 100.0% (80.6%-100.0%)" in table
