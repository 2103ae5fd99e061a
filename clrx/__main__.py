"""Command line: ``python -m clrx [overrides]`` trains one run; ``python -m clrx -m ...`` sweeps.

python -m clrx policy=one_cycle
python -m clrx policy=triangular2 policy.stepsize_epochs=2 trainer.epochs=8
python -m clrx -m optimizer.weight_decay=1e-3,1e-4,1e-5,0
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from clrx.config.schema import CONF, check_added, check_claims, main_process, prefer_given, register, worst
from clrx.errors import USER_ERRORS, ClrxError, ProcessLost, Stopped, TrainingDiverged, exit_with, one_line, user_errors
from clrx.lifetime import load, no_collection_at_exit
from clrx.range_test.suggest import bounds
from clrx.tracking.opening import open_in_background
from clrx.tracking.sweep import abort_open_sweeps, register_sweeps
from clrx.training import stop

if TYPE_CHECKING:
    from clrx.training.loop import Result

log = logging.getLogger("clrx")
_started = False  # whether Hydra got as far as the job: before it, an OSError is its output folder
register()
register_sweeps()


def slurm_processes() -> None:
    """Under submitit with several tasks per job, make each task one process of the training.

    The job's tasks all run this job; torch and Accelerate find their rank, the world size and
    the address of task 0 in the variables submitit's helper exports.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # Accelerate picks cuda:LOCAL_RANK


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def app(cfg: DictConfig) -> float:
    """Train (or range-test) one run; return its ``tracking.objective`` for a sweeper such as Optuna.

    A job that failed or diverged returns the objective's worst value (-inf when maximizing, inf when
    minimizing), which a sweeper ranks last; a range test or a dry run has no score and returns NaN.
    """
    global _started
    _started = True
    slurm_processes()
    with user_errors("clrx"):  # one line, not Hydra's "Error executing job"
        check_claims(os.environ)  # before any store or checkpoint is touched
    hydra_cfg = HydraConfig.get()
    if not main_process():  # one process speaks for a multi-process launch
        log.setLevel(logging.WARNING)
    # The groups' choices (clrx.policy=one_cycle...); policy@range_test only shapes auto bounds, which
    # are tagged when used (clrx.range_test_run_id).
    choices = hydra_cfg.runtime.choices.items()
    tags = {f"clrx.{group}": str(choice) for group, choice in choices if "/" not in group and "@" not in group}
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if in_sweep:
        tags.update(_job_tags(hydra_cfg))
    try:
        result = _run(cfg, hydra_cfg, tags)
    except Exception as error:
        if not in_sweep:
            if not isinstance(error, ClrxError):
                raise
            exit_with("clrx", str(error), 1 if isinstance(error, (TrainingDiverged, ProcessLost)) else 2)
        # One failed job must not end the sweep: its run is FAILED, and the summary and the sweep's end say why.
        reason = str(error) if isinstance(error, ClrxError) else f"{type(error).__name__}: {error}"
        log.error("job %s failed: %s", hydra_cfg.job.num, reason, exc_info=not isinstance(error, ClrxError))
        from clrx.tracking.store import default_uri, record_failed_job

        try:
            if main_process():
                uri = cfg.tracking.uri or default_uri()
                record_failed_job(uri, cfg.tracking.experiment, tags, reason, getattr(error, "run_id", None))
        except ClrxError as unusable:  # no store to report to: the sweep cannot go on
            exit_with("clrx", str(unusable), 2)
        return worst(cfg.tracking.objective)
    if result is None:  # dry run
        return math.nan
    if result.suggestions is not None:
        _report_range_test(result, cfg.policy)
    else:
        log.info(
            "finished %d steps in %.1fs: val_acc %.4f (best %.4f), val_loss %.4f",
            result.steps,
            result.seconds,
            result.val_acc,
            result.best_val_acc,
            result.val_loss,
        )
        if result.test is not None:
            log.info("test set: %s", ", ".join(f"{key} {value:.4f}" for key, value in result.test.items()))
    log.info("MLflow run %s in experiment '%s' at %s", result.run_id, result.experiment, result.tracking_uri)
    log.info("open the UI: mlflow ui --backend-store-uri %s  (or: make ui)", result.tracking_uri)
    if result.final is None:  # a range test suggests bounds; it scores nothing
        return math.nan
    score = result.final[cfg.tracking.objective]
    return score if math.isfinite(score) else worst(cfg.tracking.objective)


def _run(cfg: DictConfig, hydra_cfg: DictConfig, tags: dict[str, str]) -> Result | None:
    """The job's run. Under submitit it resumes by default, and a stopped job goes to submitit's handlers,
    which requeue it (the requeued job continues the same run from its newest checkpoint)."""
    check_added(hydra_cfg.overrides.task)
    prefer_given(cfg, hydra_cfg.overrides.task)
    submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
    if submitit and cfg.trainer.resume is None:
        cfg.trainer.resume = "auto"
    store = open_in_background(cfg)  # while torch, timm and the data load
    # torch, timm and MLflow load here, not at import: --help and --cfg compose without them.
    train = load("clrx.training.run").train

    try:  # stop.STOP, not a copy: submitit's launcher pickles this module's functions by value
        with stop.STOP.installed():
            return train(cfg, Path(hydra_cfg.runtime.output_dir), tags, store)
    except Stopped as stopped:
        if not submitit:
            raise
        log.warning("%s", stopped.message())
        try:
            stop.STOP.pass_on()  # requeued: submitit exits
        except Exception as refused:  # submitit will not requeue it (timed out too many times)
            failed = ClrxError(f"{stopped}; {one_line(refused)}")
            failed.run_id = getattr(stopped, "run_id", None)
            raise failed from None
        _stopped(stopped)  # preempted: SLURM requeues the job, or it ends here
    finally:
        if store is not None:
            store.close()


def job_name(num: int, overrides: list[str], limit: int = 80) -> str:
    """``job 3: weight_decay=1e-05 policy=triangular2``: the job's own overrides, keys by their last part.

    Where the run goes (hydra, tracking) and sweep selections (+sweep=...) are left out.
    """
    said = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith(("hydra", "tracking.", "sweep")):
            continue
        said.append(f"{key.rpartition('.')[2]}={value}")
    name = f"job {num}: {' '.join(said)}" if said else f"job {num}"
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _job_tags(hydra_cfg: DictConfig) -> dict[str, str]:
    from clrx.tracking.store import parent_run_id

    tags = {
        "clrx.job": str(hydra_cfg.job.num),
        "clrx.overrides": " ".join(hydra_cfg.overrides.task),
        "mlflow.runName": job_name(hydra_cfg.job.num, list(hydra_cfg.overrides.task)),
    }
    parent = parent_run_id(hydra_cfg.sweep.dir)
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    return tags


def _report_range_test(result: Result, node: DictConfig) -> None:
    log.info("range test: %d steps in %.1fs", result.steps, result.seconds)
    log.info("range test ended: %s", result.stop_reason)
    if not result.suggestions and len(set(result.no_suggestion.values())) == 1:  # one reason for every rule
        log.info("no rule suggests bounds: %s", next(iter(result.no_suggestion.values())))
        return
    log.info("suggestions:")
    for rule, suggestion in result.suggestions.items():
        base = "" if suggestion.base_lr is None else f"base_lr {suggestion.base_lr:.3g}, "
        log.info("  %-10s %smax_lr %.3g  (%s)", rule, base, suggestion.max_lr, suggestion.why)
    for rule, why in result.no_suggestion.items():
        log.info("  %-10s none: %s", rule, why)
    if node.rule not in result.suggestions:
        log.info("by rule %s: no bounds (%s)", node.rule, result.no_suggestion[node.rule])
        return
    base_lr, max_lr = bounds(result.suggestions, node.rule, node.div)
    log.info("by rule %s: policy.base_lr=%.3g policy.max_lr=%.3g", node.rule, base_lr, max_lr)


def main() -> None:
    """Run the app; a bad config ends as one line on stderr and exit status 2 (1: a run diverged, sweep jobs failed)."""
    no_collection_at_exit()
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        app()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
    global _started
    _started = False
    try:
        app()
    except USER_ERRORS as error:
        message = one_line(error)
        abort_open_sweeps(message)
        exit_with("clrx", message, 2)
    except OSError as error:
        if _started:
            raise
        where = "hydra.sweep.dir" if "-m" in sys.argv or "--multirun" in sys.argv else "hydra.run.dir"
        problem = f"cannot create or write {error.filename}: {error.strerror}; choose a folder clrx can write"
        exit_with("clrx", f"{where}: {problem}", 2)
    except Exception as error:  # a launcher lost a job (submitit: it ended without a result)
        message = one_line(error)
        if not abort_open_sweeps(message):
            raise
        exit_with("clrx", f"sweep: {message}", 1)
    except KeyboardInterrupt:  # Ctrl-C before a run's signal handlers were installed
        _stopped(Stopped(signal.SIGINT))
    except Stopped as stopped:
        _stopped(stopped)
    finally:  # for this call only: a process that runs the app again, or starts one, decides anew
        os.environ.pop("HYDRA_FULL_ERROR", None)
        _leave_process_group()


def _leave_process_group() -> None:
    """End this process's part of a multi-process launch before the interpreter ends: Gloo's threads still
    at work while it tears down abort the process now and then (SIGABRT, "terminate called without an
    active exception"), which the launcher reports as the whole launch failing."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def _stopped(stopped: Stopped) -> NoReturn:
    abort_open_sweeps(str(stopped))
    print(f"clrx: {stopped.message()}", file=sys.stderr)
    sys.exit(stopped.status)


if __name__ == "__main__":
    main()
