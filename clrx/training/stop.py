"""Stopping cleanly on SIGTERM (what SLURM and Kubernetes send), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning).

While the training loop runs, a signal only raises a flag, read once a step: the loop finishes the
step, writes a checkpoint, hands every point to the tracker and raises ``Stopped``. Anywhere else
(building the run, the range test, the final report) and on a second signal, ``Stopped`` is
raised at once. Either way the MLflow run ends KILLED with the reason.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from clrx.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    def __init__(self) -> None:
        self.signum: int | None = None  # the signal received, if any
        self._deferred = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first, self.signum = self.signum is None, signum
        if not (first and self._deferred):
            raise Stopped(signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the signals in this block (signal handlers exist only in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.signum, previous = None, {number: signal.getsignal(number) for number in SIGNALS}
        for number in SIGNALS:
            signal.signal(number, self._handle)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that reads ``signum`` itself at safe points instead of being interrupted."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False


STOP = StopSignals()
