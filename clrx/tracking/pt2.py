"""An MLflow flavor that writes ``mlflow.pytorch``'s pt2 model from a program ``torch.export`` made elsewhere.

``mlflow.pytorch.save_model`` exports the module itself, so whatever calls it loads torch, the
model's code (timm, torchvision) and ``torch.export``: seconds of a core at a run's end. The
training process has all of them loaded and exports the model there; the store's process, which
never loads torch, writes the program's bytes with what ``save_model`` writes beside them. The
result is ``mlflow.pytorch``'s own (flavors, signature, input example, environment files), so
``mlflow.pytorch.load_model`` and ``mlflow.pyfunc.load_model`` load it as they load theirs.
``Model.log(flavor=pt2, ...)`` logs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_pip_requirements,
    _PythonEnv,
)
from mlflow.utils.file_utils import get_total_file_size, write_to
from mlflow.utils.model_utils import _validate_and_prepare_target_save_path

FLAVOR = "mlflow.pytorch"  # the module that loads the model
DATA = "data"  # where mlflow.pytorch keeps the program
PROGRAM = "model.pt2"
PICKLE_MODULE = "mlflow.pytorch.pickle_module"  # what mlflow.pytorch records, though a pt2 model unpickles nothing


def save_model(
    path: str,
    mlflow_model: Model,
    program: bytes,
    torch_version: str,
    input_example: Any,
    signature: ModelSignature,
    pip_requirements: list[str],
    **_: Any,  # what Model.log passes every flavor (serialization_format, validate_serving_input)
) -> None:
    """``program`` (``torch.export.save``'s bytes of a model exported on ``input_example`` with its
    batch dimension free, by torch ``torch_version``) as ``mlflow.pytorch.save_model(...,
    serialization_format="pt2")`` saves it at ``path``."""
    _validate_and_prepare_target_save_path(path)
    _save_example(mlflow_model, input_example, path)
    mlflow_model.signature = signature
    os.makedirs(os.path.join(path, DATA))
    Path(path, DATA, PROGRAM).write_bytes(program)
    mlflow_model.add_flavor("pytorch", model_data=DATA, pytorch_version=torch_version, code=None)
    pyfunc.add_to_model(
        mlflow_model,
        loader_module=FLAVOR,
        data=DATA,
        pickle_module_name=PICKLE_MODULE,
        code=None,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        model_config={"device": None},
    )
    mlflow_model.model_size_bytes = get_total_file_size(path)
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))
    conda_env, requirements, constraints = _process_pip_requirements(None, pip_requirements, None)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as file:
        yaml.safe_dump(conda_env, stream=file, default_flow_style=False)
    if constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
