"""Shared fixtures: a fresh SQLite MLflow store per test and a way to run the real CLI."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import settings
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from clrx.__main__ import main as clrx_main
from clrx.config.schema import register
from clrx.tracking.store import PARENT_FILE
from clrx.tracking.sweep import register_sweeps
from tests.datafiles import write_all

ROOT = Path(__file__).resolve().parents[1]
# `make test` runs the suite on pytest-xdist workers that share the cores: each worker, and every process it
# starts, takes its share of threads (read by torch at import), or the threads of one worker's step wait on another's.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# Drawn cases per property; `make mutate` runs the same properties on fewer, fixed draws per mutant.
settings.register_profile("suite", max_examples=150)
settings.register_profile("mutation", max_examples=30, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))
os.environ["CLRX_LOG_MODEL"] = "false"  # seconds a run; the tests of the logged model turn it on
register()
register_sweeps()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty, fully migrated SQLite store, made once: creating the schema takes seconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Small files in every dataset format: CIFAR-10/100, MNIST, Fashion-MNIST, and an image folder (``folder``)."""
    return write_all(tmp_path_factory.mktemp("data"))


@pytest.fixture
def store(tmp_path, empty_store):
    """(tracking URI, client) of an empty SQLite store at ``mlflow.db`` in the test's folder."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def main_in_process(*args: str, monkeypatch, capsys) -> tuple[int, str]:
    """``python -m clrx ARGS`` through the same entry point, without a new interpreter."""
    monkeypatch.setattr(sys, "argv", ["clrx", *args])
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        clrx_main()
        status = 0
    except SystemExit as exited:
        status = exited.code
    return status, capsys.readouterr().err


def sweep_family(client: MlflowClient, sweep_dir: Path) -> tuple:
    """A sweep's parent run and its children in job order, found through the sweep folder."""
    parent = (sweep_dir / PARENT_FILE).read_text().strip()
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", run_view_type=ViewType.ALL)
    return client.get_run(parent), sorted(runs, key=lambda r: int(r.data.tags["clrx.job"]))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "clrx", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:``port`` over ``folder/server.db``, once it answers."""
    args = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art")]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *args],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers stop with it (os.killpg)
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(0.5)
