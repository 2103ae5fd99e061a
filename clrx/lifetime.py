"""A clrx command's process from start to exit: its age, and a collector kept off what lives as long as it.

Importing torch, timm and MLflow creates hundreds of thousands of objects that are never freed.
CPython's collector passes over all of them in every full collection while they load (half a
second of a command's start-up on two cores) and once more at exit (a second). A command loads
them with the collector off and then moves them out of its sight (``gc.freeze``); what training
creates afterwards is collected as usual.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def lasting() -> Iterator[None]:
    """What is loaded inside lives as long as the process: no collection meanwhile, and none over it afterwards."""
    if not gc.isenabled():  # within another such block, or a program that manages the collector itself
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def load(name: str) -> ModuleType:
    """Import module ``name`` and what it imports, ``lasting`` the first time in a process.

    Later (a sweep's next job in the same process) it is there already: nothing is frozen again,
    so what earlier jobs left behind is still collected.
    """
    if name in sys.modules:
        return sys.modules[name]
    with lasting():
        return importlib.import_module(name)


def no_collection_at_exit() -> None:
    """Leave the process without the interpreter's last full collection over everything: exit handlers still
    run (logging's flushes and closes its files), and the operating system takes the memory back."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def process_age() -> float:
    """Seconds since this process started: a run's ``startup_seconds`` at its first step.

    From the kernel's boot-time clock where it has one (psutil's start time counts from a boot time
    rounded to whole seconds, up to a second off).
    """
    try:
        with open(f"/proc/{os.getpid()}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in clock ticks
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError):  # no /proc, or no boot-time clock
        import psutil

        return time.time() - psutil.Process().create_time()
