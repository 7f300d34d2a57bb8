"""Crash safety: SIGKILL at random moments (and inside checkpoint writes), a full disk and
an unwritable results folder.

The kill harness starts this file as a script (the training child), kills it with SIGKILL,
checks every checkpoint on disk is readable, resumes, and finally compares the weights with
an uninterrupted run: they must be equal bit for bit (CPU, one thread, fixed seed). Kills
"in a write" set `SPACETIME_FAULT_WRITE_DELAY` (diffusion.checkpoint), which makes every
atomic write pause after its temporary file is complete, and fire while a checkpoint's
staging folder or `latest`'s temporary file exists.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import Videos, make_diffusion, make_trainer  # noqa: E402

from diffusion import checkpoint as ckpt  # noqa: E402
from diffusion.trainer import LATEST  # noqa: E402

STEPS = 24
OPTIONS = dict(
    train_num_steps=STEPS,
    save_and_sample_every=3,
    num_sample_rows=1,
    image_phase_steps=2,
    image_ratio=0.34,
)


class SlowVideos(Videos):
    """A data set that takes a little time per item, so a step lasts long enough (~0.1 s)
    for random kill times to land inside training rather than after it."""

    def __getitem__(self, index):
        time.sleep(float(os.environ.get("CRASH_TEST_FETCH_DELAY", "0")))
        return super().__getitem__(index)


def build(results, **overrides):
    return make_trainer(results, SlowVideos(), diffusion=make_diffusion(), **{**OPTIONS, **overrides})


def child_main(results: str) -> None:
    torch.set_num_threads(1)
    trainer = build(results, resume=True)
    print(f"RESUMED {trainer.step}", flush=True)
    trainer.train()
    print(f"DONE {trainer.step}", flush=True)


# ---------------------------------------------------------------------------------------
# the harness


def start_child(results: Path, *, write_delay: float | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CRASH_TEST_FETCH_DELAY": "0.015"}
    env.pop(ckpt.FAULT_WRITE_DELAY, None)
    if write_delay is not None:
        env[ckpt.FAULT_WRITE_DELAY] = str(write_delay)
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(results)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def steps_logged(results: Path) -> int:
    """Steps completed according to metrics.jsonl (a line cut by the kill is ignored)."""
    path = results / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps) + 1 if steps else 0


def writing_checkpoint(results: Path, pid: int) -> bool:
    """Whether process `pid` is inside a checkpoint write: its staging folder exists, or a
    temporary file of `latest` (a kill leaves earlier writers' debris, hence the pid / age)."""
    for path in results.iterdir():
        if path.name.startswith(".checkpoint-") and path.name.endswith(f".tmp-{pid}"):
            return True
        if path.name.startswith(f".{LATEST}.") and path.name.endswith(".tmp"):
            try:
                if time.time() - path.stat().st_mtime < 0.5:
                    return True
            except FileNotFoundError:
                pass
    return False


def saved_step(results: Path) -> int:
    """The step of the checkpoint `latest` resolves to (0 without one); every checkpoint
    folder on disk must load completely."""
    for folder in results.glob("checkpoint-*"):
        ckpt.load_tensors(folder / "model.safetensors")
        ckpt.load_tensors(folder / "ema.safetensors")
        ckpt.load_state(folder / "state.pt")
    # A kill between a checkpoint's rename into place and the rename of `latest` leaves a
    # complete checkpoint that `latest` does not name yet: resuming takes the newest
    # complete one, as the manager does.
    folder = ckpt.CheckpointManager(results).latest()
    if folder is None:
        assert not list(results.glob("checkpoint-*"))
        return 0
    return int(ckpt.load_state(folder / "state.pt")["step"])


def kill_plan(kills: int, rng: random.Random) -> list[tuple[str, float]]:
    """Alternate kills inside a checkpoint write (a random moment of the paused write
    sequence) and at a random time after the child starts training."""
    plan = []
    for index in range(kills):
        if index % 2 == 0:
            plan.append(("in-write", rng.uniform(0.0, 0.5)))
        else:
            plan.append(("random", rng.uniform(0.05, 1.2)))
    return plan


def run_harness(results: Path, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    figures = {"kills": 0, "in_write": 0, "steps_lost": 0, "resumes_checked": 0}
    expected_resume = 0
    for how, delay in kill_plan(kills, rng):
        child = start_child(results, write_delay=0.25 if how == "in-write" else None)
        try:
            first = child.stdout.readline()
            assert first.startswith("RESUMED"), first + child.stderr.read()[-3000:]
            assert int(first.split()[1]) == expected_resume, (first, expected_resume)
            figures["resumes_checked"] += 1
            started = steps_logged(results)
            deadline = time.monotonic() + 120
            if how == "in-write":
                while not writing_checkpoint(results, child.pid) and child.poll() is None:
                    assert time.monotonic() < deadline, "the child never wrote a checkpoint"
                    time.sleep(0.005)
                time.sleep(delay)
            else:
                while steps_logged(results) <= started and child.poll() is None:
                    assert time.monotonic() < deadline, "the child made no progress"
                    time.sleep(0.01)
                time.sleep(delay)
            in_write = writing_checkpoint(results, child.pid)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
        if child.returncode != -signal.SIGKILL:
            assert child.returncode == 0, child.returncode
            expected_resume = saved_step(results)  # finished before the kill landed
            break
        figures["kills"] += 1
        figures["in_write"] += int(in_write)
        done = steps_logged(results)
        expected_resume = saved_step(results)  # also asserts every checkpoint is readable
        assert expected_resume <= done
        figures["steps_lost"] += done - expected_resume
    child = start_child(results, write_delay=None)
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    assert stdout.splitlines()[0] == f"RESUMED {expected_resume}"
    assert stdout.splitlines()[-1] == f"DONE {STEPS}"
    return figures


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(2, id="2-kills"),
        pytest.param(14, id="14-kills", marks=pytest.mark.slow),
    ],
)
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path, kills):
    torch.set_num_threads(1)
    reference = build(tmp_path / "reference")
    reference.train()
    figures = run_harness(tmp_path / "killed", kills, seed=kills)
    print(f"SIGKILL harness: {figures}")
    assert figures["kills"] >= kills - 1  # the last kill may come after the run finished
    assert figures["in_write"] >= 1
    resumed = build(tmp_path / "killed", resume=True)
    assert resumed.step == STEPS
    for mine, theirs in ((resumed.model, reference.model), (resumed.ema_model, reference.ema_model)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))


# ---------------------------------------------------------------------------------------
# a full disk, an unwritable folder


def _fast(results, **overrides):
    options = dict(train_num_steps=3, save_and_sample_every=3, num_sample_rows=1)
    options.update(overrides)
    return make_trainer(results, **options)


def _assert_checkpoint_one_intact(results: Path, weights: bytes) -> None:
    assert (results / LATEST).read_text().strip() == "checkpoint-1"
    assert (results / "checkpoint-1" / "model.safetensors").read_bytes() == weights
    assert not any(p.name.startswith(".checkpoint") for p in results.iterdir())
    assert _fast(results, resume=True).step == 3


def test_disk_full_during_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    import safetensors.torch

    trainer = _fast(tmp_path)
    trainer.train()
    weights = (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes()
    real_save_file = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # half of it reached the disk
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    trainer.train_num_steps = 6
    with pytest.raises(ckpt.CheckpointWriteError) as caught:
        trainer.train()
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device" in message and "disk is full" in message
    assert "checkpoint-1 is intact" in message
    monkeypatch.undo()
    _assert_checkpoint_one_intact(tmp_path, weights)


def _deny_writes_in(monkeypatch, folder: Path) -> None:
    """Make `folder` refuse new files: chmod where that binds (not root), else by patching
    the file creation the writers go through."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    real_mkdir = Path.mkdir

    def refuse_mkdir(self, *args, **kwargs):
        if self.parent.resolve() == folder.resolve() and not self.exists():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_mkdir)


def test_unwritable_results_folder_fails_at_construction(tmp_path, monkeypatch):
    folder = tmp_path / "results"
    folder.mkdir()
    _deny_writes_in(monkeypatch, folder)
    try:
        with pytest.raises(ckpt.CheckpointWriteError, match="results folder .* is not writable.*Permission denied"):
            _fast(folder)
    finally:
        if os.geteuid() != 0:
            folder.chmod(0o700)


def test_folder_turning_read_only_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _fast(tmp_path, train_num_steps=3)
    trainer.train()
    weights = (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes()
    _deny_writes_in(monkeypatch, tmp_path)
    try:
        with pytest.raises(ckpt.CheckpointWriteError, match="not writable|Permission denied") as caught:
            trainer.save(2)
        assert caught.value.errno == errno.EACCES
        assert "checkpoint-1 is intact" in str(caught.value)
    finally:
        if os.geteuid() != 0:
            tmp_path.chmod(0o700)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint-2").exists()
    _assert_checkpoint_one_intact(tmp_path, weights)


if __name__ == "__main__":
    child_main(sys.argv[1])
