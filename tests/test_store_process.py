"""A training command leaves MLflow to a process of its own: the run is the same, the training process never
loads MLflow, and a training process that dies leaves no run RUNNING and no process behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow.pytorch
import psutil
import pytest
import torch
from mlflow.models import Model

from clrx.config.build import instantiate
from clrx.config.schema import compose_run
from clrx.errors import ConfigError
from clrx.tracking.journal import read
from clrx.tracking.service import LOST, StoreProcess
from clrx.tracking.store import newest_finished_run
from tests.conftest import free_port, start_mlflow_server

ROOT = Path(__file__).resolve().parents[1]
SHORT = ("trainer.epochs=2", "dataset.limit_train=256", "dataset.limit_val=64", "trainer.progress=false")
# A script without a main guard, as users write them: the store's process must not run it again.
UNGUARDED = """
import sys, psutil
from clrx.__main__ import main
sys.argv = ["train.py", *sys.argv[1:]]
main()
print("loaded:", sorted(m for m in ("mlflow", "matplotlib", "sqlalchemy") if m in sys.modules))
print("children:", len(psutil.Process().children()))
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT), "CLRX_LOG_MODEL": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _store_processes(folder: Path) -> list[psutil.Process]:
    """Store processes started from ``folder`` that still run."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "clrx.tracking.service" in cmdline and process.info["cwd"] == str(folder):
            found.append(process)
    return found


def test_a_run_written_by_the_store_process_is_whole_and_the_training_process_never_loads_mlflow(tmp_path, store):
    uri, client = store
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED)
    done = subprocess.run(
        [sys.executable, str(script), *SHORT, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout and "children: 0" in done.stdout, done.stdout
    assert "Error executing job" not in done.stderr  # the script ran once

    [run] = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    assert run.info.status == "FINISHED"
    steps = int(run.data.metrics["steps"])
    for key in ("lr", "momentum", "train_loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(steps)), key
    assert run.data.tags["mlflow.source.name"] == "train.py"  # MLflow's own tags see the command, not the store's
    assert run.data.params["policy.max_lr"] and run.data.params["data.train_images"] == "256"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/schedule.png"}
    [logged] = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run.info.run_id]
    location = logged.artifact_location.removeprefix("file://")
    model = mlflow.pytorch.load_model(location)  # weights as trained: the saved model.pt
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    example = Model.load(location).load_input_example(location)  # validation images
    reference = _model_from(weights, run.data.params)
    with torch.no_grad():
        expected = reference(torch.from_numpy(example))
        assert torch.allclose(torch.as_tensor(model(torch.from_numpy(example))), expected, atol=1e-5)


def _model_from(weights: dict, params: dict) -> torch.nn.Module:
    """The run's model, built as its config says, with ``weights``."""
    model = instantiate(compose_run(*SHORT).model, "model", num_classes=int(params["data.num_classes"]), in_chans=1)
    model.load_state_dict(weights)
    return model.eval()


def test_a_killed_training_process_leaves_its_run_failed_and_no_store_process(tmp_path, store):
    uri, client = store
    helper = ROOT / "tests" / "helpers" / "killed_at_step.py"
    args = [sys.executable, str(helper), "5", *SHORT, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    deadline = time.monotonic() + 60
    while _store_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _store_processes(tmp_path)

    [run] = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["clrx.failure"] == LOST


def test_a_store_process_answers_queries_and_says_a_store_it_cannot_open_in_one_error(tmp_path, store):
    uri, client = store
    blocked = tmp_path / "file"
    blocked.write_text("")
    opened = StoreProcess(uri, 30, prepare_model=False)
    refused = StoreProcess(f"sqlite:///{blocked}/mlflow.db", 30, prepare_model=False)
    try:
        assert opened.ask(newest_finished_run, "clrx", "a", "b") is None
        with pytest.raises(ConfigError, match=r"^tracking\.uri: cannot open MLflow store"):
            refused.ask(newest_finished_run, "clrx", "a", "b")
    finally:
        opened.close()
        refused.close()


def _niceness(task: Path) -> int:
    return int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])  # field 19: nice


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads' niceness from /proc")
def test_every_thread_of_the_store_process_yields_the_cores_to_training(tmp_path, store):
    uri, client = store
    process = StoreProcess(uri, 30, prepare_model=False)
    try:
        with process.run("clrx", "niced", {}) as tracker:
            tracker.metric("loss", 1.0, 0)
            tracker.sync()  # its writer thread has started and written
            [child] = [p for p in psutil.Process().children() if "clrx.tracking.service" in " ".join(p.cmdline())]
            tasks = list(Path(f"/proc/{child.pid}/task").iterdir())
            assert len(tasks) >= 3  # the main thread, the reader, the writer (and the preparing thread)
            assert {_niceness(task) for task in tasks} == {19}
            assert _niceness(Path("/proc/self")) == os.nice(0)  # the training process keeps its own
        assert client.get_metric_history(tracker.run_id, "loss")[0].value == 1.0
    finally:
        process.close()


def test_with_on_failure_stop_a_store_gone_mid_run_stops_training_in_one_line_with_every_point_kept(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    run_dir, epochs = tmp_path / "run", 200
    args = [sys.executable, "-m", "clrx", f"trainer.epochs={epochs}", "trainer.checkpoint_every=5"]
    args += ["trainer.save_model=false", "tracking.on_failure=stop", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not any((run_dir / "checkpoints").glob("step-*.pt")):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server goes away at once
        server.wait(timeout=60)
    [line] = process.communicate(timeout=300)[1].decode().strip().splitlines()
    assert process.returncode == 2, line
    assert line.startswith(f"clrx: error: tracking.uri: the MLflow store {uri} stopped taking writes ("), line
    assert f"every point is kept in {run_dir / 'metrics.jsonl'}" in line
    taken = sorted(point[3] for point in read(run_dir / "metrics.jsonl").points if point[0] == "lr")
    assert taken == list(range(len(taken))) and len(taken) < epochs * (1438 // 64)  # stopped, nothing lost


def test_a_deleted_experiment_is_one_line_before_any_training(tmp_path, store):
    uri, client = store
    gone = client.create_experiment("gone")
    client.delete_experiment(gone)
    args = [sys.executable, "-m", "clrx", *SHORT, "tracking.experiment=gone", f"tracking.uri={uri}"]
    done = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"clrx: error: tracking.experiment: experiment 'gone' is deleted in {uri}; restore it (MLFLOW_TRACKING_URI="
        f"{uri} mlflow experiments restore --experiment-id {gone})"
        " or choose another"
    ], done.stderr
    assert not list((tmp_path / "outputs").glob("*/*/checkpoints"))
    restored = subprocess.run(
        [sys.executable, "-m", "mlflow", "experiments", "restore", "--experiment-id", gone],
        env={**_env(), "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
    )
    assert restored.returncode == 0, restored.stderr  # the command the line gives works
    assert client.get_experiment_by_name("gone").lifecycle_stage == "active"
    assert client.search_runs([client.get_experiment_by_name("gone").experiment_id]) == []


def test_a_run_the_store_cannot_create_is_raised_at_the_next_record_and_nothing_is_left(tmp_path, store):
    uri, client = store
    process = StoreProcess(uri, 30, prepare_model=False)
    try:
        refused = {"mlflow.runName": "other"}  # MLflow refuses a run named twice, differently
        with (
            pytest.raises(RuntimeError, match=r"(?s)^in the store's process: .*'mlflow.runName' tag"),
            process.run("t", "one", refused, journal=tmp_path / "metrics.jsonl") as tracker,
        ):
            for step in range(600):  # training goes on while the run is created; a minute at most
                tracker.metric("loss", 1.0, step)
                time.sleep(0.1)
        assert step < 600
        assert client.search_runs([client.get_experiment_by_name("t").experiment_id]) == []
    finally:
        process.close()
    assert process._process.returncode == 0  # ended when told, after what it had to do


def test_a_run_starts_when_the_training_process_asked_for_it_however_late_the_store_process_creates_it(store):
    uri, client = store
    process = StoreProcess(uri, 30, prepare_model=False)  # importing MLflow there takes a second or more
    try:
        asked = int(time.time() * 1000)
        with process.run("clrx", "prompt", {}) as tracker:
            tracker.metric("loss", 1.0, 0)
        run = client.get_run(tracker.run_id)
        created = client.get_metric_history(tracker.run_id, "loss")[0].timestamp
    finally:
        process.close()
    assert asked <= run.info.start_time <= created < asked + 500
