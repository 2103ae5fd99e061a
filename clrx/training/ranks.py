"""What the processes of a multi-process launch agree on, so that none goes its own way.

The main process chooses the checkpoint every rank resumes from and tells the others; a rank that
cannot read it stops them all at once (the run directory must be on a file system every node
shares). Every rank knows the MLflow run, so that when the main process is lost a surviving rank
ends it FAILED instead of leaving it RUNNING.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env

from clrx.config.schema import check_launch
from clrx.errors import ClrxError, ConfigError, ProcessLost, one_line
from clrx.training import checkpoint

SHARED = "the run directory must be on a file system every node shares"
GRACE_S = 5  # how long a surviving rank leaves the main process to end the run itself


def several() -> bool:
    """Whether this process is one of several (torchrun, SLURM tasks, Accelerate's multi-process launchers)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def node() -> int:
    """This process's machine: torchrun's node rank, SLURM's node id, else its rank over the processes per machine."""
    named = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID")
    if named is not None:
        return int(named)
    return int(os.environ.get("RANK", "0")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def join(cpu: bool) -> PartialState:
    """This process's part of the launch, the process group started (once)."""
    check_launch(cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    return PartialState(cpu=cpu)


def from_main(value: Any) -> Any:
    """The main process's ``value``, on every process."""
    return broadcast_object_list([value])[0]


def resume_point(resume: str | None, output_dir: Path, cpu: bool) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``trainer.resume`` names, loaded on every process; None to start afresh.

    With several processes the main one chooses it (see ``checkpoint.find``) and sends its path and
    step; each other one loads that file and checks it holds that step of that run. A rank that
    cannot is reported by its node, on every rank, before any MLflow run is opened.
    """
    if not several():
        return checkpoint.find(resume, output_dir)
    state = join(cpu)
    found, chosen = None, None
    if state.is_main_process:
        try:
            found = checkpoint.find(resume, output_dir)
            chosen = None if found is None else (str(found[0]), found[1]["step"], found[1]["run_id"])
        except ConfigError as error:
            chosen = error.problem  # every rank stops with it
    chosen = from_main(chosen)
    if isinstance(chosen, str):
        raise ConfigError("trainer.resume", chosen)
    if chosen is None:
        return None
    path, step, run_id = chosen
    problem = None
    if found is None:
        try:
            found = Path(path), checkpoint.load(Path(path))
            if (found[1]["step"], found[1]["run_id"]) != (step, run_id):
                problem = f"node {node()} reads another checkpoint at {path} (step {found[1]['step']}, not {step})"
        except ConfigError:
            problem = f"node {node()} cannot read {path}"
    problems = [reported for reported in gather_object([problem]) if reported]
    if problems:
        raise ConfigError("trainer.resume", f"{problems[0]}; {SHARED}")
    return found


def lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed: a peer process died or its connection broke."""
    said = str(error)
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and any(word in said for word in ("gloo", "NCCL", "Connection"))
    )


def _end_if_running(uri: str, run_id: str, reason: str) -> str:
    """End the run FAILED with ``reason``, unless the main process's side (its store process, which sees it
    die) does so within ``GRACE_S``; the status the run ended with."""
    from clrx.tracking.store import PARAM_VALUE_LIMIT, open_store

    client = open_store(uri)
    deadline = time.monotonic() + GRACE_S
    while (status := client.get_run(run_id).info.status) == "RUNNING":
        if time.monotonic() > deadline:
            client.set_tag(run_id, "clrx.failure", reason[:PARAM_VALUE_LIMIT])
            client.set_terminated(run_id, "FAILED")
            return "FAILED"
        time.sleep(0.5)
    return status


@contextmanager
def watched(tracker: Any, output_dir: Path) -> Iterator[None]:
    """A multi-process run's body: a collective that fails because a process was lost ends as ProcessLost.

    The main process's run then ends FAILED on its way out; where the main process itself was lost,
    a surviving rank ends it. ``tracker``'s run and ``output_dir``: the main process's (others pass anything).
    """
    if not several():
        yield
        return
    main = PartialState().is_main_process
    run_id, uri, output_dir = from_main((tracker.run_id, tracker.uri, str(output_dir)))
    resume = f"resume with trainer.resume=auto hydra.run.dir={output_dir} on every node"
    try:
        yield
    except Exception as error:
        if isinstance(error, ClrxError) or not lost(error):
            raise
        why = re.sub(r"^\[[^]]*\] ", "", one_line(error)).split(". ")[0][:200]  # gloo's source location left out
        if main:
            raise ProcessLost(f"a process of the launch was lost ({why}); {resume}") from None
        reason = f"the main process was lost ({why})"
        try:
            said = f"; MLflow run {run_id} ended {_end_if_running(uri, run_id, reason)}"
        except ClrxError as unusable:  # the store does not answer either
            said = f"; MLflow run {run_id} could not be ended ({unusable})"
        raise ProcessLost(f"{reason}{said}; {resume}") from None
