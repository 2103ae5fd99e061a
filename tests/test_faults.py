"""Nothing is lost when something goes wrong: runs that start together, a job that is stopped, a store that fails."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from clrx.config.schema import compose_run
from clrx.errors import Stopped
from clrx.sync import main as sync_main
from clrx.training import checkpoint
from clrx.training.run import train
from clrx.training.stop import STOP
from tests.conftest import free_port, main_in_process, start_mlflow_server

TINY = ("trainer.epochs=1", "dataset.limit_train=128", "dataset.limit_val=64", "trainer.save_model=false")


def _env():
    env = {**os.environ, "CI": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_six_runs_started_at_once_on_a_new_store_all_finish_with_every_point(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "clrx", *TINY, f"tracking.uri={uri}", f"hydra.run.dir=run{i}"],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, errors
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    assert len(runs) == 6 and {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        for key in ("lr", "momentum", "train_loss"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], key


STOPPABLE = ("trainer.epochs=3", "trainer.checkpoint_every=5", "trainer.save_model=false")
STEPS = 3 * (1438 // 64)


def _points(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _wait_until(process, done):
    """Poll ``done`` while the run goes on (no fixed sleeps: the test waits for what it needs)."""
    deadline = time.monotonic() + 300
    while not done():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.01)


def _signal_after_checkpoint(process, directory, signum):
    """Send ``signum`` once the first checkpoint exists: the run is then mid-epoch, with steps still to go."""
    _wait_until(process, lambda: any(directory.glob("step-*.pt")))
    process.send_signal(signum)
    return process.communicate(timeout=300)[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_says_so_in_one_line_ends_killed_and_resumes_exactly(
    tmp_path, store, monkeypatch, capsys, signum
):
    uri, client = store
    reference = train(compose_run(*STOPPABLE, "trainer.progress=false", f"tracking.uri={uri}"), tmp_path / "reference")

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "clrx", *STOPPABLE, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = _signal_after_checkpoint(process, run_dir / checkpoint.DIRECTORY, signum)
    assert process.returncode == 128 + signum, stderr
    [line] = stderr.strip().splitlines()
    name = signal.Signals(signum).name
    assert line.startswith(f"clrx: stopped by {name} at step ")
    assert line.endswith(f"; resume with trainer.resume=auto hydra.run.dir={run_dir}")
    step = int(line.split(" at step ")[1].split(";")[0])
    assert 5 <= step < STEPS

    [stopped] = [
        run
        for run in client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
        if run.info.run_id != reference.run_id
    ]
    assert stopped.info.status == "KILLED" and stopped.data.tags["clrx.failure"] == f"stopped by {name} at step {step}"
    for key in ("lr", "momentum", "train_loss"):
        assert _points(client, stopped.info.run_id, key) == _points(client, reference.run_id, key)[:step], key
    assert checkpoint.find("auto", run_dir)[1]["step"] == step

    resume = (*STOPPABLE, "trainer.resume=auto", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}")
    status, stderr = main_in_process(*resume, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, stderr
    resumed = client.get_run(stopped.info.run_id)
    assert resumed.info.status == "FINISHED" and "clrx.failure" not in resumed.data.tags
    for key in ("lr", "momentum", "train_loss", "val_acc", "val_loss", "train_loss_epoch"):
        assert _points(client, stopped.info.run_id, key) == _points(client, reference.run_id, key), key


def test_signals_in_training_are_one_request_to_stop_then_go_to_the_handlers_they_had():
    """SLURM may send SIGTERM and its --signal together: the step still finishes; submitit's handlers come after."""
    seen = []
    before = {
        number: signal.signal(number, lambda signum, frame: seen.append(signum))
        for number in (signal.SIGTERM, signal.SIGUSR2)
    }
    try:
        with STOP.installed(), STOP.deferred():
            for number in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
                signal.raise_signal(number)
            assert STOP.signum == signal.SIGTERM and seen == []
            with pytest.raises(Stopped):  # the same signal again: stop now
                signal.raise_signal(signal.SIGINT)
        STOP.pass_on()  # Python's own SIGINT handler, which would raise KeyboardInterrupt, is left out
        assert seen == [signal.SIGTERM, signal.SIGUSR2]
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_a_store_locked_mid_run_misses_nothing_once_it_answers_and_the_run_copies_to_another_store(tmp_path, store):
    uri, client = store
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "clrx", *STOPPABLE, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_until(process, lambda: any((run_dir / checkpoint.DIRECTORY).glob("step-*.pt")))
    # Another program holds the database: every write of the run fails (after SQLite's busy timeout).
    blocker = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    _wait_until(process, lambda: "stopped taking writes" in (run_dir / "__main__.log").read_text())
    blocker.execute("COMMIT")  # it answers again: the run's end replays what it missed
    blocker.close()
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert process.stderr.read() == ""

    [run] = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("lr", "momentum", "train_loss"):
        assert [step for step, _ in _points(client, run.info.run_id, key)] == list(range(STEPS)), key
    assert [step for step, _ in _points(client, run.info.run_id, "val_acc")] == [STEPS // 3, 2 * STEPS // 3, STEPS]

    other = f"sqlite:///{tmp_path / 'other.db'}"  # the same run, copied into another store from its journal
    for _ in range(2):  # twice: nothing is written twice
        sync_main([str(run_dir), "--tracking-uri", other])
    copies = MlflowClient(other)
    [copy] = copies.search_runs([copies.get_experiment_by_name("clrx").experiment_id])
    assert copy.info.status == "FINISHED" and copy.data.tags["clrx.synced_from"] == run.info.run_id
    assert copy.data.params["policy.max_lr"] == run.data.params["policy.max_lr"]
    for key in ("lr", "momentum", "train_loss", "val_acc", "best_val_acc"):
        assert _points(copies, copy.info.run_id, key) == _points(client, run.info.run_id, key), key


def test_a_server_down_mid_run_is_one_line_and_resume_completes_the_run(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "clrx", *STOPPABLE, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_until(process, lambda: any((run_dir / checkpoint.DIRECTORY).glob("step-*.pt")))
    os.killpg(server.pid, signal.SIGKILL)  # the server goes away at once, workers and all (no graceful last answers)
    server.wait(timeout=60)
    process.send_signal(signal.SIGTERM)  # stopped (or, on a fast machine, already at its end): either way
    [line] = process.communicate(timeout=300)[1].strip().splitlines()  # the store is gone: one line says so
    assert process.returncode == 2 and line.startswith(f"clrx: error: tracking.uri: the MLflow store {uri} "), line
    assert f"every point is kept in {run_dir / 'metrics.jsonl'}" in line

    server = start_mlflow_server(tmp_path, port)  # back, on the same database
    try:
        resume = [*args, "trainer.resume=auto"]
        done = subprocess.run(resume, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
        assert run.info.status == "FINISHED"
        for key in ("lr", "momentum", "train_loss"):
            assert [step for step, _ in _points(client, run.info.run_id, key)] == list(range(STEPS)), key
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
