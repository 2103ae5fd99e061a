"""The MLflow store, opening from a command's first moment: in a process of its own, or in this one.

Importing MLflow and opening its store take seconds of Python. A training command that has not
imported MLflow leaves that to a process beside it (``clrx.tracking.service``), which then writes
the run, so the training process never loads MLflow. A process that has it already (a study, a
sweep's parent, a test) opens the store in a thread. Either handle is what ``store.main_run`` takes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from clrx.config.schema import check_tracking, main_process
from clrx.tracking.store import Tracker, bound_requests, default_uri, open_store, tracked_run

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from clrx.tracking.service import StoreProcess


class LocalStore:
    """The store in this process, through a client that opens in a thread."""

    def __init__(self, opening: Future) -> None:
        self._opening = opening

    @classmethod
    def of(cls, client: MlflowClient) -> LocalStore:
        """The handle of a client already open."""
        opened: Future = Future()
        opened.set_result(client)
        return cls(opened)

    @property
    def client(self) -> MlflowClient:
        return self._opening.result()

    @property
    def uri(self) -> str:
        return self.client.tracking_uri

    def ask(self, query: Callable[..., Any], *args: Any) -> Any:
        """``query(client, *args)``."""
        return query(self.client, *args)

    def close(self) -> None:
        """Nothing to end: the client goes with this process."""

    def run(self, *args: Any, **kwargs: Any) -> AbstractContextManager[Tracker]:
        """A run (``store.open_run``'s arguments) that always ends FINISHED, FAILED or KILLED."""
        return tracked_run(self.client, *args, **kwargs)


def open_in_background(cfg: DictConfig) -> LocalStore | StoreProcess | None:
    """The store of ``cfg.tracking``, opening; None where this process writes no run (a dry run, ranks > 0)."""
    check_tracking(cfg.tracking)
    if not main_process() or cfg.trainer.dry_run:
        return None
    uri = cfg.tracking.uri or default_uri()
    if "mlflow" not in sys.modules and os.name == "posix":  # it inherits its connection's file descriptor
        from clrx.tracking.service import StoreProcess

        return StoreProcess(uri, cfg.tracking.timeout, cfg.tracking.log_model)

    def opened() -> MlflowClient:
        bound_requests(cfg.tracking.timeout)
        return open_store(uri)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clrx-store")
    opening = pool.submit(opened)
    pool.shutdown(wait=False)
    return LocalStore(opening)
