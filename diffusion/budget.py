"""The learning-rate curve and the wall-clock budget of a training run.

The learning rate is a pure function of the step (no scheduler object whose state could
drift from the step counter on resume): linear warm-up over `warmup_steps`, then constant
or a cosine / linear decay to `min_lr_ratio` * lr at the schedule's horizon.

The horizon is `train_num_steps`, unless a wall-clock budget (`max_seconds`) ends the run
sooner. A decay planned for more steps than the budget allows would stop while the rate is
still high, which leaves noisy weights; so, with a decaying schedule, the number of steps
the budget allows is estimated ONCE, at step `ESTIMATE_AFTER` of the session, from the step
rate measured after the first `WARMUP_STEPS` (which pay for allocation, caches and
compilation, and would make the estimate too low), and becomes the horizon (never more than
`train_num_steps`). A machine's speed changes during a run (another process starts or
ends, as when the cascade demo trains two stages side by side): a rate measured over the
first steps alone once cut a run to a third of its budget. So the horizon is re-estimated
at `REVISE_AT` fractions of the budget from the rate since the previous estimate, and kept
unless the new one differs by more than `REVISE_TOLERANCE`; each revision moves the learning
rate by at most the difference between two points of the same smooth curve. The horizon is
stored in the checkpoint, so a resumed run follows the curve it had (a resumed session does
not revise it); nothing rewrites the run's options mid-run. The run stops at the horizon or
when the budget is used up, whichever comes first.
"""

from __future__ import annotations

import logging
import math
import time

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine", "linear")
# The first steps are slow (allocation, caches, compilation): left out of the rate. The rate
# is then measured over enough steps to be steady, and few enough that the decay has hardly
# begun when the horizon is fixed.
WARMUP_STEPS = 10
ESTIMATE_AFTER = 50
# Fractions of the budget at which the horizon is re-estimated (before the decay is far
# along), and the relative change below which it is left alone.
REVISE_AT = (0.1, 0.25, 0.5)
REVISE_TOLERANCE = 0.05


def lr_factor(step: int, *, warmup_steps: int, schedule: str, horizon: int, min_lr_ratio: float) -> float:
    """The learning rate of `step` as a fraction of the base rate."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, horizon - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class TimeBudget:
    """Tracks one training session's wall-clock budget (`max_seconds`, 0 = none).

    `horizon` is the step at which the learning-rate schedule ends: None until estimated
    (the schedule then uses `train_num_steps`), or the value a checkpoint stored."""

    def __init__(self, max_seconds: float | int, *, decaying: bool, max_steps: int, horizon: int | None = None,
                 clock=time.perf_counter):
        self.max_seconds = float(max_seconds)
        self.decaying = decaying
        self.max_steps = max_steps
        self.horizon = horizon
        self.clock = clock
        self.start_time = clock()
        self.start_step = 0
        self.warm_time: float | None = None
        self.stopped_early = False
        # A horizon given (read from a checkpoint) is kept; one estimated here is revised.
        self.revisions_left = 0 if horizon is not None else len(REVISE_AT)
        self.mark: tuple[float, int] = (0.0, 0)

    @property
    def active(self) -> bool:
        return self.max_seconds > 0

    def start(self, step: int) -> None:
        self.start_time = self.clock()
        self.start_step = step
        self.warm_time = None
        self.stopped_early = False

    def elapsed(self) -> float:
        return self.clock() - self.start_time

    def after_step(self, step: int) -> None:
        """Called with the number of completed steps; estimates the horizon, then revises it
        at the `REVISE_AT` fractions of the budget."""
        if not self.active or not self.decaying:
            return
        if self.horizon is not None:
            self._revise(step)
            return
        done = step - self.start_step
        if done == WARMUP_STEPS:
            self.warm_time = self.elapsed()
        if done < ESTIMATE_AFTER or self.warm_time is None:
            return
        elapsed = self.elapsed()
        rate = (done - WARMUP_STEPS) / max(elapsed - self.warm_time, 1e-9)
        projected = step + int(rate * max(self.max_seconds - elapsed, 0.0))
        self.horizon = max(step + 1, min(self.max_steps, projected))
        self.mark = (elapsed, step)
        # Revision points the estimate itself came after are skipped.
        self.revisions_left = sum(1 for fraction in REVISE_AT if fraction * self.max_seconds > elapsed)
        logger.info("time budget of %.0f s: the learning-rate schedule ends at step %d", self.max_seconds, self.horizon)

    def _revise(self, step: int) -> None:
        if self.revisions_left == 0 or self.horizon is None:
            return
        elapsed = self.elapsed()
        if elapsed < REVISE_AT[len(REVISE_AT) - self.revisions_left] * self.max_seconds:
            return
        self.revisions_left -= 1
        since, at = self.mark
        self.mark = (elapsed, step)
        if step <= at or elapsed <= since:
            return
        rate = (step - at) / (elapsed - since)
        projected = step + int(rate * max(self.max_seconds - elapsed, 0.0))
        revised = max(step + 1, min(self.max_steps, projected))
        if abs(revised - self.horizon) > REVISE_TOLERANCE * self.horizon:
            logger.info("time budget: %.1f steps/s over the last %.0f s; the learning-rate schedule now ends at "
                        "step %d (was %d)", rate, elapsed - since, revised, self.horizon)
            self.horizon = revised

    def should_stop(self, step: int) -> bool:
        """True once the budget is used up or the schedule's horizon is reached."""
        if not self.active:
            return False
        if self.elapsed() >= self.max_seconds or (self.horizon is not None and step >= self.horizon):
            if step < self.max_steps and not self.stopped_early:
                self.stopped_early = True
                if self.horizon is not None and step >= self.horizon:
                    logger.info("the learning-rate schedule ends at step %d, after %.0f s of the %.0f s budget",
                                step, self.elapsed(), self.max_seconds)
                else:
                    logger.info("time budget of %.0f s used up at step %d", self.max_seconds, step)
            return True
        return False
