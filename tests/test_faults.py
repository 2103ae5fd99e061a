"""Nothing is lost when something goes wrong: runs that start together, a job that is stopped, a store that fails."""

import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

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
