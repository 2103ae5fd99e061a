"""A stand-in SLURM on this machine for submitit: sbatch, srun, sacct, scontrol and scancel.

``install(folder)`` writes the five commands into ``folder/bin`` (put it first on PATH); jobs keep
their state under ``folder/jobs/<job id>/``. ``sbatch`` starts each job (each task of an array) in the
background under a runner that sets the variables a SLURM job has and runs the batch script, and runs
it again when the job was requeued meanwhile. ``srun`` starts the job's tasks with their ranks and
output files. ``sacct`` reports the states the runners keep. ``scontrol requeue`` requeues a job as
SLURM does on preemption: SIGTERM to its tasks, then it runs again. ``scancel --signal=SIG`` sends a
signal to a job's tasks (what SLURM's ``--signal`` does before a time limit); plain ``scancel``
cancels the job.

python tests/helpers/slurm.py FOLDER COMMAND ARGS...
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "scontrol", "scancel")


def install(folder: Path) -> Path:
    """The folder of the five commands, each running this file with ``folder`` as its state."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (folder / "jobs").mkdir(exist_ok=True)
    for command in COMMANDS:
        script = bin_dir / command
        call = shlex.join([sys.executable, str(Path(__file__).resolve()), str(folder), command])
        script.write_text(f'#!/bin/sh\nexec {call} "$@"\n')
        script.chmod(0o755)
    return bin_dir


def jobs(folder: Path) -> list[str]:
    """The job ids given out so far (array tasks as ``<id>_<task>``)."""
    return sorted(path.name for path in (folder / "jobs").iterdir())


def runs(folder: Path, job: str) -> int:
    """How many times the job's batch script has started."""
    return len((folder / "jobs" / job / "runs").read_text().splitlines())


def _options(script: Path) -> dict[str, str]:
    """The script's ``#SBATCH --key=value`` lines."""
    found = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            found[key] = shlex.split(value)[0] if value else "true"
    return found


def _expand(pattern: str, env: dict[str, str], task: int = 0) -> str:
    """SLURM's file name patterns: %j job id, %A array job id, %a array task, %t task rank."""
    values = {
        "j": env["SLURM_JOB_ID"],
        "A": env.get("SLURM_ARRAY_JOB_ID", ""),
        "a": env.get("SLURM_ARRAY_TASK_ID", ""),
        "t": str(task),
    }
    path = Path(re.sub(r"%([jAat])", lambda match: values[match[1]], pattern))
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def _job_dir(folder: Path, job: str) -> Path:
    return folder / "jobs" / job


def sbatch(folder: Path, args: list[str]) -> None:
    script = Path(args[-1])
    counter = folder / "counter"
    number = int(counter.read_text()) + 1 if counter.exists() else 1000
    counter.write_text(str(number))
    array = _options(script).get("array")
    tasks = [None]
    if array:
        first, last = array.split("%")[0].split("-")
        tasks = list(range(int(first), int(last) + 1))
    for task in tasks:
        job = str(number) if task is None else f"{number}_{task}"
        _job_dir(folder, job).mkdir()
        (_job_dir(folder, job) / "state").write_text("PENDING")
        (_job_dir(folder, job) / "script.sh").write_text(script.read_text())  # kept, as SLURM keeps it
        runner = [sys.executable, __file__, str(folder), "_run", job]
        with open(_job_dir(folder, job) / "runner.log", "w") as log:  # not sbatch's output: it returns now
            subprocess.Popen(runner, start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    print(f"Submitted batch job {number}")


def _run(folder: Path, args: list[str]) -> None:
    """One job: its batch script with a job's variables, once more each time it was requeued."""
    job = args[0]
    here = _job_dir(folder, job)
    script = here / "script.sh"
    options = _options(script)
    nodes, per_node = int(options.get("nodes", 1)), int(options.get("ntasks-per-node", 1))
    number, _, task = job.partition("_")
    env = {
        **os.environ,
        "SLURM_JOB_ID": number if not task else str(int(number) * 1000 + int(task)),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": os.getcwd(),
        "STANDIN_SLURM_JOB": job,
    }
    if task:
        env.update(SLURM_ARRAY_JOB_ID=number, SLURM_ARRAY_TASK_ID=task)
    restarts = 0
    while True:
        env["SLURM_RESTART_COUNT"] = str(restarts)
        (here / "tasks").write_text("")
        with open(here / "runs", "a") as log:
            log.write("started\n")
        (here / "state").write_text("RUNNING")
        with open(_expand(options["output"], env), "a") as out, open(_expand(options["error"], env), "a") as err:
            code = subprocess.call(["bash", str(script)], env=env, stdout=out, stderr=err)
        if (here / "requeue").exists():
            (here / "requeue").unlink()
            (here / "state").write_text("REQUEUED")
            restarts += 1
            continue
        cancelled = (here / "cancelled").exists()
        (here / "state").write_text("CANCELLED" if cancelled else "COMPLETED" if code == 0 else "FAILED")
        return


def srun(folder: Path, args: list[str]) -> None:
    """The job's tasks, each with its rank, the output files named for it; exits as the worst task did."""
    files: dict[str, str] = {}
    while args[0].startswith("--"):
        option = args.pop(0)
        key, _, value = option[2:].partition("=")
        if key in ("output", "error"):
            files[key] = value or args.pop(0)
    env = dict(os.environ)
    here = _job_dir(folder, env["STANDIN_SLURM_JOB"])
    processes = []
    for rank in range(int(env["SLURM_NTASKS"])):
        task_env = {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0"}
        out = open(_expand(files["output"], env, rank), "a")
        err = open(_expand(files["error"], env, rank), "a") if "error" in files else out
        processes.append(subprocess.Popen(args, env=task_env, stdout=out, stderr=err))
        with open(here / "tasks", "a") as tasks:
            tasks.write(f"{processes[-1].pid}\n")
    codes = [process.wait() for process in processes]
    (here / "tasks").write_text("")  # gone: no signal may reach a process that took over one of their ids
    sys.exit(max(codes, key=abs))


def sacct(folder: Path, args: list[str]) -> None:
    wanted = [args[i + 1] for i, arg in enumerate(args) if arg == "-j"]
    print("JobID|State|NodeList")
    for job in jobs(folder):
        if job.partition("_")[0] in wanted:
            print(f"{job}|{(_job_dir(folder, job) / 'state').read_text()}|localhost")


def _signal_tasks(folder: Path, job: str, signum: int) -> None:
    for pid in (_job_dir(folder, job) / "tasks").read_text().split():
        try:
            os.kill(int(pid), signum)
        except ProcessLookupError:
            pass


def scontrol(folder: Path, args: list[str]) -> None:
    assert args[0] == "requeue", args
    (_job_dir(folder, args[1]) / "requeue").touch()
    _signal_tasks(folder, args[1], signal.SIGTERM)


def scancel(folder: Path, args: list[str]) -> None:
    name, job = "", ""
    while args:
        arg = args.pop(0)
        if arg.startswith("--signal"):
            name = (arg.partition("=")[2] or args.pop(0)).removeprefix("SIG")
        else:
            job = arg
    if not name:
        (_job_dir(folder, job) / "cancelled").touch()
    _signal_tasks(folder, job, signal.Signals[f"SIG{name or 'TERM'}"])


if __name__ == "__main__":
    folder, command, *rest = sys.argv[1:]
    {**{name: globals()[name] for name in COMMANDS}, "_run": _run}[command](Path(folder), rest)
