"""What MLflow's own machinery records about a run: its code and user, its data, its machine and its model.

clrx creates runs with ``MlflowClient``, not ``mlflow.start_run``, so the tags MLflow's run
context providers give a run (user, entry point, git commit), its dataset inputs, its system
metrics and its logged model are asked for here, each from MLflow's own code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

MODEL_NAME = "model"  # the logged model loads from runs:/<run id>/model
GIT_TAGS = {MLFLOW_GIT_COMMIT: get_git_commit, MLFLOW_GIT_BRANCH: get_git_branch, MLFLOW_GIT_REPO_URL: get_git_repo_url}


def context_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` over what ``mlflow.start_run`` would tag a run with here: ``mlflow.user``, ``mlflow.source.name``
    (the entry point), ``mlflow.source.git.commit`` (of the entry point's repository)...; clrx's own tags win.

    An entry point outside any repository (the ``clrx`` command in a virtual environment, a cluster's
    job launcher) gets the git tags of clrx's own checkout, if clrx runs from one.
    """
    resolved = resolve_tags(dict(tags))
    if MLFLOW_GIT_COMMIT not in resolved:
        code = str(Path(__file__).resolve().parents[1])
        found = {key: read(code) for key, read in GIT_TAGS.items()}
        resolved = {**{key: value for key, value in found.items() if value}, **resolved}
    return resolved


def dataset_inputs(name: str, source: str | None, splits: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list:
    """One MLflow dataset input per split (context ``training``, ``validation``...): ``name``, where it was
    read (``source``: a path; None: the code that made it), MLflow's digest of the contents, and their shapes.

    ``splits`` maps each context to (features, targets): images and labels, or file paths and labels.
    """
    inputs = []
    for context, (features, targets) in splits.items():
        with warnings.catch_warnings():  # MLflow registers its local-file source twice, then warns it is ambiguous
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_numpy(features, source=source, targets=targets, name=name)
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        inputs.append(DatasetInput(Dataset(**dataset.to_dict()), tags))
    return inputs


def system_monitor(client: MlflowClient, run_id: str, resume: bool) -> SystemMetricsMonitor:
    """MLflow's monitor of CPU, memory, disk, network and (with NVIDIA's NVML) GPU use, started for ``run_id``.

    It samples every 10 s (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` says otherwise) from its own
    thread and logs ``system/...`` metrics; a resumed run goes on from its last sample's step.
    """
    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=client.tracking_uri)
    monitor.start()
    return monitor


@contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """MLflow's module-level functions on ``uri`` for a moment: ``log_model`` reaches the store only through them.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; the variable is put back as it was.
    """
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def requirements() -> list[str]:
    """A logged model's pip requirements, pinned to what is installed: ``mlflow.pytorch``'s (torch and
    cloudpickle), and timm. Named, they are not inferred, which would load the model again in a new
    interpreter; read from the packages' metadata, without importing torch (``mlflow.pytorch`` does)."""
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    return [_get_pinned_requirement(package) for package in ("torch", "cloudpickle", "timm")]


def prepare_log_model() -> None:
    """What ``log_model``'s first call would do besides saving: load MLflow's model format, and let MLflow
    map the installed packages, which it does to check the requirements."""
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    import clrx.tracking.pt2  # noqa: F401

    warn_dependency_requirement_mismatches(requirements())


def log_model(
    client: MlflowClient,
    run_id: str,
    exported: Mapping[str, Any],
    metadata: Mapping[str, Any],
    step: int,
    register_as: str | None = None,
) -> Any:
    """The trained model, ``exported`` where it trained (``models.exported``: torch.export's program, an
    input example, the outputs on it), as the run's MLflow model ``model`` in ``mlflow.pytorch``'s pt2
    format (``pt2``), with the signature of the example and its outputs, ``metadata``, and the run's
    metrics at ``step``; registered as ``register_as`` if given. Nothing here loads torch.

    The logged model is created in the run's experiment first: ``Model.log`` without an active run
    would put it in the default experiment, where ``runs:/<id>/model`` does not find it.
    """
    from mlflow.models import Model, infer_signature

    from clrx.tracking import pt2

    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id, params=run.data.params
    )
    example = exported["input_example"]
    with _fluent_store(client.tracking_uri):
        return Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=pt2,
            model_id=logged.model_id,
            run_id=run_id,
            metadata=dict(metadata),
            registered_model_name=register_as,
            step=step,
            program=exported["program"],
            torch_version=exported["torch_version"],
            input_example=example,
            signature=infer_signature(example, exported["outputs"]),
            pip_requirements=requirements(),
            serialization_format="pt2",
            validate_serving_input=False,  # it loads the model again to run the example the signature came from
        )
