"""Sweeps on SLURM through submitit, against a stand-in SLURM (tests/helpers/slurm.py) that runs the real batch
scripts here: a time limit or a preemption requeues the job, which continues the same MLflow run to its end; a job
that cannot finish fails its run and the sweep, in one line."""

import os
import re
import subprocess
import sys
import time

import pytest

from clrx.training import checkpoint
from tests.conftest import sweep_family
from tests.helpers import slurm

STEPS = 2 * (1437 // 64)
# timeout_min=1: submitit takes any SIGUSR2 for the time limit (it expects one after min(80%, limit - 10 min)).
ARGS = (
    "hydra/launcher=slurm",
    "hydra.launcher.timeout_min=1",
    "hydra.sweep.dir=sweep",
    "optimizer.weight_decay=1e-4",
    "trainer.epochs=2",
    "trainer.checkpoint_every=5",
    "trainer.device=cpu",
    "trainer.save_model=false",
)


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _interrupted_sweep(tmp_path, interrupt, *args):
    """The sweep's exit status and stderr, and its one job, after ``interrupt`` (a stand-in command and its
    arguments before the job id) reached the job at its first checkpoint, mid-run."""
    folder = tmp_path / "slurm"
    bin_dir = slurm.install(folder)
    env = {**os.environ, "CI": "true", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(tmp_path / "sweep.out", "w") as out:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "clrx", "-m", *ARGS, *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not any((tmp_path / "sweep" / "0" / checkpoint.DIRECTORY).glob("step-*.pt")):
                assert sweep.poll() is None and time.monotonic() < deadline, sweep.stderr.read()
                time.sleep(0.01)
            [job] = slurm.jobs(folder)
            subprocess.run([str(bin_dir / interrupt[0]), *interrupt[1:], job], check=True, timeout=60)
            stderr = sweep.communicate(timeout=600)[1]
        finally:
            for job in slurm.jobs(folder):  # nothing outlives the test
                subprocess.run([str(bin_dir / "scancel"), job], timeout=60)
            sweep.kill()
    logs = "".join(path.read_text() for path in (tmp_path / "sweep" / ".submitit").glob("*/*_log.*"))
    return sweep.returncode, stderr, job, folder, logs


def _stopped_at(signame, logs, run_dir):
    """The step the job's first run stopped at, cleanly: at a step boundary, with a checkpoint."""
    said = rf"stopped by {signame} at step (\d+); resume with trainer.resume=auto hydra.run.dir={run_dir}\n"
    [step] = set(re.findall(said, logs))  # logged, and for a job SLURM ends also the command's last line
    assert 5 <= int(step) < STEPS  # mid-run
    return int(step)


@pytest.mark.parametrize(
    "interrupt, signame",
    [
        (("scancel", "--signal=USR2"), "SIGUSR2"),  # SLURM's --signal before the time limit: submitit requeues
        (("scontrol", "requeue"), "SIGTERM"),  # preemption: SIGTERM, and SLURM puts the job back in the queue
    ],
    ids=["time_limit", "preemption"],
)
def test_a_requeued_job_resumes_its_run_and_finishes_it_with_every_step(tmp_path, store, interrupt, signame):
    _, client = store  # the default store of the folder the sweep runs in
    status, stderr, job, folder, logs = _interrupted_sweep(tmp_path, interrupt)
    assert status == 0 and stderr == "", stderr + logs
    assert slurm.runs(folder, job) == 2, logs
    assert "#SBATCH --signal=USR2@180\n" in (folder / "jobs" / job / "script.sh").read_text()  # time to checkpoint
    requeued_by_submitit = f"Requeued job {job} (2 remaining timeouts)" in logs  # a time limit counts, once
    assert requeued_by_submitit == (signame == "SIGUSR2"), logs
    run_dir = tmp_path / "sweep" / "0"
    step = _stopped_at(signame, logs, run_dir)

    parent, [child] = sweep_family(client, tmp_path / "sweep")  # one child: the requeued job continued it
    assert parent.info.status == child.info.status == "FINISHED"
    assert "clrx.failure" not in child.data.tags and child.data.params["trainer.resume"] == "auto"
    newest = run_dir / checkpoint.DIRECTORY / f"step-{step:08d}.pt"
    assert child.data.tags["clrx.resumed_from"] == f"{newest} (step {step})"
    for key in ("lr", "momentum", "train_loss"):
        assert _steps(client, child.info.run_id, key) == list(range(STEPS)), key  # one point per step
    assert _steps(client, child.info.run_id, "val_acc") == [STEPS // 2, STEPS]


def test_a_job_timed_out_too_often_fails_its_run_and_the_sweep_in_one_line(tmp_path, store):
    _, client = store
    status, stderr, job, folder, logs = _interrupted_sweep(
        tmp_path, ("scancel", "--signal=USR2"), "hydra.launcher.max_num_timeout=0"
    )
    lines = stderr.strip().splitlines()
    assert status == 1 and len(lines) == 1 and slurm.runs(folder, job) == 1, stderr + logs
    step = _stopped_at("SIGUSR2", logs, tmp_path / "sweep" / "0")
    parent, [child] = sweep_family(client, tmp_path / "sweep")
    assert parent.info.status == child.info.status == "FAILED"
    reason = f"stopped by SIGUSR2 at step {step}; Job not requeued because: timed-out too many times."
    assert child.data.tags["clrx.failure"] == reason
    assert lines[0] == f"clrx: error: 1 of 1 sweep jobs failed: job 0: {reason}"
