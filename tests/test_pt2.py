"""The logged model is exported where it trained and written by a process without torch, as mlflow.pytorch writes it."""

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import timm
import torch
import yaml
from mlflow.models import Model, infer_signature

from clrx.models import exported
from clrx.tracking import pt2
from clrx.tracking.provenance import requirements
from tests.conftest import ROOT

# A process that has not loaded torch prepares and logs the model from what the training process sent, as the
# store's process does, then says whether that loaded torch.
LOG_WITHOUT_TORCH = """
import pickle, sys
from mlflow import MlflowClient
from clrx.tracking.provenance import log_model, prepare_log_model
prepare_log_model()
client = MlflowClient(sys.argv[1])
run = client.create_run(client.create_experiment("logged"))
with open(sys.argv[2], "rb") as file:
    exported = pickle.load(file)
log_model(client, run.info.run_id, exported, {"timm_model": "test_resnet"}, step=3, register_as="net")
client.set_terminated(run.info.run_id)
print(run.info.run_id, "torch" in sys.modules)
"""


@pytest.fixture(scope="module")
def net():
    return timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()


@pytest.fixture(scope="module")
def example():
    return np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)


def _files(path: Path) -> set[str]:
    return {str(file.relative_to(path)) for file in path.rglob("*") if file.is_file()}


def test_the_model_is_saved_as_mlflow_pytorch_saves_it_in_pt2(tmp_path, net, example):
    made = exported(net, example)
    signature = infer_signature(example, made["outputs"])
    metadata = {"timm_model": "test_resnet"}
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    mlflow.pytorch.save_model(
        net,
        theirs,
        input_example=example,
        signature=signature,
        pip_requirements=requirements(),
        metadata=metadata,
        serialization_format="pt2",
    )
    pt2.save_model(
        str(ours),
        Model(metadata=metadata),
        program=made["program"],
        torch_version=made["torch_version"],
        input_example=example,
        signature=signature,
        pip_requirements=requirements(),
    )
    assert _files(ours) == _files(theirs)
    for name in _files(theirs) - {"MLmodel", "data/model.pt2"}:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    described = [yaml.safe_load((folder / "MLmodel").read_text()) for folder in (ours, theirs)]
    for record in described:
        for varies in ("model_uuid", "utc_time_created", "model_size_bytes"):
            record.pop(varies)
    assert described[0] == described[1]
    images = torch.randn(5, 1, 16, 16)  # another batch size: the batch dimension is free in both
    with torch.no_grad():
        expected = net(images)
        torch.testing.assert_close(mlflow.pytorch.load_model(str(ours))(images), expected)
    served = mlflow.pyfunc.load_model(str(ours)).predict(images.numpy())
    np.testing.assert_allclose(served, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_the_requirements_are_mlflow_pytorchs_and_timm_pinned_to_the_installed_versions():
    assert requirements() == [*mlflow.pytorch.get_default_pip_requirements(), f"timm=={timm.__version__}"]


def test_a_process_without_torch_logs_the_model_that_loads_and_predicts(tmp_path, store, net, example, monkeypatch):
    uri, client = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    made = tmp_path / "exported.pkl"
    made.write_bytes(pickle.dumps(exported(net, example)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", LOG_WITHOUT_TORCH, uri, str(made)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id, loaded_torch = done.stdout.split()
    assert loaded_torch == "False"
    (output,) = client.get_run(run_id).outputs.model_outputs
    assert output.step == 3
    logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(logged(images), net(images))
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.metadata == {"timm_model": "test_resnet"} and info.flavors["pytorch"]["model_data"] == "data"
    (version,) = client.search_model_versions("name = 'net'")
    assert version.run_id == run_id


def test_a_model_torch_export_cannot_trace_is_a_warning(example, caplog):
    class Branching(torch.nn.Module):
        def forward(self, images):
            return images if images.sum() > 0 else -images  # which branch depends on the data

    with caplog.at_level(logging.WARNING, logger="clrx"):
        assert exported(Branching(), example) is None
    assert "tracking.log_model: the model was not logged: torch.export cannot trace it" in caplog.text
