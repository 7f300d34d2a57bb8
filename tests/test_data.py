"""VideoFolder, its helpers, and diffusion.media (reading / writing videos, grids, plots)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from diffusion import media
from diffusion.data import (
    CaptionEmbeddings,
    VideoFolder,
    collate_videos,
    find_videos,
    select_frames,
)

# Each frame is one flat grey level, distinct per frame: which source frames an item holds
# can be read back even through lossy codecs.
LEVELS = np.linspace(0.1, 0.9, 10)


def level_video(num_frames: int = 10, height: int = 24, width: int = 32, channels: int = 3) -> torch.Tensor:
    levels = torch.tensor(LEVELS[:num_frames], dtype=torch.float32)
    return levels.view(1, -1, 1, 1).expand(channels, num_frames, height, width).clone()


def frame_levels(video: torch.Tensor) -> np.ndarray:
    return video.mean(dim=(0, 2, 3)).numpy()


def write_frame_folder(folder: Path, video: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    frames = media.to_uint8_frames(video)
    # names chosen so plain string order would be wrong (frame10 before frame2)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame{index}.png")
    return folder


class FakeEncoder:
    """Deterministic stand-in for diffusion.text.TextEncoder that counts what it encodes."""

    dim = 6

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, texts):
        self.seen.extend(texts)
        length = max(1, max(len(t.split()) for t in texts))
        tokens = torch.zeros(len(texts), length, self.dim)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for row, text in enumerate(texts):
            words = text.split() or [""]
            for col, word in enumerate(words):
                tokens[row, col] = float(len(word) + col)
                mask[row, col] = True
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return type("Embedding", (), {"tokens": tokens, "mask": mask, "pooled": pooled})()


# ---------------------------------------------------------------------------------------
# select_frames


@given(
    total=st.integers(1, 40),
    num_frames=st.integers(1, 16),
    mode=st.sampled_from(["stride", "crop", "pad"]),
    window=st.sampled_from(["start", "center", "random"]),
)
def test_select_frames_properties(total, num_frames, mode, window):
    indices = select_frames(total, num_frames, mode, window=window, generator=torch.Generator().manual_seed(0))
    assert len(indices) == num_frames
    assert all(0 <= i < total for i in indices)
    assert indices == sorted(indices)
    if total >= num_frames:
        if mode == "stride":
            assert indices[0] == 0 and (num_frames == 1 or indices[-1] == total - 1)
            assert len(set(indices)) == num_frames
        else:
            assert indices == list(range(indices[0], indices[0] + num_frames))
            if mode == "pad" or window == "start":
                assert indices[0] == 0
    else:
        assert set(indices) == set(range(total))
        if mode != "stride":
            assert indices[total:] == [total - 1] * (num_frames - total)


def test_select_frames_examples_and_errors():
    assert select_frames(10, 4, "stride") == [0, 3, 6, 9]
    assert select_frames(10, 4, "crop", window="center") == [3, 4, 5, 6]
    assert select_frames(3, 5, "pad") == [0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="frame_mode"):
        select_frames(10, 4, "loop")
    with pytest.raises(ValueError, match="window"):
        select_frames(10, 4, "crop", window="end")
    with pytest.raises(ValueError, match="at least one frame"):
        select_frames(0, 4)


# ---------------------------------------------------------------------------------------
# media


def test_gif_round_trip_grey_is_exact_and_keeps_static_frames(tmp_path):
    video = torch.rand(1, 6, 12, 20)
    video[:, 3] = video[:, 2]  # Pillow merges identical consecutive frames; we must not lose them
    media.write_gif(video, tmp_path / "a.gif")
    back = media.read_gif(tmp_path / "a.gif", channels=1)
    assert back.shape == video.shape
    assert (back - video).abs().max() <= 0.5 / 255 + 1e-6
    static = torch.full((1, 5, 8, 8), 0.5)
    media.write_gif(static, tmp_path / "static.gif")
    assert media.read_gif(tmp_path / "static.gif").shape == (3, 5, 8, 8)


def test_rgb_gif_and_mp4_round_trip(tmp_path):
    pytest.importorskip("av")
    video = level_video(6, 16, 24)
    video[0] *= 0.5  # some colour
    for name in ("a.gif", "a.mp4", "a.webm"):
        media.write_video(video, tmp_path / name)
        back = media.read_video(tmp_path / name)
        assert back.shape == video.shape, name
        assert (back - video).abs().mean() < 0.03, name
    # odd sizes are padded to even for 4:2:0 codecs
    media.write_mp4(torch.rand(1, 2, 7, 9), tmp_path / "odd.mp4")
    assert media.read_video(tmp_path / "odd.mp4").shape == (3, 2, 8, 10)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_media_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="1 or 3 channels"):
        media.write_gif(torch.rand(2, 3, 8, 8), tmp_path / "a.gif")
    # a ValueError, or the jaxtyping check of the annotation when the test hook is on
    with pytest.raises((ValueError, TypeError)):
        media.write_gif(torch.rand(3, 8, 8), tmp_path / "a.gif")
    with pytest.raises(ValueError, match="extension"):
        media.write_video(torch.rand(3, 2, 8, 8), tmp_path / "a.avi")
    with pytest.raises(ValueError, match="fps"):
        media.write_gif(torch.rand(3, 2, 8, 8), tmp_path / "a.gif", fps=0)
    with pytest.raises(ValueError, match="history is empty"):
        media.plot_loss([], tmp_path / "loss.png")


def test_video_grid_layout():
    videos = torch.stack([torch.full((3, 2, 4, 5), float(i + 1)) for i in range(5)])
    grid = media.video_grid(videos, nrow=3, padding=1, pad_value=0.0)
    # 2 rows x 3 columns of (4 + 1) x (5 + 1) tiles, plus one leading pad row / column
    assert grid.shape == (3, 2, 1 + 2 * 5, 1 + 3 * 6)
    assert grid[0, 0, 1, 1] == 1 and grid[0, 0, 1, 7] == 2 and grid[0, 0, 6, 1] == 4
    assert grid[0, 0, 6, 13] == 0  # the missing sixth tile is blank
    assert grid[:, :, 0].abs().sum() == 0 and grid[:, :, :, 6].abs().sum() == 0


def test_write_sample_grid_and_plot_loss(tmp_path):
    path = media.write_sample_grid(torch.rand(4, 3, 3, 8, 8), tmp_path / "grid.gif", padding=2)
    assert media.read_gif(path).shape == (3, 3, 2 + 2 * 10, 2 + 2 * 10)
    png = media.plot_loss([(step, 1.0 / (step + 1)) for step in range(50)], tmp_path / "loss.png", smoothing=5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------
# VideoFolder: formats, frames, size, channels


@pytest.fixture
def mixed_folder(tmp_path):
    """A gif, an mp4, a webm and a frame folder (nested one level), 10 frames each."""
    av = pytest.importorskip("av")
    del av
    folder = tmp_path / "videos"
    folder.mkdir()
    media.write_gif(level_video(), folder / "a.gif")
    media.write_video(level_video(), folder / "b.mp4")
    media.write_video(level_video(), folder / "c.webm")
    write_frame_folder(folder / "nested" / "d", level_video())
    (folder / "a.txt").write_text("a gif\n")
    (folder / "nested" / "d.txt").write_text("  some   frames ")
    (folder / "notes.md").write_text("not a video")
    return folder


def test_finds_every_kind_of_video(mixed_folder):
    names = [p.name for p in find_videos(mixed_folder)]
    assert names == ["a.gif", "b.mp4", "c.webm", "d"]


@pytest.mark.parametrize("channels", [1, 3])
def test_loads_gif_mp4_webm_and_frame_folders(mixed_folder, channels):
    data = VideoFolder(mixed_folder, image_size=16, num_frames=4, channels=channels)
    assert len(data) == 4
    for index in range(len(data)):
        item = data[index]
        assert item["video"].shape == (channels, 4, 16, 16)
        assert item["video"].dtype == torch.float32
        assert 0 <= item["video"].min() and item["video"].max() <= 1
        # stride takes frames 0, 3, 6, 9 of the source
        np.testing.assert_allclose(frame_levels(item["video"]), LEVELS[[0, 3, 6, 9]], atol=0.03)
    assert [data[i]["caption"] for i in range(4)] == ["a gif", "", "", "some frames"]


@pytest.mark.parametrize(
    ("mode", "window", "expected"),
    [
        ("stride", "start", [0, 3, 6, 9]),
        ("crop", "start", [0, 1, 2, 3]),
        ("crop", "center", [3, 4, 5, 6]),
        ("pad", "start", [0, 1, 2, 3]),
    ],
)
def test_frame_modes(tmp_path, mode, window, expected):
    write_frame_folder(tmp_path / "v", level_video())
    data = VideoFolder(tmp_path, image_size=8, num_frames=4, frame_mode=mode, window=window)
    np.testing.assert_allclose(frame_levels(data[0]["video"]), LEVELS[expected], atol=0.01)


def test_short_videos_are_padded_and_random_windows_are_contiguous(tmp_path):
    media.write_gif(level_video(3), tmp_path / "short.gif")
    for mode in ("pad", "crop"):
        data = VideoFolder(tmp_path, image_size=8, num_frames=6, frame_mode=mode)
        np.testing.assert_allclose(frame_levels(data[0]["video"]), LEVELS[[0, 1, 2, 2, 2, 2]], atol=0.01)
    data = VideoFolder(tmp_path, image_size=8, num_frames=6, frame_mode="stride")
    np.testing.assert_allclose(frame_levels(data[0]["video"]), LEVELS[[0, 0, 1, 1, 2, 2]], atol=0.01)
    (tmp_path / "short.gif").unlink()
    media.write_gif(level_video(10), tmp_path / "long.gif")
    data = VideoFolder(tmp_path, image_size=8, num_frames=4, frame_mode="crop", window="random")
    torch.manual_seed(0)
    starts = set()
    for _ in range(12):
        levels = frame_levels(data[0]["video"])
        start = int(np.argmin(np.abs(LEVELS - levels[0])))
        np.testing.assert_allclose(levels, LEVELS[start : start + 4], atol=0.01)
        starts.add(start)
    assert len(starts) > 1


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 30 x 60 frames: black, white in the middle 36 columns, plus a red stripe at the left
    frame = np.zeros((30, 60, 3), dtype=np.uint8)
    frame[:, 12:48] = 255
    frame[:, :5, 0] = 255
    folder = tmp_path / "wide"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(frame).save(folder / f"{index:03d}.jpg", quality=98)
    rgb = VideoFolder(tmp_path, image_size=15, num_frames=3, channels=3)[0]["video"]
    assert rgb.shape == (3, 3, 15, 15)
    # the centre crop keeps only the white middle; the red stripe at the edge is cut off
    assert rgb.mean() > 0.95 and rgb[1:].min() > 0.8
    grey = VideoFolder(tmp_path, image_size=15, num_frames=3, channels=1)[0]["video"]
    assert grey.shape == (1, 3, 15, 15)
    torch.testing.assert_close(grey, rgb.mean(0, keepdim=True), atol=0.03, rtol=0)


def test_one_channel_is_luma(tmp_path):
    red = torch.zeros(3, 2, 8, 8)
    red[0] = 1.0
    write_frame_folder(tmp_path / "red", red)
    grey = VideoFolder(tmp_path, image_size=8, num_frames=2, channels=1)[0]["video"]
    # ITU-R 601 weight of red
    torch.testing.assert_close(grey, torch.full((1, 2, 8, 8), 0.299), atol=0.005, rtol=0)


# ---------------------------------------------------------------------------------------
# captions and text embeddings


def test_caption_modes(tmp_path):
    media.write_gif(level_video(2), tmp_path / "with.gif")
    media.write_gif(level_video(2), tmp_path / "without.gif")
    (tmp_path / "with.txt").write_text("hello\n")
    auto = VideoFolder(tmp_path, image_size=8, num_frames=2)
    assert auto.captions == ["hello", ""]
    assert VideoFolder(tmp_path, image_size=8, num_frames=2, captions="none").captions == ["", ""]
    with pytest.raises(ValueError, match=r"without\.txt"):
        VideoFolder(tmp_path, image_size=8, num_frames=2, captions="required")
    (tmp_path / "without.txt").write_text("   ")  # empty counts as missing
    with pytest.raises(ValueError, match="captions='required'"):
        VideoFolder(tmp_path, image_size=8, num_frames=2, captions="required")
    (tmp_path / "without.txt").write_text("world")
    assert VideoFolder(tmp_path, image_size=8, num_frames=2, captions="required").captions == ["hello", "world"]


def test_text_encoder_encodes_each_caption_once(tmp_path):
    for index in range(5):
        media.write_gif(level_video(2), tmp_path / f"{index}.gif")
        (tmp_path / f"{index}.txt").write_text("a cat" if index % 2 else "a small dog")
    encoder = FakeEncoder()
    pooled = VideoFolder(tmp_path, image_size=8, num_frames=2, text_encoder=encoder)
    assert sorted(encoder.seen) == ["a cat", "a small dog"]
    items = [pooled[i] for i in range(5)]
    assert encoder.seen == ["a small dog", "a cat"]  # nothing encoded while loading
    assert items[0]["cond"].shape == (FakeEncoder.dim,)
    torch.testing.assert_close(items[0]["cond"], items[2]["cond"])
    assert not torch.equal(items[0]["cond"], items[1]["cond"])
    batch = collate_videos(items)
    assert batch["video"].shape == (5, 3, 2, 8, 8) and batch["cond"].shape == (5, FakeEncoder.dim)

    tokens = VideoFolder(tmp_path, image_size=8, num_frames=2, text_encoder=FakeEncoder(), text_embedding="tokens")
    short, long = tokens[1], tokens[0]
    assert short["cond"].shape == (2, FakeEncoder.dim) and long["cond"].shape == (3, FakeEncoder.dim)
    loader = torch.utils.data.DataLoader(tokens, batch_size=2, collate_fn=collate_videos)
    batch = next(iter(loader))
    assert batch["cond"].shape == (2, 3, FakeEncoder.dim)
    assert batch["cond_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["caption"] == ["a small dog", "a cat"]


def test_caption_embeddings_rejects_bad_encoder():
    with pytest.raises(TypeError, match="encode"):
        CaptionEmbeddings(object(), ["x"])
    with pytest.raises(ValueError, match="text_embedding"):
        CaptionEmbeddings(FakeEncoder(), ["x"], kind="both")


# ---------------------------------------------------------------------------------------
# errors and unreadable files


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no videos found"):
        VideoFolder(tmp_path, image_size=8, num_frames=2)
    (tmp_path / "readme.txt").write_text("no videos here")
    (tmp_path / "empty_subfolder").mkdir()
    with pytest.raises(ValueError, match="no videos found"):
        VideoFolder(tmp_path, image_size=8, num_frames=2)
    with pytest.raises(ValueError, match="does not exist"):
        VideoFolder(tmp_path / "nope", image_size=8, num_frames=2)


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [
        ("channels", 2, ValueError),
        ("frame_mode", "loop", ValueError),
        ("captions", "yes", ValueError),
        ("probe", "deep", ValueError),
        ("image_size", 0, ValueError),
        ("num_frames", 2.5, TypeError),
        ("decode_timeout", 0.0, ValueError),
    ],
)
def test_bad_arguments(tmp_path, argument, value, error):
    media.write_gif(level_video(2), tmp_path / "a.gif")
    arguments = {"image_size": 8, "num_frames": 2, argument: value}
    with pytest.raises(error, match=argument):
        VideoFolder(tmp_path, **arguments)


@pytest.fixture
def corrupt_folder(tmp_path):
    pytest.importorskip("av")
    for index in range(3):
        media.write_gif(level_video(), tmp_path / f"good{index}.gif")
    media.write_video(level_video(), tmp_path / "good.mp4")
    (tmp_path / "zero.gif").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video at all\n" * 20)
    (tmp_path / "text.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(200))  # an EBML magic, then junk
    mp4 = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    # A GIF cut in its last frames: the header and first frame are fine.
    big = torch.rand(3, 10, 24, 32)
    media.write_gif(big, tmp_path / "truncated.gif")
    gif = (tmp_path / "truncated.gif").read_bytes()
    (tmp_path / "truncated.gif").write_bytes(gif[: int(len(gif) * 0.7)])
    return tmp_path


BAD = ["text.mp4", "text.webm", "truncated.gif", "truncated.mp4", "zero.gif"]


def _warnings_about(caplog, name):
    return [r for r in caplog.records if r.levelno == logging.WARNING and f"{name} " in r.getMessage()]


def test_unreadable_files_are_skipped_with_one_warning_each(corrupt_folder, caplog):
    caplog.set_level(logging.WARNING, logger="diffusion.data")
    data = VideoFolder(corrupt_folder, image_size=8, num_frames=4)
    # the header probe catches all but the GIF truncated after its first frame
    assert len(data) == 5
    assert any("skipped 4 of 9 videos" in r.getMessage() for r in caplog.records)
    for _ in range(2):  # a second pass warns no more
        for index in range(len(data)):
            item = data[index]
            assert item["video"].shape == (3, 4, 8, 8)
    for name in BAD:
        assert len(_warnings_about(caplog, name)) == 1, name
    assert sorted(p.name for p, _ in data.skipped) == BAD
    assert any("skipped 5 of 9 videos" in r.getMessage() for r in caplog.records)


def test_full_probe_finds_every_unreadable_file_up_front(corrupt_folder, caplog):
    caplog.set_level(logging.WARNING, logger="diffusion.data")
    data = VideoFolder(corrupt_folder, image_size=8, num_frames=4, probe="full")
    assert len(data) == 4
    assert sorted(p.name for p, _ in data.skipped) == BAD
    assert any("skipped 5 of 9 videos" in r.getMessage() for r in caplog.records)


def test_nothing_readable_is_a_clear_error(tmp_path):
    (tmp_path / "zero.gif").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 videos"):
        VideoFolder(tmp_path, image_size=8, num_frames=2)


def test_a_hanging_decoder_is_abandoned(tmp_path, monkeypatch, caplog):
    for name in ("fine.gif", "slow.gif"):
        media.write_gif(level_video(4), tmp_path / name)
    real = media.iter_frames

    def hostile(path):
        if Path(path).name != "slow.gif":
            yield from real(path)
            return
        while True:  # an endless, slow stream of frames
            time.sleep(0.05)
            yield Image.new("RGB", (8, 8))

    monkeypatch.setattr(media, "iter_frames", hostile)
    caplog.set_level(logging.WARNING, logger="diffusion.data")
    data = VideoFolder(tmp_path, image_size=8, num_frames=2, decode_timeout=0.5, max_source_frames=10**9)
    started = time.monotonic()
    item = data[1]  # slow.gif: given up on, replaced by fine.gif
    assert time.monotonic() - started < 5
    np.testing.assert_allclose(frame_levels(item["video"]), LEVELS[[0, 3]], atol=0.01)
    assert [p.name for p, _ in data.skipped] == ["slow.gif"]
    assert "TimeoutError" in data.skipped[0][1]
    assert len(_warnings_about(caplog, "slow.gif")) == 1
