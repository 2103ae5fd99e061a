"""Stopping cleanly on SIGTERM (what SLURM and Kubernetes send), SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 (SLURM's
``--signal`` warnings; submitit asks for SIGUSR2 before a time limit).

While the training loop runs, a signal only raises a flag, read once a step: the loop finishes the
step, writes a checkpoint, hands every point to the tracker and raises ``Stopped``. Anywhere else
(building the run, the range test, the final report) and on the same signal twice, ``Stopped`` is
raised at once. Either way the MLflow run ends KILLED with the reason. A job under submitit then
hands the signals on to submitit's own handlers (``pass_on``), which requeue it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from clrx.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopSignals:
    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received, if any
        self.received: list[int] = []  # every signal received, in order
        self._deferred = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        again = signum in self.received  # SIGTERM with SLURM's --signal is one request; the same one twice insists
        self.received.append(signum)
        self.signum = self.signum or signum
        if again or not self._deferred:
            raise Stopped(signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the signals in this block (signal handlers exist only in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.signum, self.received = None, []
        previous = {number: signal.getsignal(number) for number in SIGNALS}
        for number in SIGNALS:
            signal.signal(number, self._handle)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            self.signum = None  # a later run in this process starts unsignalled; ``received`` is for pass_on

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that reads ``signum`` itself at safe points instead of being interrupted."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def pass_on(self) -> None:
        """After a clean stop, call the handlers the signals had before ``installed`` (submitit's: it
        requeues the job and exits, or raises why it will not); Python's own SIGINT handler is skipped."""
        for number in dict.fromkeys(self.received):
            handler = signal.getsignal(number)
            if callable(handler) and handler is not signal.default_int_handler:
                handler(number, None)


STOP = StopSignals()
