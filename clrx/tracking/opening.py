"""The MLflow store opened in a thread from a command's first moment.

Importing MLflow's store and checking its schema take seconds; in a thread they overlap the
imports of torch and timm and the loading of the data instead of delaying the first step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from omegaconf import DictConfig

from clrx.config.schema import check_tracking, main_process


def open_in_background(cfg: DictConfig) -> Future | None:
    """The client for ``cfg.tracking``, opening; None where this process writes no run (a dry run, ranks > 0)."""
    check_tracking(cfg.tracking)
    if not main_process() or cfg.trainer.dry_run:
        return None

    def opened():  # an MlflowClient
        from clrx.tracking.store import bound_requests, default_uri, open_store

        bound_requests(cfg.tracking.timeout)
        return open_store(cfg.tracking.uri or default_uri())

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clrx-store")
    store = pool.submit(opened)
    pool.shutdown(wait=False)
    return store
