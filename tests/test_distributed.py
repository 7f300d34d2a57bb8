"""Data-parallel training on CPU: 2 processes (torchrun, gloo) against 1.

One torchrun launch runs three scenarios in the same two worker processes (starting
processes is the expensive part): DDP from scratch, DDP resuming a 1-process checkpoint, and
FSDP2 from scratch. The test process then compares their checkpoints with a 1-process run of
the same global batch.

Tolerance: a 2-process step averages two half-batch gradients in an all-reduce, a 1-process
step takes the mean over the whole batch at once; fp32 additions in a different order differ
by ~1 ulp, which Adam's normalised update carries into the weights at ~1e-7 relative per step.
We allow 1e-5 relative + 1e-6 absolute after 4 steps (measured: see `test_two_processes_*`).

Run this file as a script (`python tests/test_distributed.py OUT`) under torchrun to get the
worker side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import Videos, make_diffusion, make_trainer  # noqa: E402

STEPS = 4
OPTIONS = dict(
    train_batch_size=4,  # the global batch: 2 samples per rank under 2 processes
    gradient_accumulate_every=2,
    train_num_steps=STEPS,
    save_and_sample_every=2,
    num_sample_rows=1,
    image_phase_steps=1,
    image_ratio=0.5,
)
RTOL, ATOL = 1e-5, 1e-6


def trainer_for(results, *, parallel="auto", **overrides):
    options = {**OPTIONS, **overrides}
    return make_trainer(results, Videos(n=7), diffusion=make_diffusion(text=False), parallel=parallel, **options)


# ---------------------------------------------------------------------------------------
# worker side (under torchrun)


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    # 1. DDP from scratch
    trainer = trainer_for(out / "ddp", parallel="ddp")
    assert trainer.world_size == 2 and trainer.local_batch_size == 2
    trainer.train()
    # 2. DDP resuming the 1-process checkpoint the test wrote at step 2
    resumed = trainer_for(out / "resume-in-2", parallel="ddp", resume=True)
    assert resumed.step == 2, resumed.step
    resumed.train()
    # 3. FSDP2 from scratch
    sharded = trainer_for(out / "fsdp", parallel="fsdp")
    sharded.train()
    # 4. a time budget lowering train_num_steps on rank 0 only: every rank stops there
    budget = trainer_for(out / "budget", parallel="ddp", train_num_steps=50, save_and_sample_every=100)

    def rank0_budget(record):
        if budget.rank == 0 and record["step"] == 1:
            budget.train_num_steps = 3

    budget.train(log_fn=rank0_budget)
    # 5. an interrupt (Ctrl-C, SIGTERM) seen by rank 1 only: both finish the step and save
    stop = trainer_for(out / "interrupt", parallel="ddp", train_num_steps=50, save_and_sample_every=100)

    def rank1_interrupt(record):
        if stop.rank == 1 and record["step"] == 1:
            stop.interrupt.requested = True

    stop.train(log_fn=rank1_interrupt)
    report = {
        "rank": trainer.rank,
        "budget_step": budget.step,
        "interrupt_step": stop.step,
        "interrupted": stop.interrupted,
        "ddp_losses": [loss for _, loss in trainer.history],
        "fsdp_losses": [loss for _, loss in sharded.history],
        "fsdp_sharded": type(sharded.model).__name__.startswith("FSDP"),
    }
    (out / f"rank{trainer.rank}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------------------------------
# test side


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def max_relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float(((a[k] - b[k]).abs() / (b[k].abs() + ATOL)).max()) for k in a)


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("distributed")
    reference = trainer_for(root / "reference")
    reference.train()
    # A 1-process run stopped at step 2 (its checkpoint-1), for the 2 processes to resume.
    first_half = trainer_for(root / "resume-in-2", train_num_steps=2)
    first_half.train()

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).resolve()), str(root),
    ]
    pristine = root.parent / f"{root.name}-before-workers"
    shutil.copytree(root, pristine)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "terminate called without an active exception" in result.stderr:
        # Known, rare under a loaded machine (1 of 4 fresh-clone CI runs on 2026-11-29, 0 of 3
        # alone): a gloo rank aborts as its process exits. One more try; twice is a failure.
        first = result.stderr[-2000:]
        shutil.rmtree(root)  # the workers resume and write runs here: start again from the same state
        shutil.copytree(pristine, root)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, "first try:\n" + first + "\nsecond try:\n" + result.stderr[-3000:]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root, reference, reports


def test_two_processes_match_one_with_the_same_global_batch(runs):
    root, reference, reports = runs
    ref_model = reference.model.state_dict()
    ddp = load_weights(root / "ddp" / "checkpoint-2" / "model.safetensors")
    print(f"DDP vs 1 process: max relative gap {max_relative_gap(ddp, ref_model):.2e}")
    assert_close_weights(ddp, ref_model)
    assert_close_weights(load_weights(root / "ddp" / "checkpoint-2" / "ema.safetensors"), reference.ema_model.state_dict())
    ref_losses = [loss for _, loss in reference.history]
    for report in reports:  # every rank logs the all-reduced loss of the global batch
        assert report["ddp_losses"] == pytest.approx(ref_losses, rel=1e-5)
    # rank 0 alone wrote metrics (one line per step) and samples
    lines = (root / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(STEPS))
    assert (root / "ddp" / "1.gif").is_file() and (root / "ddp" / "2.gif").is_file()
    state = torch.load(root / "ddp" / "checkpoint-2" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["parallel"] == "ddp" and state["step"] == STEPS


def test_fsdp_matches_one_process_and_writes_full_checkpoints(runs):
    root, reference, reports = runs
    assert all(report["fsdp_sharded"] for report in reports)
    fsdp = load_weights(root / "fsdp" / "checkpoint-2" / "model.safetensors")
    print(f"FSDP vs 1 process: max relative gap {max_relative_gap(fsdp, reference.model.state_dict()):.2e}")
    assert_close_weights(fsdp, reference.model.state_dict())
    assert_close_weights(load_weights(root / "fsdp" / "checkpoint-2" / "ema.safetensors"), reference.ema_model.state_dict())
    assert (root / "fsdp" / "2.gif").is_file()


def test_ranks_agree_on_when_to_stop(runs):
    root, _, reports = runs
    assert [r["budget_step"] for r in reports] == [3, 3]
    assert [(r["interrupt_step"], r["interrupted"]) for r in reports] == [(2, True), (2, True)]
    assert (root / "interrupt" / "latest").read_text().strip() == "checkpoint-step-2"
    state = torch.load(root / "interrupt" / "checkpoint-step-2" / "state.pt", weights_only=True)
    assert state["step"] == 2


def test_one_process_checkpoint_resumes_in_two(runs):
    root, reference, _ = runs
    resumed = load_weights(root / "resume-in-2" / "checkpoint-2" / "model.safetensors")
    assert_close_weights(resumed, reference.model.state_dict())
    steps = [json.loads(line)["step"] for line in (root / "resume-in-2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))


@pytest.mark.parametrize("source", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_in_one(runs, tmp_path, source):
    root, reference, _ = runs
    import shutil

    folder = tmp_path / source
    folder.mkdir()
    shutil.copytree(root / source / "checkpoint-1", folder / "checkpoint-1")
    (folder / "latest").write_text("checkpoint-1\n")
    trainer = trainer_for(folder, resume=True)
    assert trainer.step == 2 and trainer.world_size == 1
    trainer.train()
    assert_close_weights(trainer.model.state_dict(), reference.model.state_dict())


def test_rank_slices_cover_the_global_batch_in_order():
    from diffusion.trainer import StepOrderSampler

    whole = StepOrderSampler(7, seed=3, global_batch=4)
    stream = [x for _, x in zip(range(16), iter(whole))]
    parts = [StepOrderSampler(7, seed=3, global_batch=4, rank=r, world_size=2) for r in (0, 1)]
    slices = [[x for _, x in zip(range(8), iter(p))] for p in parts]
    rebuilt = []
    for batch in range(4):
        rebuilt += slices[0][2 * batch : 2 * batch + 2] + slices[1][2 * batch : 2 * batch + 2]
    assert rebuilt == stream
    with pytest.raises(ValueError, match="divisible"):
        StepOrderSampler(7, seed=3, global_batch=5, rank=0, world_size=2)


def test_single_process_ignores_parallel_and_checks_the_batch(tmp_path):
    from diffusion import distributed

    trainer = trainer_for(tmp_path, parallel="fsdp", train_num_steps=1)
    assert trainer.parallel == "none" and trainer.world_size == 1 and trainer.train_model is trainer.model
    with pytest.raises(ValueError, match="parallel must be one of"):
        trainer_for(tmp_path, parallel="zero3")
    context = distributed.DistributedContext(rank=0, world_size=2)
    assert distributed.resolve_parallel("auto", context) == "ddp"


def test_fsdp_units_are_the_outermost_module_list_entries():
    from diffusion.distributed import shard_units

    inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    model = nn.Module()
    model.stem = nn.Linear(2, 2)
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), inner), nn.ReLU(), nn.Linear(2, 2)])
    units = shard_units(model)
    assert units == [model.blocks[0], model.blocks[2]]  # parameter-free entries and nested lists skipped


if __name__ == "__main__":
    from diffusion import distributed

    worker(Path(sys.argv[1]))
    distributed.exit_process(0)


def test_exit_process_returns_outside_a_process_group():
    """Only a rank of a gloo group leaves through os._exit; anywhere else (one process, this
    test process) the caller's own exit runs."""
    from diffusion import distributed

    assert not torch.distributed.is_initialized()
    assert distributed.exit_process(0) is None


def test_the_console_script_exits_with_mains_status():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "diffusion", "--help"], env=env, capture_output=True, text=True)
    bad = subprocess.run([sys.executable, "-m", "diffusion", "train", "--preset", "no-such-preset"], env=env,
                         capture_output=True, text=True)
    assert ok.returncode == 0 and "spacetime" in ok.stdout
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
