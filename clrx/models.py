"""timm models built for the dataset at hand."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch

from clrx.errors import ConfigError


def create_model(name: str, num_classes: int, in_chans: int, **kwargs: Any) -> torch.nn.Module:
    """Any timm architecture by name, its head and stem sized for the dataset.

    Extra settings (``drop_rate``, ``drop_path_rate``...) go to timm unchanged. Weights are never
    fetched from the network: models start from their random initialization.
    """
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "see timm.list_models() for names"
        raise ConfigError("name", f"{name!r} is not a timm model; {hint}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as error:
        if not kwargs:
            raise
        raise ConfigError(next(iter(kwargs), "name"), f"timm cannot build {name} with {kwargs}: {error}") from None
