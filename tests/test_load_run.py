"""`diffusion.load_run` on a run made by `spacetime train --preset debug`."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from diffusion import load_run
from diffusion.cli import main
from diffusion.config import ConfigError
from diffusion.run import open_run
from unets.guards import BadFileError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("load_run") / "run"
    try:
        assert main(["--threads", "1", "-q", "train", "--preset", "debug", "--out", str(folder),
                     "--set", "trainer.train_num_steps=2"]) == 0
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def alarm():
    """Fail instead of hanging: whatever blocks is interrupted after 60 s."""

    def timeout(signum, frame):
        raise TimeoutError("the call blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_load_run_gives_a_ready_process_that_samples_from_captions(run):
    diffusion = load_run(run)
    assert not diffusion.training
    assert (diffusion.image_size, diffusion.num_frames, diffusion.channels) == (8, 4, 1)
    assert diffusion.num_timesteps == 20
    generator = torch.Generator().manual_seed(0)
    videos = diffusion.sample(cond=["the digit 3 moving up", "the digit 5 moving left"], cond_scale=2.0,
                              sampler="ddim", steps=3, generator=generator)
    assert videos.shape == (2, 1, 4, 8, 8)
    assert torch.isfinite(videos).all() and 0.0 <= float(videos.min()) and float(videos.max()) <= 1.0


def test_weights_and_checkpoint_folders(run):
    from diffusion import checkpoint as ckpt

    ema = load_run(run)  # the latest checkpoint, EMA weights
    raw = load_run(run, weights="model")
    final = run / "checkpoint-final"
    for name, model in (("ema", ema), ("model", raw)):
        saved = ckpt.load_tensors(final / f"{name}.safetensors")
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters()))
    first = open_run(run / "checkpoint-1")
    assert first.checkpoint == run / "checkpoint-1" and first.run_dir == run
    with pytest.raises(ValueError, match="weights must be one of 'ema', 'model', got 'best'"):
        load_run(run, weights="best")


def test_a_config_that_no_longer_matches_the_weights_names_both_files(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["dim"] = 16
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load_run(copy)
    message = str(info.value)
    assert "config.json no longer matches the weights" in message and "ema.safetensors" in message


def test_hostile_run_folders_are_refused_without_blocking(run, tmp_path, alarm):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoint-final" / "ema.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    # a FIFO is not a regular file, so the checkpoint is not complete: refused, never read
    with pytest.raises(ValueError, match="checkpoint-final is not a complete checkpoint"):
        load_run(copy / "checkpoint-final")
    (copy / "config.json").write_bytes(b'{"unet": "\xff"}')
    with pytest.raises(BadFileError, match="not UTF-8"):
        load_run(copy)
    (copy / "config.json").write_text('{"trainer": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(BadFileError, match="nests deeper"):
        load_run(copy)
    config = json.loads((run / "config.json").read_text())
    config["model"]["dim"] = 10**12
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model.dim"):
        load_run(copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a training run folder"):
        load_run(tmp_path / "empty")


def test_latest_is_confined_to_the_run_folder(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    other = tmp_path / "other"
    shutil.copytree(run / "checkpoint-1", other / "checkpoint-9")
    (copy / "latest").write_text("../other/checkpoint-9\n")
    assert open_run(copy).checkpoint.parent == copy
    (copy / "latest").write_bytes(b"\xff\xfe")
    assert open_run(copy).checkpoint.parent == copy


@pytest.mark.parametrize("flag", ["--sr", "--interp"])
def test_eval_of_a_missing_run_is_one_line(tmp_path, capsys, flag):
    from diffusion.cli import main

    assert main(["eval", flag, str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run folder does not exist" in err and "no-such-run" in err
