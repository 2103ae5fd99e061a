"""Each run records its code, data, machine and model through MLflow's own API, read back with MLflow's client."""

import getpass
import json
import os
import shutil
import subprocess
import sys
import threading

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import timm
import torch

from clrx.data.datasets import imagefolder
from clrx.tracking.provenance import dataset_inputs
from tests.conftest import ROOT, main_in_process

QUICK = ("trainer.epochs=1", "trainer.batch_size=128", "trainer.log_every=11")


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, empty_store):
    """One short run started from a script in a fresh git repository, with every record switched on."""
    repo = tmp_path_factory.mktemp("project")
    (repo / "train.py").write_text("from clrx.__main__ import main\n\nmain()\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "train.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "train")
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    (repo / "mlflow.db").write_bytes(empty_store.read_bytes())
    env = {**os.environ, "CI": "true", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    records = ("tracking.log_model=true", "tracking.system_metrics=true", "tracking.register_as=digits_net")
    args = [*QUICK, *records, "hydra.run.dir=run"]
    done = subprocess.run(
        [sys.executable, "train.py", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    return repo, uri, client, run


def test_the_logged_model_predicts_as_the_trained_weights_do(tracked, monkeypatch):
    repo, uri, client, run = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    fresh = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    fresh.load_state_dict(torch.load(repo / "run" / "model.pt"))
    images = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = fresh.eval()(images)
        torch.testing.assert_close(logged(images), expected)
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(images.numpy())
    np.testing.assert_allclose(served, expected.numpy(), rtol=1e-5, atol=1e-5)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert info.metadata["timm_model"] == "test_resnet" and info.metadata["model_config"]["name"] == "test_resnet"
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 16, 16)
    (version,) = client.search_model_versions("name = 'digits_net'")
    assert version.run_id == run.info.run_id and version.source == f"models:/{info.model_id}"


def test_the_run_is_tagged_with_the_commit_user_and_entry_point_of_its_code(tracked):
    repo, _, _, run = tracked
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == _git(repo, "rev-parse", "HEAD")
    assert tags["mlflow.source.name"] == "train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.runName"].startswith("one_cycle-test_resnet-digits-")  # clrx's own name is kept


def test_a_run_started_outside_any_repository_carries_the_commit_of_clrxs_checkout(tmp_path, store):
    uri, client = store
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("clrx does not run from a git checkout here")
    script = (
        "from clrx.tracking.store import open_store, tracked_run\n"
        f"with tracked_run(open_store({uri!r}), 't', None, {{}}) as run:\n"
        "    print(run.run_id)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tags = client.get_run(done.stdout.split()[-1]).data.tags
    assert tags["mlflow.source.name"] == "-c" and tags["mlflow.source.git.commit"] == _git(ROOT, "rev-parse", "HEAD")


def test_the_data_is_a_dataset_input_per_split_with_its_source_and_sizes(tracked):
    _, _, _, run = tracked
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    train, val = inputs["training"], inputs["validation"]
    assert train.name == val.name == "digits" and train.digest != val.digest
    assert train.source_type == "local" and "digits.csv.gz" in train.source
    for dataset, key in ((train, "data.train_images"), (val, "data.val_images")):  # MLflow's profile: shapes
        assert json.loads(dataset.profile)["features_shape"] == [int(run.data.params[key]), 1, 16, 16]


def test_an_image_folder_is_digested_by_its_files_and_labels_wherever_it_lies(tmp_path, data_root):
    copy = shutil.copytree(data_root / "folder", tmp_path / "elsewhere")
    inputs = [
        dataset_inputs(data.name, data.source, data.contents())
        for data in (imagefolder(str(data_root / "folder"), num_workers=0), imagefolder(str(copy), num_workers=0))
    ]
    (train, val), (moved_train, moved_val) = ([i.dataset for i in pair] for pair in inputs)
    assert (train.digest, val.digest) == (moved_train.digest, moved_val.digest) and train.digest != val.digest
    assert train.source != moved_train.source and str(copy) in moved_train.source
    assert json.loads(train.profile)["targets_shape"] == [36] and json.loads(val.profile)["targets_shape"] == [12]
    (copy / "train" / "class0" / "0.jpg").rename(copy / "train" / "class1" / "renamed.jpg")
    relabeled = dataset_inputs("x", None, imagefolder(str(copy), num_workers=0).contents())[0].dataset
    assert relabeled.digest != train.digest


def test_system_metrics_are_sampled_while_the_run_lasts(tracked):
    _, _, client, run = tracked
    keys = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 1 and all(0 <= m.value <= 100 * os.cpu_count() for m in history)


def test_a_run_that_diverges_stops_its_system_monitor_and_ends_failed(tmp_path, store, monkeypatch, capsys):
    uri, client = store
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    status, stderr = main_in_process(
        *QUICK,
        "policy=fixed",
        "policy.lr=1e6",
        "tracking.system_metrics=true",
        f"tracking.uri={uri}",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 1 and "loss became" in stderr
    (run,) = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    assert run.info.status == "FAILED"
    assert not [thread for thread in threading.enumerate() if thread.name == "SystemMetricsMonitor"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["tracking.objective=accuracy"], "tracking.objective: must be one of best_val_acc (maximize), val_acc"),
        (["tracking.log_model=false", "tracking.register_as=net"], "tracking.register_as: needs tracking.log_model"),
    ],
)
def test_bad_tracking_settings_are_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    status, stderr = main_in_process(*args, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and stderr.strip().startswith(f"clrx: error: {expected}"), stderr
