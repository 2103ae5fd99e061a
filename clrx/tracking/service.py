"""The MLflow store in a process of its own, beside a training process that never imports MLflow.

A training command starts it at its first moment (``opening.open_in_background``): importing MLflow
and opening the store then take another core instead of the training process's interpreter, and
whatever the store costs later (inserts, figures, the logged model) stays off the training
process's interpreter too. The training process hands over plain values (points a chunk at a time,
params, tags, files, figures to draw, the trained model) and waits only where it must: for a run's
id, for points to be durable at a checkpoint, for a run's end. Here ``store.Tracker`` writes the
run as it would anywhere (journal first, a writer thread, replay at the end), at the lowest CPU
priority. If the training process dies, the runs it left open end FAILED.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

from clrx.errors import ClrxError, ConfigError
from clrx.lifetime import lasting
from clrx.tracking.store import (
    Buffered,
    Tracker,
    bound_requests,
    closing,
    lowest_priority,
    open_run,
    open_store,
)

LOST = "the training process ended without closing its run"
IGNORED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR2")  # the training process decides how a run ends
log = logging.getLogger("clrx")


class StoreProcess:
    """The training process's handle on the store's process: starts it, sends to it, reads its answers."""

    def __init__(self, uri: str, timeout: int, prepare_model: bool) -> None:
        # A fresh interpreter, whatever this one has started, that imports nothing of the caller's script
        # (multiprocessing's spawn would import it again); it finds what this process finds.
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-c", "from clrx.tracking.service import child; child()", str(theirs.fileno())]
        paths = os.pathsep.join(path for path in sys.path if path)
        self._process = subprocess.Popen(
            command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": paths}
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send((sys.argv, uri, timeout, prepare_model))  # MLflow tags a run with the command's argv
        self.uri = uri
        self._runs = 0
        self._raised: BaseException | None = None  # a failure reported while an answer was awaited
        atexit.register(self.close)

    def ask(self, query: Callable[..., Any], *args: Any) -> Any:
        """``query(client, *args)``, run where the client is; ``query`` a module-level function, the answer plain."""
        return self.call("ask", query, *args)

    @contextmanager
    def run(self, *args: Any, **kwargs: Any) -> Iterator[RemoteTracker]:
        """A run (``store.open_run``'s arguments after the client) that always ends FINISHED, FAILED or KILLED.

        A new run is created while training starts: nothing waits for its id until something needs it;
        it starts when it was asked for, however late the store's process gets to it. A resumed one is
        awaited, since training goes on from what the store holds of it.
        """
        self._runs += 1
        bound = inspect.signature(open_run).bind(None, *args, **kwargs)
        bound.apply_defaults()
        bound.arguments["started"] = bound.arguments["started"] or time.time()
        opening = bound.args[1:]
        if bound.arguments.get("resume") is None:
            self.send("open", self._runs, opening)
            tracker = RemoteTracker(self, self._runs, None, {})
        else:
            tracker = RemoteTracker(self, self._runs, *self.call("open", self._runs, opening))
        with closing(tracker):
            yield tracker

    def send(self, *message: Any) -> None:
        """Hand ``message`` over without waiting."""
        self._exchange(lambda: self._conn.send((False, *message)))

    def call(self, *message: Any) -> Any:
        """Send ``message`` and wait for its answer (an error there is raised here)."""
        self._exchange(lambda: self._conn.send((True, *message)))
        while True:
            kind, value = self._exchange(self._conn.recv)
            if kind == "reply":
                return value
            if kind == "fail":
                raise value
            self._handle(kind, value)

    def poll(self) -> None:
        """Handle what the store's process said meanwhile: its log lines, and a failure to raise here."""
        while self._exchange(self._conn.poll):
            self._handle(*self._exchange(self._conn.recv))
        raised, self._raised = self._raised, None
        if raised is not None:
            raise raised

    def _handle(self, kind: str, value: Any) -> None:
        if kind == "log":
            name, level, message = value
            logging.getLogger(name).log(level, "%s", message)
        elif self._raised is None:  # "raise": the first failure counts
            self._raised = value

    def _exchange(self, act: Callable[[], Any]) -> Any:
        try:
            return act()
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            code = self._process.returncode
            raise ConfigError("tracking.uri", f"the store's process ended unexpectedly (exit code {code})") from None

    def close(self) -> None:
        """End the store's process once it has written everything (runs are closed by then)."""
        atexit.unregister(self.close)
        if self._process.poll() is None:
            with contextlib.suppress(OSError):
                self._conn.send((False, "exit"))
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._conn.close()


def _forwarded(name: str) -> Callable[..., None]:
    """A ``RemoteTracker`` method that hands its arguments to the store's ``Tracker.<name>``."""

    def forward(self: RemoteTracker, *args: Any) -> None:
        self.store.send("do", self.key, name, args)

    forward.__name__, forward.__doc__ = name, getattr(Tracker, name).__doc__
    return forward


class RemoteTracker(Buffered):
    """A run written by the store's process: ``store.Tracker``'s methods, called from the training process."""

    def __init__(self, store: StoreProcess, key: int, run_id: str | None, logged: dict[str, int]) -> None:
        super().__init__(logged)
        self.store, self.key, self.uri, self._run_id = store, key, store.uri, run_id

    @property
    def run_id(self) -> str:
        """The run's id, asked for the first time it is needed."""
        if self._run_id is None:
            self._run_id = self.store.call("id", self.key)
        return self._run_id

    params = _forwarded("params")
    tags = _forwarded("tags")
    text = _forwarded("text")
    artifact = _forwarded("artifact")
    artifacts = _forwarded("artifacts")
    plot = _forwarded("plot")
    datasets = _forwarded("datasets")
    inputs = Tracker.inputs  # through datasets, with the data's plain contents

    def points(self, points: list[tuple[str, float, int]]) -> None:
        """As ``Buffered.points``; also raise a failure the store's process reported (a poll: microseconds)."""
        super().points(points)
        self.store.poll()

    def flush(self) -> None:
        """Hand the buffered points on; raise a failure the store's process reported."""
        self._hand_on()
        self.store.poll()

    def _hand_on(self) -> None:
        if self._metrics:
            self.store.send("do", self.key, "take", (self._metrics,))
            self._recorded += len(self._metrics)
            self._metrics = []

    def sync(self) -> None:
        self.flush()
        self.store.call("do", self.key, "sync", ())

    def persist(self) -> dict[str, int]:
        self.flush()
        return self.store.call("do", self.key, "persist", ())

    def model(self, exported: Any, metadata: Any, step: int, register_as: str | None = None) -> None:
        """The trained model as the run's MLflow model, logged by the store's process (``Tracker.model``)."""
        self.flush()
        self.store.call("model", self.key, dict(exported), dict(metadata), step, register_as)

    def finish(self, status: str, reason: str | None = None) -> None:
        self._hand_on()
        self._run_id = self.store.call("close", self.key, status, reason)


class _Forward(logging.Handler):
    """The store process's log lines (clrx's, and warnings of the libraries under it), said by the training
    process's loggers of the same names, so they go where that process's logging sends them."""

    def __init__(self, send: Callable[..., None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):
            self.send("log", (record.name, record.levelno, record.getMessage()))


def _portable(error: BaseException) -> BaseException:
    """``error`` as the training process can raise it without MLflow: clrx's own as they are, others as text."""
    if isinstance(error, ClrxError):
        return error
    return RuntimeError(f"in the store's process: {''.join(traceback.format_exception(error)).strip()}")


def _prepare(model: bool) -> None:
    """While training runs: load what the run's figures and (``model``) logging its model will take, so that
    the end of a run waits for the drawing and saving alone where a core was free meanwhile.

    The collector stays off while this loads (``lasting``), also where training leaves no core and the
    loading lasts until the run's end: the store's writes meanwhile make little cyclic garbage (about
    20 objects a chunk of 1000 points).
    """
    with lasting():
        import matplotlib.figure  # noqa: F401

        if model:
            from clrx.tracking.provenance import prepare_log_model

            prepare_log_model()


def child() -> None:
    """The store's process: its end of the connection is the file descriptor its command line names."""
    conn = Connection(int(sys.argv[1]))
    # Every thread of this process at the lowest CPU priority: it takes only what training leaves, and
    # where the training process waits for it, that process has left its cores.
    lowest_priority()
    sys.argv, uri, timeout, prepare_model = conn.recv()
    serve(conn, uri, timeout, prepare_model)


def serve(conn: Connection, uri: str, timeout: int, prepare_model: bool) -> None:
    """The store's process: open ``uri``, then do what the training process sends until it says "exit" or ends."""
    for name in IGNORED:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    lock = threading.Lock()  # the writer thread's warnings are sent too

    def send(kind: str, value: Any) -> None:
        with lock:
            conn.send((kind, value))

    logging.getLogger().addHandler(_Forward(send))
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    bound_requests(timeout)
    try:
        with lasting():  # MLflow, SQLAlchemy and the store's schema: alive until the process ends
            client, refused = open_store(uri), None
    except ClrxError as error:
        client, refused = None, error
    preparing = threading.Thread(target=_prepare, args=(prepare_model,), name="clrx-prepare", daemon=True)
    if refused is None:
        preparing.start()
    trackers: dict[int, Tracker] = {}
    failed: set[int] = set()  # runs whose failure was reported
    unopened: dict[int, Exception] = {}  # runs the store could not create, and why

    def report(key: int, error: BaseException) -> None:  # once a run: the training process raises it
        if key not in failed:
            failed.add(key)
            send("raise", _portable(error))

    def answer(kind: str, *args: Any) -> Any:
        if refused is not None:
            raise refused
        if kind == "ask":
            query, *rest = args
            return query(client, *rest)
        key = args[0]
        if key in unopened:
            raise unopened[key].with_traceback(None)
        if kind == "open":
            try:
                trackers[key] = tracker = open_run(client, *args[1])
            except Exception as error:
                unopened[key] = error
                raise
            return tracker.run_id, tracker.logged
        if kind == "id":
            return trackers[key].run_id
        if kind == "close":
            _, status, reason = args
            tracker = trackers.pop(key)
            tracker.finish(status, reason)
            return tracker.run_id
        if kind == "model":
            preparing.join()  # what it loads, this needs: loading it here at the same time gains nothing
            return trackers[key].model(*args[1:])
        _, method, given = args  # "do"
        return getattr(trackers[key], method)(*given)

    inbox: queue.Queue = queue.Queue()

    def read() -> None:  # everything as it arrives: the training process never waits for a send
        with contextlib.suppress(EOFError, OSError):
            while True:
                inbox.put(conn.recv())
        inbox.put(None)  # the training process is gone

    threading.Thread(target=read, name="clrx-inbox", daemon=True).start()
    try:
        while True:
            try:
                message = inbox.get(timeout=0.5)
            except queue.Empty:
                for key, tracker in trackers.items():  # a store that failed while nothing was sent
                    try:
                        tracker.check()
                    except ClrxError as error:
                        report(key, error)
                continue
            if message is None or message[1] == "exit":
                break
            reply, kind, *args = message
            try:
                result = answer(kind, *args)
            except Exception as error:
                if reply:
                    send("fail", _portable(error))
                else:
                    report(args[0], error)
            else:
                if reply:
                    send("reply", result)
    finally:
        for tracker in trackers.values():
            with contextlib.suppress(Exception):
                tracker.finish("FAILED", LOST)
    # Everything is written: end without Python's teardown of torch and MLflow, which takes seconds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
