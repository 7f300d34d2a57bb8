"""A run's metrics: one JSON record per logged step in `metrics.jsonl`, and the loss plot.

On resume the file is cut back to the steps before the checkpoint (the resumed run logs the
rest again), so it always describes one trajectory. The file is read back through
`unets.guards` (a regular file of bounded size); lines a crash cut short, that are not
UTF-8, not JSON or not a record of this library are dropped, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusion import checkpoint as ckpt

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
_MAX_BYTES = 1 << 30


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    step, loss = record.get("step"), record.get("loss")
    if isinstance(step, bool) or not isinstance(step, int) or isinstance(loss, bool) or not isinstance(loss, (int, float)):
        return None
    return record


class MetricsLog:
    """Appends step records to `run_dir/metrics.jsonl` and keeps `(step, loss)` history."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_NAME
        self.history: list[tuple[int, float]] = []

    def append(self, record: Mapping[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(dict(record)) + "\n")
        except OSError as err:
            raise ckpt.CheckpointWriteError.from_os_error(err, f"cannot append to {self.path}") from err

    def truncate(self, step: int) -> None:
        """Keep the records of steps before `step` only, and make them the history."""
        self.history = []
        if not os.path.lexists(self.path):
            return
        try:
            data = ckpt.read_whole(self.path, what="metrics file", max_bytes=_MAX_BYTES)
        except (OSError, ValueError) as err:
            # The metrics are a log, not state: a file that cannot be read is replaced.
            logger.warning("replacing unreadable %s: %s", self.path, err)
            data = b""
        kept = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            record = _record(line)
            if record is not None and record["step"] < step:
                kept.append(line)
                self.history.append((record["step"], float(record["loss"])))
        ckpt.atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def plot(self, path: Path) -> None:
        if not self.history:
            return
        from diffusion import media

        media.plot_loss(self.history, path, smoothing=min(50, max(2, len(self.history) // 20)))
