"""Multiruns as one MLflow parent run with a child run per job.

A Hydra callback opens the store (creating its schema and the experiment once, before any job
starts, so parallel jobs never race on them), creates the parent run and leaves its id in the
sweep folder, where every job, local or on a cluster, finds it. When the sweep ends it attaches
the summary to the parent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from clrx.config.schema import check_launcher, direction, main_process
from clrx.errors import ClrxError, exit_with

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
# Parent runs this process opened and has not closed: a sweep that dies early closes them FAILED.
_open_parents: list[tuple[MlflowClient, str]] = []


def bisect(center: float) -> str:
    """Sweep values around a weight decay, as in the paper's bisection: 3x, 1x and 1/3x."""
    if not isinstance(center, (int, float)) or isinstance(center, bool) or center <= 0:
        raise ValueError(f"wd must be a positive number, got {center!r}")
    return ",".join(f"{center * factor:.3g}" for factor in (3, 1, 1 / 3))


def register_sweeps() -> None:
    """Make ``sweeps/<name>.yaml`` selectable as ``+sweep=<name>`` (a global overlay).

    Files in ``sweeps/<name>/`` are the variants such a sweep runs, as group ``sweep/<name>``.
    """
    if not OmegaConf.has_resolver("clrx_bisect"):
        OmegaConf.register_new_resolver("clrx_bisect", bisect)
    if not OmegaConf.has_resolver("clrx_direction"):  # a sweeper's direction: the way tracking.objective is better
        OmegaConf.register_new_resolver("clrx_direction", direction)
    store = ConfigStore.instance()
    for path in sorted(SWEEPS.glob("*.yaml")) + sorted(SWEEPS.glob("*/*.yaml")):
        group = "sweep" if path.parent == SWEEPS else f"sweep/{path.parent.name}"
        store.store(group=group, name=path.stem, node=OmegaConf.load(path), package="_global_")


class SweepRuns(Callback):
    """Parent run at the start of a multirun, summary at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from clrx.tracking.provenance import context_tags  # MLflow: when used
        from clrx.tracking.store import PARENT_FILE, default_uri, experiment_id, open_store

        try:
            check_launcher(config.hydra.launcher)
        except ClrxError as error:  # Hydra turns a callback's exception into a warning and goes on; not an exit
            exit_with("clrx", str(error), 2)
        if not main_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            client = open_store(config.tracking.uri or default_uri())
        except ClrxError:
            return  # the first job meets the same error and ends the sweep with it, in one line
        experiment = experiment_id(client, config.tracking.experiment)
        overrides = " ".join(config.hydra.overrides.task)
        run = client.create_run(
            experiment,
            run_name=f"sweep {sweep_dir.name}",
            tags=context_tags({"clrx.sweep_dir": str(sweep_dir.resolve()), "clrx.overrides": overrides}),
        )
        (sweep_dir / PARENT_FILE).write_text(run.info.run_id)
        _open_parents.append((client, run.info.run_id))
        print(f"sweep folder {sweep_dir}, parent MLflow run {run.info.run_id}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from clrx.tracking.store import default_uri, open_store, parent_run_id

        sweep_dir = Path(config.hydra.sweep.dir)
        parent = parent_run_id(sweep_dir)
        if parent is not None and main_process():
            from clrx.tracking.report import report  # figures and tables: only at a sweep's end

            client = open_store(config.tracking.uri or default_uri())
            table, best = report(client, parent, sweep_dir, close=True)
            _open_parents[:] = [(client, run) for client, run in _open_parents if run != parent]
            print(
                f"sweep summary: {sweep_dir}/summary.csv, summary.md, summary.png "
                f"(also under summary/ on parent MLflow run {parent} at {client.tracking_uri})"
            )
            if best:
                print(best)
            failed = [_failure(row, len(table) > 1) for row in table if row["status"] != "FINISHED"]
            said = f"{len(failed)} of {len(table)} sweep jobs failed: {'; '.join(failed)}"
            if failed and len(failed) == len(table):  # Hydra turns a callback's exceptions into warnings: end here
                exit_with("clrx", said, 1)
            if failed:  # a search goes on past diverging or refused jobs: they are ranked last, and named
                print(f"clrx: {said}", file=sys.stderr)


def _failure(row: dict[str, object], several: bool) -> str:
    """``job 3 (policy.lr=10): loss became nan at step 12``: a failed job of a summary, on one line, with what
    it swept if the sweep had several jobs (a lone job's "swept" is every override)."""
    swept = f" ({row['swept']})" if several and row["swept"] else ""
    reason = str(row.get("failure") or row["status"]).splitlines()[0]
    return f"job {row['job']}{swept}: {reason if len(reason) <= 160 else reason[:157] + '...'}"


def abort_open_sweeps(reason: str) -> bool:
    """Close FAILED, with the reason, every parent run of a sweep that stopped before its end; whether there was one."""
    aborted = bool(_open_parents)
    while _open_parents:
        client, run_id = _open_parents.pop()
        client.set_tag(run_id, "clrx.failure", reason)
        client.set_terminated(run_id, "FAILED")
    return aborted
