"""Interrupting training safely: the first Ctrl-C finishes the step in flight and saves, the
second stops at once.

Under torchrun SIGTERM is handled the same way: torchrun (and schedulers such as Slurm on
pre-emption) stop workers with SIGTERM before they SIGKILL them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


class DeferredInterrupt:
    """`requested` turns True at the first signal; a second one sets `hard` and raises
    `KeyboardInterrupt` wherever the program is. `step` names the step in the warning."""

    def __init__(self) -> None:
        self.requested = False
        self.hard = False

    def reset(self) -> None:
        self.requested = self.hard = False

    @contextlib.contextmanager
    def handling(self, *, sigterm: bool, step: Callable[[], int]) -> Iterator[None]:
        # Signal handlers can only be installed from the main thread; elsewhere Ctrl-C
        # keeps its default meaning.
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                self.hard = True
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("interrupt: finishing step %d, then saving (Ctrl-C again to stop at once)", step())

        signals = [signal.SIGINT] + ([signal.SIGTERM] if sigterm else [])
        previous = {number: signal.signal(number, handler) for number in signals}
        try:
            yield
        finally:
            for number, old in previous.items():
                signal.signal(number, old)


def progress_bar(show: bool | None, *, total: int, initial: int) -> Any:
    """A tqdm bar (None: only when stderr is a terminal), or None without tqdm."""
    if not (show if show is not None else sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        if show:
            raise ImportError("progress=True needs tqdm: pip install 'spacetime-video[train]'") from err
        return None
    return tqdm(total=total, initial=initial, desc="training", dynamic_ncols=True)
