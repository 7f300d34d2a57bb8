"""The Trainer's parts on their own: the learning-rate curve and time budget, data order
and collation, sample grids, metrics, and the loop options built on them (`max_seconds`,
`save_model_every`, `load(milestone=-1)`)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import Videos, make_diffusion, make_trainer, run  # noqa: E402

from diffusion import checkpoint as ckpt  # noqa: E402
from diffusion.batches import StepBatches, collate, conditioning  # noqa: E402
from diffusion.budget import ESTIMATE_AFTER, WARMUP_STEPS, TimeBudget, lr_factor  # noqa: E402
from diffusion.metrics import MetricsLog  # noqa: E402
from diffusion.samples import SampleGrid, conditions_on_captions  # noqa: E402

LIMIT_S = 120


@pytest.fixture(autouse=True)
def time_limit():
    def expire(signum, frame):
        raise TimeoutError(f"test ran past {LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class FakeClock:
    def __init__(self, step_seconds: float):
        self.now = 0.0
        self.step_seconds = step_seconds

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step_seconds


# ---------------------------------------------------------------------------------------
# learning rate and time budget


@given(
    warmup=st.integers(0, 20),
    horizon=st.integers(1, 200),
    schedule=st.sampled_from(["constant", "cosine", "linear"]),
    ratio=st.floats(0, 1),
    step=st.integers(0, 300),
)
def test_lr_factor_stays_within_its_bounds(warmup, horizon, schedule, ratio, step):
    factor = lr_factor(step, warmup_steps=warmup, schedule=schedule, horizon=horizon, min_lr_ratio=ratio)
    if warmup and step < warmup:
        assert factor == pytest.approx((step + 1) / warmup)
    else:
        assert min(ratio, 1.0) - 1e-12 <= factor <= 1.0 + 1e-12
        if schedule != "constant" and step >= max(horizon, warmup + 1):
            assert factor == pytest.approx(ratio)


def test_budget_estimates_the_horizon_then_revises_it_when_the_machine_speeds_up():
    clock = FakeClock(0.5)  # 2 steps per second
    budget = TimeBudget(60.0, decaying=True, max_steps=1000, clock=clock)
    budget.start(0)
    step = 0
    while not budget.should_stop(step):
        clock.tick()
        step += 1
        budget.after_step(step)
        if step == ESTIMATE_AFTER:
            assert budget.horizon == 120  # 60 s at 2 steps/s
            clock.step_seconds = 0.25  # the machine gets faster (another process ended)
    # Revised at half the budget (30 s, step 70) from the 4 steps/s since the estimate:
    # 70 + 30 s x 4 = 190, and the run uses its whole budget instead of stopping at 120.
    assert budget.horizon == 190 and step == 190 and budget.stopped_early
    assert clock.now == pytest.approx(60.0)


def test_budget_revises_a_horizon_down_keeps_a_close_one_and_never_revises_a_stored_one():
    def run(first: float, then: float, horizon: int | None = None) -> TimeBudget:
        clock = FakeClock(first)
        budget = TimeBudget(100.0, decaying=True, max_steps=100_000, clock=clock, horizon=horizon)
        budget.start(0)
        for step in range(1, 2000):
            if budget.should_stop(step - 1):
                break
            clock.tick()
            budget.after_step(step)
            if step == ESTIMATE_AFTER:
                clock.step_seconds = then
        return budget

    # 0.1 s a step (estimate at 5 s: horizon 50 + 950 = 1000), then 0.2 s: the revision at
    # 10 s (step 75) projects 75 + 90 s x 5 = 525, and the run ends there, on its budget.
    slower = run(0.1, 0.2)
    assert slower.horizon == 525 and slower.elapsed() == pytest.approx(100.0, abs=0.3)
    # 2% slower: within the tolerance, the horizon stays.
    assert run(0.1, 0.102).horizon == 1000
    # A horizon read from a checkpoint (a resumed run) is the run's curve: never revised.
    assert run(0.1, 0.2, horizon=1000).horizon == 1000


def test_budget_leaves_the_slow_first_steps_out_of_the_rate():
    clock = FakeClock(2.0)  # warm-up: 2 s a step, then 0.2 s
    budget = TimeBudget(100.0, decaying=True, max_steps=10_000, clock=clock)
    budget.start(0)
    for step in range(1, ESTIMATE_AFTER + 1):
        clock.tick()
        budget.after_step(step)
        if step == WARMUP_STEPS:
            clock.step_seconds = 0.2
    # 28 s spent; 5 steps/s measured after the warm-up -> 72 s more at 5 steps/s
    assert budget.horizon == ESTIMATE_AFTER + 360


def test_budget_never_extends_past_train_num_steps_and_constant_lr_has_no_horizon():
    clock = FakeClock(0.001)
    budget = TimeBudget(100.0, decaying=True, max_steps=60, clock=clock)
    budget.start(0)
    for step in range(1, ESTIMATE_AFTER + 1):
        clock.tick()
        budget.after_step(step)
    assert budget.horizon == 60
    constant = TimeBudget(1.0, decaying=False, max_steps=30, clock=clock)
    constant.start(0)
    constant.after_step(ESTIMATE_AFTER)
    assert constant.horizon is None
    clock.now += 2
    assert constant.should_stop(5)
    assert not TimeBudget(0, decaying=True, max_steps=30, clock=clock).should_stop(10**6)


def test_max_seconds_stops_the_loop_and_the_horizon_is_stored_for_an_exact_resume(tmp_path, monkeypatch):
    from diffusion import budget as budget_module

    clock = FakeClock(1.0)  # every step "takes" one second on this clock
    real = budget_module.TimeBudget

    def ticking_budget(*args, **kwargs):
        made = real(*args, clock=clock, **kwargs)
        original = made.after_step

        def after_step(step):
            clock.tick()
            original(step)

        made.after_step = after_step
        return made

    monkeypatch.setattr("diffusion.trainer.TimeBudget", ticking_budget)
    # a short run: the rate is measured over steps 2-10 (1 step/s), the horizon fixed at step 10
    monkeypatch.setattr(budget_module, "WARMUP_STEPS", 2)
    monkeypatch.setattr(budget_module, "ESTIMATE_AFTER", 10)
    options = dict(train_num_steps=100, save_and_sample_every=1000, lr_schedule="cosine", warmup_steps=2,
                   max_seconds=13.0, image_phase_steps=0)
    trainer = make_trainer(tmp_path / "a", **options)
    losses = run(trainer)
    # 10 steps measured at 1 s each: a 13 s budget allows 13 steps, the schedule's horizon
    assert trainer.stopped_by_budget and trainer.step == 13 == len(losses)
    assert trainer.lr_horizon == 13
    assert trainer.train_num_steps == 100  # options are never rewritten
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] < 0.05 * 1e-2  # the decay was fitted to the budget

    # A run interrupted after the horizon was fixed resumes on the same curve.
    reference = make_trainer(tmp_path / "b", **options)
    run(reference)

    def stop_in_step_11(fetches):
        if fetches == 11 * 6 + 1:  # 6 items per step: batch 3 x 2 micro-batches
            raise KeyboardInterrupt

    interrupted = make_trainer(tmp_path / "c", Videos(on_fetch=stop_in_step_11), **options)
    run(interrupted)
    assert interrupted.interrupted and interrupted.step == 11 and interrupted.lr_horizon == 13
    resumed = make_trainer(tmp_path / "c", **options, resume=True)
    assert resumed.lr_horizon == 13 and resumed.step == 11
    run(resumed)
    assert resumed.step == 13
    for a, b in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_save_model_every_writes_checkpoints_without_grids_and_load_minus_one(tmp_path):
    trainer = make_trainer(tmp_path, train_num_steps=5, save_and_sample_every=100, save_model_every=2)
    run(trainer)
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert names == ["checkpoint-step-2", "checkpoint-step-4"]
    assert not list(tmp_path.glob("*.gif"))
    again = make_trainer(tmp_path, train_num_steps=5, diffusion=make_diffusion(seed=3))
    again.load(milestone=-1)
    assert again.step == 4
    with pytest.raises(ValueError, match="save_model_every"):
        make_trainer(tmp_path, save_model_every=0)


# ---------------------------------------------------------------------------------------
# data order and collation


def test_step_batches_slices_cover_the_global_batch_in_order():
    data = Videos(n=7)
    whole = StepBatches(data, seed=1, batch_size=4, accumulate=2)
    halves = [StepBatches(data, seed=1, batch_size=4, accumulate=2, rank=r, world_size=2) for r in range(2)]
    expected = next(whole.loader(3))["video"]
    parts = [next(h.loader(3))["video"] for h in halves]
    assert torch.equal(torch.cat(parts), expected)


def test_collate_and_conditioning_of_each_item_shape():
    video = torch.zeros(1, 2, 4, 4)
    assert collate([video, video])["video"].shape == (2, 1, 2, 4, 4)
    pairs = collate([(video, "a"), (video, "b")])
    assert pairs["caption"] == ["a", "b"]
    tensors = collate([(video, torch.ones(3)), (video, torch.zeros(3))])
    assert tensors["cond"].shape == (2, 3)
    device = torch.device("cpu")
    assert conditioning(pairs, device, captions=True) == {"cond": ["a", "b"]}
    assert conditioning(pairs, device, captions=False) == {}
    assert set(conditioning(tensors, device, captions=True)) == {"cond"}
    with pytest.raises(ValueError, match="carry no captions"):
        conditioning({"video": video}, device, captions=True)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


# ---------------------------------------------------------------------------------------
# sample grids and metrics


def test_sample_grid_captions_and_the_one_conditioning_rule(tmp_path):
    data = Videos()
    conditional, unconditional = make_diffusion(text=True), make_diffusion(text=False)
    assert conditional.is_conditional and not unconditional.is_conditional
    assert conditions_on_captions(conditional, data, None)
    assert not conditions_on_captions(unconditional, data, None)
    assert not conditions_on_captions(conditional, data, False)
    grid = SampleGrid(tmp_path, data, rows=2, batch_size=3, seed=0, conditional=True,
                      sample_kwargs={"sampler": "ddim", "steps": 2})
    gif = grid.write(conditional, "x")
    assert gif.stat().st_size > 0
    assert (tmp_path / "x.txt").read_text().splitlines() == data.captions[:4]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left


def test_bad_sample_kwargs_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="foo"):
        make_trainer(tmp_path, sample_kwargs={"foo": 1})
    with pytest.raises(ValueError, match="steps"):
        make_trainer(tmp_path, sample_kwargs={"sampler": "ddim", "steps": 50})  # the schedule has 10
    assert not (tmp_path / "metrics.jsonl").exists()


@given(lines=st.lists(st.one_of(
    st.builds(lambda s, l: json.dumps({"step": s, "loss": l}), st.integers(0, 20), st.floats(0, 5)),
    st.text(max_size=30),
    st.builds(lambda v: json.dumps({"step": v, "loss": 1.0}), st.one_of(st.text(max_size=3), st.booleans())),
    st.just("[1, 2]"), st.just("{\"step\": 3"),
), max_size=12), cut=st.integers(0, 20))
def test_metrics_truncation_keeps_only_good_records_before_the_step(tmp_path_factory, lines, cut):
    folder = tmp_path_factory.mktemp("metrics")
    (folder / "metrics.jsonl").write_bytes(("\n".join(lines)).encode("utf-8", "surrogatepass") + b"\xff\n")
    log = MetricsLog(folder)
    log.truncate(cut)
    kept = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(kept) == len(log.history)
    assert all(step < cut and math.isfinite(loss) for step, loss in log.history)


def test_metrics_file_replaced_by_a_fifo_is_not_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "metrics.jsonl")
    log = MetricsLog(tmp_path)
    log.truncate(3)
    assert log.history == [] and (tmp_path / "metrics.jsonl").is_file()


def test_media_writes_through_the_one_atomic_writer(tmp_path, monkeypatch):
    from diffusion import media

    calls = []
    real = ckpt.atomic_path

    def spy(path, **kwargs):
        calls.append((Path(path).name, kwargs))
        return real(path, **kwargs)

    monkeypatch.setattr(ckpt, "atomic_path", spy)
    media.write_gif(torch.rand(1, 2, 4, 4), tmp_path / "a.gif")
    assert calls == [("a.gif", {"keep_suffix": True})]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]


def test_finished_run_copy_resumes_from_its_latest(tmp_path):
    trainer = make_trainer(tmp_path / "run", train_num_steps=3, save_and_sample_every=3, num_sample_rows=1)
    run(trainer)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    resumed = make_trainer(tmp_path / "copy", train_num_steps=3, resume=True)
    assert resumed.step == 3 and resumed.latest_checkpoint() == tmp_path / "copy" / "checkpoint-1"
