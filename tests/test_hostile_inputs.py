"""Hostile and malformed inputs: checkpoints that would run code, broken and bomb-like video
files, image modes Pillow converts wrongly by default, and prompts of any Unicode."""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import random
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import TinyDenoiser, make_trainer  # noqa: E402

from diffusion import checkpoint as ckpt  # noqa: E402
from diffusion import media  # noqa: E402
from diffusion.data import VideoFolder  # noqa: E402
from diffusion.gaussian import GaussianDiffusion  # noqa: E402

Image = pytest.importorskip("PIL.Image")


# ---------------------------------------------------------------------------------------
# checkpoints


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"step": 3, "payload": RunsCode(marker)}, protocol=2))
    zipped = tmp_path / "zipped.pt"
    torch.save({"step": 3, "optimizer": {"payload": RunsCode(marker)}}, zipped)
    for path in (raw, zipped):
        with pytest.raises(ckpt.UnsafeCheckpointError, match=r"refusing to load .* could run code") as caught:
            ckpt.load_state(path)
        assert str(path) in str(caught.value)
    assert not marker.exists()
    # the same pickle, loaded without the guard, would have run: the test is meaningful
    pickle.loads(raw.read_bytes())
    assert marker.exists()


def test_trainer_refuses_a_checkpoint_carrying_code(tmp_path):
    trainer = make_trainer(tmp_path, train_num_steps=3, save_and_sample_every=3, num_sample_rows=1)
    trainer.train()
    marker = tmp_path / "pwned"
    state = tmp_path / "checkpoint-1" / "state.pt"
    torch.save({"version": 2, "step": 3, "rng": RunsCode(marker)}, state)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="state.pt"):
        make_trainer(tmp_path, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["pickle", "truncated", "empty", "garbage"])
def test_damaged_weight_files_are_clear_errors(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    ckpt.save_tensors({"w": torch.ones(64, 64)}, path)
    data = path.read_bytes()
    if damage == "pickle":
        buffer = io.BytesIO()
        torch.save({"w": torch.ones(2)}, buffer)
        path.write_bytes(buffer.getvalue())
        expected = "looks like a pickle"
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
        expected = "not a readable safetensors file"
    elif damage == "empty":
        path.write_bytes(b"")
        expected = "truncated or empty"
    else:
        path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
        expected = "not a readable safetensors file"
    with pytest.raises(ckpt.CorruptCheckpointError, match=expected):
        ckpt.load_tensors(path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_damaged_state_files_are_clear_errors(tmp_path, damage):
    path = tmp_path / "state.pt"
    ckpt.save_state({"step": 1, "t": torch.zeros(1000)}, path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello, not a checkpoint\n"}[damage])
    with pytest.raises(ckpt.CorruptCheckpointError, match="state.pt"):
        ckpt.load_state(path)


# ---------------------------------------------------------------------------------------
# video files


def level_frames(value: int, frames: int = 3, size: int = 16) -> torch.Tensor:
    return torch.full((3, frames, size, size), value / 255.0)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG header promising `width x height` grey pixels, with a few bytes
    of data: decoding it would allocate the full frame."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def bomb_gif(width: int = 60000, height: int = 60000) -> bytes:
    """A GIF whose screen and only image claim `width x height`, with one pixel of data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + image + b"\x3b"


def write_frames(folder: Path, images: list) -> None:
    folder.mkdir()
    for index, image in enumerate(images):
        image.save(folder / f"{index}.{'jpg' if image.mode == 'CMYK' else 'png'}")


@functools.lru_cache(maxsize=1)
def slow_gif_bytes() -> bytes:
    # Under the pixel limit, but ~36M pixels: decoding takes far longer than the 0.3 s limit.
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000), 9).save(buffer, format="GIF")
    return buffer.getvalue()


GOOD_LEVELS = {  # source -> expected mean level after decoding, in [0, 1]
    "good0.gif": 0.25,
    "good1.gif": 0.75,
    "cmyk": 1.0,  # CMYK (0, 0, 0, 0) is white
    "palette": 0.5,
    "sixteen_bit": 0.5,  # 16-bit 32896 of 65535; Pillow's own convert would give 1.0
    "alpha": 0.0,  # white, fully transparent: composited over black
    "grey": 200 / 255,
    "mixed_sizes": 0.5,
}
SKIPPED_AT_PROBE = ["bomb.gif", "bomb_frames", "empty_frames", "not_a_gif.gif", "random.mp4", "slow.gif", "zero.gif"]
SKIPPED_LATER = ["truncated.gif", "truncated_frames"]


@pytest.fixture
def hostile_folder(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "videos"
    root.mkdir()
    media.write_gif(level_frames(64), root / "good0.gif")
    media.write_gif(level_frames(191), root / "good1.gif")
    write_frames(root / "cmyk", [Image.new("CMYK", (16, 16), (0, 0, 0, 0))] * 2)
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 128, 128, 128] + [0] * 762)
    write_frames(root / "palette", [palette] * 2)
    sixteen = Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16))
    write_frames(root / "sixteen_bit", [sixteen] * 2)
    write_frames(root / "alpha", [Image.new("RGBA", (16, 16), (255, 255, 255, 0))] * 2)
    write_frames(root / "grey", [Image.new("L", (16, 16), 200)] * 2)
    write_frames(root / "mixed_sizes", [Image.new("RGB", (16, 16), (128,) * 3), Image.new("RGB", (40, 24), (128,) * 3)])

    (root / "zero.gif").write_bytes(b"")
    (root / "bomb.gif").write_bytes(bomb_gif())
    (root / "bomb_frames").mkdir()
    for index in range(2):
        # 9000 x 9000 = 81M pixels: under Pillow's own limits, over this library's
        (root / "bomb_frames" / f"{index}.png").write_bytes(bomb_png(9000, 9000))
    (root / "empty_frames").mkdir()
    (root / "empty_frames" / "0.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    (root / "not_a_gif.gif").write_bytes(buffer.getvalue())
    (root / "random.mp4").write_bytes(random.Random(1).randbytes(5000))
    (root / "slow.gif").write_bytes(slow_gif_bytes())
    media.write_gif(torch.rand(3, 12, 24, 24, generator=torch.Generator().manual_seed(0)), root / "truncated.gif")
    data = (root / "truncated.gif").read_bytes()
    (root / "truncated.gif").write_bytes(data[: int(len(data) * 0.6)])
    write_frames(root / "truncated_frames", [Image.new("RGB", (16, 16), (9, 9, 9))] * 3)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy.save(root / "truncated_frames" / "1.png")
    data = (root / "truncated_frames" / "1.png").read_bytes()
    (root / "truncated_frames" / "1.png").write_bytes(data[: len(data) // 2])

    # not videos at all: ignored without a word
    (root / "README.md").write_text("# my data\n")
    (root / "good0.txt").write_text("a caption")
    (root / "data.bin").write_bytes(b"\x00" * 100)
    Image.new("RGB", (8, 8)).save(root / "stray.png")
    return root


def warnings_naming(caplog, name):
    return [r for r in caplog.records if r.levelno == logging.WARNING and f"{name} (" in r.getMessage()]


def test_hostile_folder_skips_each_bad_file_once_and_trains_on_the_rest(hostile_folder, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="diffusion.data")
    # How long the real 36M-pixel GIF takes to decode depends on the machine (on an idle one
    # it can beat 0.3 s), so its probe is made to stall well past the limit, as a decoder
    # stuck in a hostile file would; test_an_abandoned_decode... decodes the real file.
    real_probe = media.probe_video

    def stalling_probe(path):
        if Path(path).name == "slow.gif":
            time.sleep(3.0)
        return real_probe(path)

    monkeypatch.setattr(media, "probe_video", stalling_probe)
    started = time.monotonic()
    data = VideoFolder(hostile_folder, image_size=8, num_frames=2, decode_timeout=0.3, frame_mode="pad")
    probe_seconds = time.monotonic() - started
    assert sorted(p.name for p, _ in data.skipped) == SKIPPED_AT_PROBE
    reasons = dict((p.name, reason) for p, reason in data.skipped)
    assert "decompression bomb" in reasons["bomb_frames"] or "FrameTooLarge" in reasons["bomb_frames"]
    assert "TimeoutError" in reasons["slow.gif"]
    assert probe_seconds < 30

    levels = {}
    for _ in range(2):
        for index in range(len(data)):
            video = data[index]["video"]
            assert video.shape == (3, 2, 8, 8) and torch.isfinite(video).all()
            assert 0.0 <= float(video.min()) and float(video.max()) <= 1.0
    for source in data.sources:
        if source.path.name in GOOD_LEVELS:
            levels[source.path.name] = float(data._decode(source).mean())
    for name, expected in GOOD_LEVELS.items():
        assert levels[name] == pytest.approx(expected, abs=0.02), name
    assert sorted(p.name for p, _ in data.skipped) == sorted(SKIPPED_AT_PROBE + SKIPPED_LATER)
    for name in SKIPPED_AT_PROBE + SKIPPED_LATER:
        assert len(warnings_naming(caplog, name)) == 1, name
    for name in ("README.md", "data.bin", "stray.png"):
        assert not any(name in r.getMessage() for r in caplog.records)

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(TinyDenoiser(channels=3, timesteps=10), image_size=8, num_frames=2, channels=3, timesteps=10)
    trainer = make_trainer(
        tmp_path / "run", data, diffusion=diffusion, train_num_steps=2, save_and_sample_every=2,
        num_sample_rows=1, image_phase_steps=0,
    )
    trainer.train()
    assert trainer.step == 2 and (tmp_path / "run" / "checkpoint-1" / "state.pt").is_file()


def test_an_abandoned_decode_stops_and_the_call_returns_on_time(tmp_path, monkeypatch):
    (tmp_path / "slow.gif").write_bytes(slow_gif_bytes())
    # The real file is decoded, but each of its frames is held back for 1 s so the decode
    # outlasts the 0.2 s limit on any machine, however fast.
    real_iter_frames = media.iter_frames

    def slow_iter_frames(path, *args, **kwargs):
        for frame in real_iter_frames(path, *args, **kwargs):
            if Path(path).name == "slow.gif":
                time.sleep(1.0)
            yield frame

    monkeypatch.setattr(media, "iter_frames", slow_iter_frames)
    media.write_gif(level_frames(30), tmp_path / "fine.gif")
    data = VideoFolder(tmp_path, image_size=8, num_frames=2, decode_timeout=5.0)  # the probe passes
    data.decode_timeout = 0.2
    started = time.monotonic()
    item = data[[source.path.name for source in data.sources].index("slow.gif")]
    assert time.monotonic() - started < 5
    assert item["video"].mean() == pytest.approx(30 / 255, abs=0.01)  # fine.gif in its place
    assert [p.name for p, _ in data.skipped] == ["slow.gif"]
    # the abandoned worker thread notices the cancellation after its frame and ends
    deadline = time.monotonic() + 60
    while any(t.name == "video-decode" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the abandoned decode kept running"
        time.sleep(0.05)


@functools.lru_cache(maxsize=None)
def sample_file(kind: str) -> bytes:
    buffer = io.BytesIO()
    video = torch.rand(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    folder = Path(f"/tmp/hostile-sample-{os.getpid()}-{kind}")
    folder.mkdir(exist_ok=True)
    path = folder / f"sample.{kind}"
    media.write_video(video, path)
    buffer.write(path.read_bytes())
    path.unlink()
    folder.rmdir()
    return buffer.getvalue()


@given(
    kind=st.sampled_from(["gif", "mp4", "png"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=6),
)
def test_fuzzed_files_are_read_or_skipped_never_crash(tmp_path_factory, kind, cut, flips):
    if kind == "mp4":
        pytest.importorskip("av")
    folder = tmp_path_factory.mktemp("fuzz")
    media.write_gif(level_frames(100), folder / "anchor.gif")
    if kind == "png":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(3).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        data = bytearray(buffer.getvalue())
    else:
        data = bytearray(sample_file(kind))
    for where, value in flips:
        data[int(where * len(data))] = value
    data = bytes(data[: int(cut * len(data))]) if cut < 1.0 else bytes(data)
    if kind == "png":
        (folder / "frames").mkdir()
        (folder / "frames" / "0.png").write_bytes(data)
    else:
        (folder / f"victim.{kind}").write_bytes(data)
    videos = VideoFolder(folder, image_size=8, num_frames=2, decode_timeout=5.0)
    for _ in range(2):
        for index in range(len(videos)):
            video = videos[index]["video"]
            assert video.shape == (3, 2, 8, 8) and torch.isfinite(video).all()
    assert len(videos.skipped) <= 1 and all(p.name != "anchor.gif" for p, _ in videos.skipped)


# ---------------------------------------------------------------------------------------
# prompts

transformers = pytest.importorskip("transformers")

HOSTILE_TEXTS = [
    "",
    " ",
    "\x00\x01\x02 control",
    "\ud800 a lone surrogate",
    "\udfff",
    "\u202e right-to-left override \u202c",
    "zero\u200bwidth\u200djoiner",
    "\ufeffbyte order mark",
    "line\u2028separator\u2029",
    "e\u0301" * 300,  # combining accents
    "👩‍👩‍👧‍👦 family emoji 🏳️‍🌈",
    "漢字かなカナ 한국어 العربية עברית",
    "x" * 5000,  # one long word
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from test_text import _tiny_bert

    from diffusion.text import HFTextEncoder

    return HFTextEncoder(_tiny_bert(tmp_path_factory.mktemp("bert"), max_length=16))


def check_embedding(out, count, max_length, dim):
    assert out.tokens.shape[0] == count and out.tokens.shape[2] == dim
    assert 1 <= out.tokens.shape[1] <= max_length
    assert out.mask[:, 0].all()  # at least the [CLS] token
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


@given(texts=st.lists(st.one_of(st.text(max_size=80), st.sampled_from(HOSTILE_TEXTS)), min_size=1, max_size=5))
def test_any_unicode_encodes(tiny_bert, texts):
    check_embedding(tiny_bert.encode(texts), len(texts), tiny_bert.max_length, tiny_bert.dim)


def test_long_captions_are_truncated_with_one_warning(tiny_bert, tmp_path, caplog):
    from diffusion.text import CachedTextEncoder, HFTextEncoder

    encoder = HFTextEncoder(tiny_bert.path, max_length=16)
    caplog.set_level(logging.WARNING, logger="diffusion.text")
    long = " ".join(["the red cat runs over the blue dog"] * 200)
    for _ in range(3):
        out = encoder.encode([long, "a cat"])
        assert out.tokens.shape[1] == 16 and out.mask[0].all()
    truncations = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(truncations) == 1 and "16 tokens" in truncations[0].getMessage()
    cached = CachedTextEncoder(encoder, cache_dir=tmp_path / "cache")
    out = cached.encode(HOSTILE_TEXTS + [long])
    check_embedding(out, len(HOSTILE_TEXTS) + 1, 16, encoder.dim)
    again = CachedTextEncoder(encoder, cache_dir=tmp_path / "cache").encode(HOSTILE_TEXTS + [long])
    assert torch.equal(again.tokens, out.tokens)


def test_default_encoder_takes_hostile_and_long_prompts():
    from diffusion.text import default_text_encoder

    encoder = default_text_encoder()
    long = " ".join(["a red ball bounces across a quiet street at night"] * 120)
    texts = HOSTILE_TEXTS + [long]
    out = encoder.encode(texts)
    check_embedding(out, len(texts), encoder.max_length, encoder.dim)
    assert out.tokens.shape[1] == encoder.max_length  # the long caption fills the limit
    assert encoder._warned_truncation


# ---------------------------------------------------------------------------------------
# the command line: every user or environment error is one line, exit code 2

import errno  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from diffusion import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def spacetime(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The command line in a fresh process, under a timeout (a hang fails the test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "diffusion", "--threads", "1", "-q", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("spacetime: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hostile-cli") / "run"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--threads", "1", "-q", "train", "--preset", "debug", "--out", str(run),
                         "--set", "trainer.train_num_steps=2"]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_cli_user_errors_in_a_subprocess(cli_run, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("not a folder\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("trainer: " + "[" * 2000 + "]" * 2000 + "\n")
    broken = tmp_path / "broken"
    shutil.copytree(cli_run, broken)
    (broken / "config.json").write_bytes(b'{"unet": "\xff"}')
    bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + ["*a"] * 20000) + "]"
    cases = [
        (("train", "--preset", "debug", "--out", str(afile / "run")), [str(afile / "run")]),
        (("sample", "--checkpoint", str(cli_run), "--out", str(afile / "x"), "--prompt", "a", "--steps", "1"),
         [str(afile / "x")]),
        (("data", "moving-digits", "--out", str(afile / "d"), "--num-videos", "1", "--image-size", "8",
          "--num-frames", "2", "--digit-size", "4"), [str(afile)]),
        (("train", "--config", str(tmp_path / "missing.yaml")), ["missing.yaml", "does not exist"]),
        (("train", "--config", str(deep)), ["deep.yaml", "nests deeper than 64 levels"]),
        (("sample", "--checkpoint", str(cli_run), "--seed", str(2**70)), ["--seed", str(2**70)]),
        (("sample", "--checkpoint", str(broken)), ["config.json", "not UTF-8"]),
        (("train", "--preset", "debug", "--set", f"trainer.sample_kwargs={{a: {bomb}}}", "--print-config"),
         ["trainer.sample_kwargs", "values (YAML aliases expanded)"]),
        (("train", "--preset", "debug", "--set", "trainer.train_batch_size=1000000000", "--print-config"),
         ["trainer.train_batch_size=1000000000", "GiB"]),
    ]
    for argv, fragments in cases:
        assert_one_line(spacetime(*argv), *fragments)
    with open(afile) as handle:  # nothing was written over the file
        assert handle.read() == "not a folder\n"


def test_eval_out_under_a_file(tmp_path):
    data = tmp_path / "data"
    assert cli.main(["-q", "data", "moving-digits", "--out", str(data), "--num-videos", "2", "--image-size", "16",
                     "--num-frames", "4", "--digit-size", "8", "--speed", "1"]) == 0
    (tmp_path / "f").write_text("x")
    assert_one_line(spacetime("eval", str(data), "--out", str(tmp_path / "f" / "eval.json")), "eval.json")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("spacetime: error: ") and err.count("\n") == 1, err
    return err


def test_environment_errors_print_one_line_and_bugs_keep_their_traceback(cli_run, tmp_path, monkeypatch, capsys):
    from diffusion.trainer import NonFiniteLossError, Trainer

    def diverge(self, *args, **kwargs):
        raise NonFiniteLossError("loss is nan at step 0 (micro-batch 0): training stopped without saving this state")

    monkeypatch.setattr(Trainer, "train", diverge)
    argv = ["-q", "train", "--preset", "debug", "--out", str(tmp_path / "nan")]
    assert cli.main(argv) == 2
    assert "loss is nan at step 0" in one_line(capsys)
    monkeypatch.undo()

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "atomic_write_text", full_disk)
    assert cli.main(["-q", "train", "--preset", "debug", "--out", str(tmp_path / "full")]) == 2
    err = one_line(capsys)
    assert "No space left on device" in err and "config.json" in err
    monkeypatch.undo()

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_eval", bug)
    with pytest.raises(KeyError):
        cli.main(["-q", "eval", str(tmp_path)])
