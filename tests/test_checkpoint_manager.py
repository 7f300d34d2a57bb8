"""CheckpointManager: the layout of a run's checkpoints, the `latest` pointer, validated
reads, and every file of a run damaged or replaced the ways a careless or hostile user would.

Each test runs under a `signal.alarm` time limit: a read that blocks (a FIFO in place of a
weights file) fails the test instead of hanging the suite.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import make_trainer  # noqa: E402

from diffusion import checkpoint as ckpt  # noqa: E402
from diffusion.metrics import MetricsLog  # noqa: E402
from unets.guards import BadFileError  # noqa: E402

LIMIT_S = 60


@pytest.fixture(autouse=True)
def time_limit():
    def expire(signum, frame):
        raise TimeoutError(f"test ran past {LIMIT_S} s: something blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run with checkpoints 1 (step 3) and 2 (step 6), `latest` naming checkpoint-2."""
    folder = tmp_path_factory.mktemp("run")
    trainer = make_trainer(folder, train_num_steps=6, save_and_sample_every=3, num_sample_rows=1)
    trainer.train()
    return folder


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


def step_of(folder: Path) -> int:
    return ckpt.CheckpointManager(folder.parent).read_state(folder)["step"]


# ---------------------------------------------------------------------------------------
# layout and the latest pointer


def test_layout_latest_and_find(run):
    manager = ckpt.CheckpointManager(run)
    assert [p.name for p in manager.complete()] == ["checkpoint-1", "checkpoint-2"]
    assert manager.latest() == run / "checkpoint-2"
    assert manager.find(-1) == manager.find("latest") == run / "checkpoint-2"
    assert manager.find(1) == run / "checkpoint-1"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        manager.find(9)
    with pytest.raises(ValueError, match="milestone"):
        manager.folder("../x")


@pytest.mark.parametrize(
    "pointer",
    [
        b"../other/checkpoint-1\n",  # another run
        b"/etc/checkpoint-1\n",  # an absolute path
        b"checkpoint-7\n",  # a folder that is not there
        b"\xff\xfe not utf-8",  # invalid UTF-8
        b"notes.txt\n",  # not a checkpoint name
        b"x" * 10_000,  # far too long for a pointer
    ],
)
def test_a_bad_latest_warns_and_falls_back_to_the_newest_complete(run, tmp_path, pointer, caplog):
    other = tmp_path / "other" / "checkpoint-1"
    shutil.copytree(run / "checkpoint-1", other)
    (run / "latest").write_bytes(pointer)
    # make checkpoint-1 the newest by time, so the fallback is visible
    os.utime(run / "checkpoint-1" / "state.pt", (2e9, 2e9))
    assert ckpt.CheckpointManager(run).latest() == run / "checkpoint-1"
    assert "latest" in caplog.text


def test_latest_as_a_fifo_or_folder_does_not_block(run):
    (run / "latest").unlink()
    os.mkfifo(run / "latest")
    assert ckpt.CheckpointManager(run).latest() is not None
    (run / "latest").unlink()
    (run / "latest").mkdir()
    assert ckpt.CheckpointManager(run).latest() is not None


def test_a_checkpoint_symlinked_out_of_the_run_is_not_followed(run, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(run / "checkpoint-2", outside)
    shutil.rmtree(run / "checkpoint-2")
    (run / "checkpoint-2").symlink_to(outside)
    manager = ckpt.CheckpointManager(run)
    assert manager.latest() == run / "checkpoint-1"


def test_fifo_in_place_of_ema_weights_neither_hangs_resume_nor_loading(run):
    weights = run / "checkpoint-2" / "ema.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(BadFileError, match="FIFO"):
        ckpt.load_tensors(weights)
    # resume skips the incomplete checkpoint and continues from the complete one
    trainer = make_trainer(run, train_num_steps=6, save_and_sample_every=3, num_sample_rows=1, resume=True)
    assert trainer.step == 3
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        trainer.load(2)


def test_resume_with_only_incomplete_checkpoints_is_an_error(run):
    for folder in run.glob("checkpoint-*"):
        (folder / "state.pt").unlink()
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ckpt.IncompleteRunError, match="none is complete"):
        make_trainer(run, resume=True)
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing truncated


def test_resume_of_an_empty_folder_starts_fresh(tmp_path):
    trainer = make_trainer(tmp_path / "new", resume=True)
    assert trainer.step == 0


# ---------------------------------------------------------------------------------------
# malformed state files: one named ValueError each


@pytest.mark.parametrize(
    ("state", "field"),
    [
        ({"version": 2}, "step"),
        ([1, 2, 3], "list"),
        ({"version": 99}, "version"),
        ("text", "str"),
        (None, "NoneType"),
    ],
)
def test_malformed_state_files_name_the_file_and_field(run, state, field):
    path = run / "checkpoint-2" / "state.pt"
    torch.save(state, path)
    with pytest.raises(ckpt.CorruptCheckpointError, match=field) as caught:
        ckpt.CheckpointManager(run).read_state(run / "checkpoint-2")
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("step", -5), ("step", "3"), ("step", True), ("seed", 1.5), ("optimizer", [1]), ("rng", {"torch": 1}),
     ("scheduler", {"base_lrs": "fast"}), ("scheduler", {"base_lrs": [1e-3], "horizon": -2}),
     ("data", {"length": "many"}), ("scaler", None)],
)
def test_wrong_field_types_are_named(run, field, value):
    path = run / "checkpoint-2" / "state.pt"
    state = torch.load(path, weights_only=True)
    state[field] = value
    torch.save(state, path)
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"field '{field}'"):
        make_trainer(run, resume=True)


def test_weights_of_another_model_are_a_named_value_error(run):
    path = run / "checkpoint-2" / "model.safetensors"
    ckpt.save_tensors({"something.else": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="checkpoint-2 does not fit this model"):
        make_trainer(run, resume=True)


# Every file a run holds, damaged at random: loading raises a ValueError (or falls back to
# the other checkpoint), never hangs and never another exception type.
RUN_FILES = ["checkpoint-2/state.pt", "checkpoint-2/model.safetensors", "checkpoint-2/ema.safetensors",
             "latest", "metrics.jsonl"]


def _damage(data: bytes, how: str, position: float, noise: bytes) -> bytes:
    cut = int(position * len(data))
    if how == "truncate":
        return data[:cut]
    if how == "random":
        return noise
    if how == "flip":
        return data[:cut] + noise[:8] + data[cut + 8:]
    return pickle.dumps({"version": 2, "step": noise[:4].decode("latin-1"), "rng": list(noise)})  # wrong types


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(RUN_FILES),
    how=st.sampled_from(["truncate", "random", "flip", "types"]),
    position=st.floats(0, 1),
    noise=st.binary(min_size=0, max_size=64),
)
def test_random_corruption_of_any_run_file_is_named_or_skipped(finished_run, tmp_path_factory, name, how,
                                                                position, noise):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(finished_run, run)
    path = run / name
    path.write_bytes(_damage(path.read_bytes(), how, position, noise))
    manager = ckpt.CheckpointManager(run)
    try:
        folder = manager.latest()
        assert folder is not None  # checkpoint-1 is intact in every case
        manager.read_state(folder)
        manager.read_weights(folder, "model")
        manager.read_weights(folder, "ema")
        MetricsLog(run).truncate(6)
    except ValueError as err:
        assert "checkpoint-2" in str(err) or name in str(err)


# ---------------------------------------------------------------------------------------
# writing: symlinks in the way, full and read-only disks


@pytest.mark.parametrize("kind", ["dangling", "looping", "valid"])
def test_a_symlink_in_place_of_a_checkpoint_is_replaced_not_followed(run, tmp_path, kind, caplog):
    link = run / "checkpoint-final"
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    if kind == "dangling":
        link.symlink_to(tmp_path / "missing")
    elif kind == "looping":
        link.symlink_to(link)
    else:
        link.symlink_to(outside)
    trainer = make_trainer(run, train_num_steps=6, save_and_sample_every=3, num_sample_rows=1, resume=True)
    trainer.save("final")
    assert link.is_dir() and not link.is_symlink()
    assert ckpt.CheckpointManager(run).latest() == link
    assert (outside / "keep.txt").read_text() == "mine"
    assert "symlink" in caplog.text


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failing_disk_names_the_file_and_keeps_the_last_checkpoint(run, monkeypatch, code):
    trainer = make_trainer(run, train_num_steps=6, save_and_sample_every=3, num_sample_rows=1, resume=True)
    before = (run / "checkpoint-2" / "model.safetensors").read_bytes()
    real = ckpt.save_state

    def failing(state, path):
        raise ckpt.CheckpointWriteError.from_os_error(OSError(code, os.strerror(code), str(path)), f"cannot write {path}")

    monkeypatch.setattr(ckpt, "save_state", failing)
    with pytest.raises(ckpt.CheckpointWriteError) as caught:
        trainer.save("final")
    monkeypatch.setattr(ckpt, "save_state", real)
    message = str(caught.value)
    assert caught.value.errno == code and "state.pt" in message and "checkpoint-2 is intact" in message
    assert (run / "checkpoint-2" / "model.safetensors").read_bytes() == before
    assert not (run / "checkpoint-final").exists()
    assert not any(p.name.startswith(".checkpoint") for p in run.iterdir())


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
