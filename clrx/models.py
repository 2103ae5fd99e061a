"""timm models built for the dataset at hand, plus the small-image ResNets of the CIFAR literature."""

from __future__ import annotations

import difflib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.models import load_state_dict, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch.export import Dim

from clrx.errors import ConfigError, one_line

log = logging.getLogger("clrx")


def _cifar_stem(model: torch.nn.Module, in_chans: int) -> None:
    """A 3x3, stride-1 first convolution and no max-pool: 32x32 images keep their resolution."""
    if not isinstance(model, ResNet):
        raise ConfigError("cifar_stem", f"is for timm ResNets, not {type(model).__name__}")
    model.conv1 = torch.nn.Conv2d(in_chans, model.bn1.num_features, 3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """He et al.'s CIFAR ResNet-56: three stages of nine basic blocks, 16/32/64 channels, 3x3 stem."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = ResNet(BasicBlock, [9, 9, 9], channels=(16, 32, 64), stem_type="deep", stem_width=8, **kwargs)
    _cifar_stem(model, kwargs.get("in_chans", 3))
    model.layer4 = torch.nn.Identity()  # timm's ResNet has four stages; this one has three
    return model


def _load_local(model: torch.nn.Module, path: str) -> None:
    """Weights from a local file (timm/torch state dict or safetensors); layers whose shape differs stay new."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("pretrained", f"{file} is not a file; give the path of local weights (never downloaded)")
    try:
        weights = load_state_dict(str(file))
    except Exception as error:
        raise ConfigError("pretrained", f"cannot read weights from {file}: {str(error).splitlines()[0]}") from None
    own = model.state_dict()
    usable = {key: value for key, value in weights.items() if key in own and own[key].shape == value.shape}
    if not usable:
        raise ConfigError("pretrained", f"no weights in {file} fit {type(model).__name__}")
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(own) - set(usable))
    log.info("loaded %d tensors from %s; new: %s", len(usable), file, ", ".join(fresh) or "none")


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: str | None = None,
    cifar_stem: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """Any timm architecture by name, its head and stem sized for the dataset.

    Extra settings (``drop_rate``, ``drop_path_rate``...) go to timm unchanged. Weights never come
    from the network: ``pretrained`` names a local file; without it the model starts at random.
    ``cifar_stem`` gives a ResNet the 3x3 stride-1 stem without max-pool used for 32x32 images.
    """
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "see timm.list_models() for names"
        raise ConfigError("name", f"{name!r} is not a timm model; {hint}")
    for key, value in kwargs.items():
        if key.endswith("drop_rate") and not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ConfigError(key, f"is a probability: must be in [0, 1), got {value!r}")
    if pretrained is not None and not isinstance(pretrained, str):
        raise ConfigError("pretrained", f"must be the path of a local weights file or null, got {pretrained!r}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as error:
        if not kwargs:
            raise
        raise ConfigError(next(iter(kwargs), "name"), f"timm cannot build {name} with {kwargs}: {error}") from None
    if cifar_stem:
        _cifar_stem(model, in_chans)
    if pretrained is not None:
        _load_local(model, pretrained)
    return model


def exported(model: torch.nn.Module, example: np.ndarray) -> dict[str, Any] | None:
    """What the run's MLflow model holds of ``model`` (``clrx.tracking.pt2`` writes it), made where torch
    and the model's code are loaded already: ``torch.export``'s program for inputs like ``example``
    with the batch dimension free, as ``mlflow.pytorch`` exports it, saved as bytes; the outputs on
    ``example`` (the signature's); torch's version.

    None, with a warning, for a model ``torch.export`` cannot trace: a run does not fail for it.
    """
    inputs = (torch.from_numpy(example),)
    try:
        with torch.no_grad():
            outputs = model(*inputs)
        program = torch.export.export(model, inputs, dynamic_shapes=[{0: Dim.AUTO}])
    except Exception as error:
        log.warning("tracking.log_model: the model was not logged: torch.export cannot trace it: %s", one_line(error))
        return None
    saved = io.BytesIO()
    torch.export.save(program, saved)
    return {
        "program": saved.getvalue(),
        "outputs": outputs.numpy(),
        "input_example": example,
        "torch_version": str(torch.__version__),
    }
