"""The embedded moving-digits data set: determinism, captions, geometry, files on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusion.data import VideoFolder, collate_videos
from diffusion.moving_digits import (
    DIRECTION_NAMES,
    DIRECTIONS,
    MovingDigits,
    make_caption,
    parse_caption,
    write_moving_digits,
)


def test_same_seed_same_videos_other_seed_other_videos():
    first, again, other = (MovingDigits(12, seed=s) for s in (5, 5, 6))
    torch.testing.assert_close(first.videos(), again.videos(), rtol=0, atol=0)
    assert first.captions == again.captions
    assert not torch.equal(first.videos(), other.videos())
    assert first.captions != other.captions


def test_items_shape_range_and_captions():
    data = MovingDigits(20, seed=1)
    item = data[3]
    assert set(item) == {"video", "caption"}
    assert item["video"].shape == (1, 8, 32, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() == 0 and 0.5 < item["video"].max() <= 1
    for index in range(len(data)):
        digit, direction = parse_caption(data[index]["caption"])
        assert digit == data.digit_labels[index]
        assert direction == DIRECTION_NAMES[data.direction_labels[index]]
    batch = collate_videos([data[i] for i in range(4)])
    assert batch["video"].shape == (4, 1, 8, 32, 32) and len(batch["caption"]) == 4


def test_three_channels_are_the_grey_video_repeated():
    grey, rgb = MovingDigits(3, seed=2), MovingDigits(3, seed=2, channels=3)
    for index in range(3):
        assert rgb[index]["video"].shape == (3, 8, 32, 32)
        torch.testing.assert_close(rgb[index]["video"], grey[index]["video"].expand(3, -1, -1, -1))


def test_labels_cover_all_digits_and_directions():
    data = MovingDigits(400, seed=0)
    assert set(data.digit_labels.tolist()) == set(range(10))
    assert set(data.direction_labels.tolist()) == set(range(8))


@given(
    image_size=st.integers(20, 40),
    digit_size=st.integers(8, 16),
    num_frames=st.integers(2, 10),
    speed=st.sampled_from([1, 1.5, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_the_digit_moves_in_its_direction_at_its_speed(image_size, digit_size, num_frames, speed, seed):
    data = MovingDigits(3, image_size=image_size, num_frames=num_frames, digit_size=digit_size,
                        speed=speed, seed=seed)
    for index in range(3):
        video = data.render(index)[0]
        positions = data.positions(index)
        # the digit never leaves the frame: its brightness is the same in every frame
        mass = video.sum(dim=(1, 2))
        torch.testing.assert_close(mass, mass[:1].expand_as(mass), rtol=1e-4, atol=1e-4)
        assert positions.min() >= 0 and positions.max() <= image_size - digit_size
        if not data.bounces:
            step = np.array(DIRECTIONS[DIRECTION_NAMES[data.direction_labels[index]]])
            expected = positions[0] + np.outer(np.arange(num_frames), step) * speed
            # positions are whole pixels: within half a pixel of the exact path
            assert np.abs(positions - expected).max() <= 0.5 + 1e-9


def test_bouncing_when_the_path_does_not_fit():
    data = MovingDigits(20, num_frames=24, speed=2, seed=3)
    assert data.bounces
    room = 32 - 14
    for index in range(len(data)):
        positions = data.positions(index)
        assert positions.min() >= 0 and positions.max() <= room
        step = np.array(DIRECTIONS[DIRECTION_NAMES[data.direction_labels[index]]])
        moves = np.diff(positions, axis=0)
        assert np.abs(moves).max() <= 2
        assert np.all(moves[:, step == 0] == 0)
        # a path of 46 px in 18 px of room turns round on every moving axis
        for axis in np.flatnonzero(step):
            assert (moves[:, axis] > 0).any() and (moves[:, axis] < 0).any()
        # the first step goes the captioned way unless the digit starts against a wall
        start = positions[0]
        if np.all((start + 2 * step >= 0) & (start + 2 * step <= room)):
            np.testing.assert_array_equal(moves[0], 2 * step)


@pytest.mark.parametrize("digit", range(10))
def test_caption_round_trip(digit):
    for direction in DIRECTION_NAMES:
        caption = make_caption(digit, direction)
        assert parse_caption(caption) == (digit, direction)
        assert parse_caption("  " + caption.upper().replace(" ", "  ") + ".") == (digit, direction)


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "the digit 10 moving up",
        "the digit 7 moving sideways",
        "the digit seven moving up",
        "a digit 7 moving up",
        "the digit 7 moving up and to the middle",
        "the digit 7 moving up, then down",
        "the digit 7",
    ],
)
def test_parse_caption_rejects_other_text(caption):
    with pytest.raises(ValueError, match="not a moving-digits caption"):
        parse_caption(caption)


@given(st.text(alphabet="the digt0123456789 movupdwnlfrs.", max_size=60))
def test_parse_caption_raises_value_error_or_returns_a_valid_pair(text):
    try:
        digit, direction = parse_caption(text)
    except ValueError:
        return
    assert 0 <= digit <= 9 and direction in DIRECTIONS


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_videos": 0}, "num_videos"),
        ({"num_frames": 1}, "num_frames"),
        ({"digit_size": 40}, "digit_size"),
        ({"speed": 0}, "speed"),
        ({"channels": 2}, "channels"),
        ({"text_embedding": "all"}, "text_embedding"),
    ],
)
def test_bad_arguments(arguments, message):
    arguments = {"num_videos": 4, **arguments}
    with pytest.raises(ValueError, match=message):
        MovingDigits(**arguments)
    with pytest.raises(ValueError):
        make_caption(11, "up")


@pytest.mark.parametrize("channels", [1, 3])
def test_written_files_load_back_equal(tmp_path, channels):
    arguments = {"image_size": 24, "num_frames": 6, "digit_size": 12, "speed": 2, "channels": channels, "seed": 4}
    paths = write_moving_digits(tmp_path, 10, **arguments)
    assert [p.name for p in paths] == [f"{i:06d}.gif" for i in range(10)]
    memory = MovingDigits(10, **arguments)
    folder = VideoFolder(tmp_path, image_size=24, num_frames=6, channels=channels,
                         frame_mode="pad", captions="required")
    assert len(folder) == 10
    # grey GIFs are exact up to 8-bit rounding; RGB goes through a palette
    tolerance = 0.5 / 255 + 1e-6 if channels == 1 else 0.05
    for index in range(10):
        item = folder[index]
        assert item["caption"] == memory.captions[index]
        assert (item["video"] - memory[index]["video"]).abs().max() <= tolerance


def test_text_encoder_sees_each_distinct_caption_once():
    class Encoder:
        def __init__(self):
            self.seen = []

        def encode(self, texts):
            self.seen.extend(texts)
            pooled = torch.tensor([[float(len(t)), float(t.count(" "))] for t in texts])
            tokens = pooled[:, None, :]
            return type("E", (), {"pooled": pooled, "tokens": tokens,
                                  "mask": torch.ones(len(texts), 1, dtype=torch.bool)})()

    encoder = Encoder()
    data = MovingDigits(60, seed=0, text_encoder=encoder)
    assert sorted(encoder.seen) == sorted(set(data.captions))
    item = data[0]
    torch.testing.assert_close(item["cond"], torch.tensor([float(len(data.captions[0])),
                                                           float(data.captions[0].count(" "))]))
