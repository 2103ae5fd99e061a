"""Per-group learning rates: timm's layer-wise decay and multipliers by parameter name.

Each param group carries a ``name`` and timm's ``lr_scale``; the policy's LR is the top group's
(scale 1.0) and every other group gets it times its scale, so a schedule or a range test moves
all groups together with their ratios kept. Groups are ordered top group first: what a run
records as ``lr`` (the first group's) is the policy's LR.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay

from clrx.errors import ConfigError
from clrx.tracking.store import PARAM_VALUE_LIMIT

EXAMPLES = 3  # parameter names shown per group in the table


def _layer_scales(model: torch.nn.Module, layer_decay: float) -> dict[str, tuple[str, float]]:
    """Each parameter's (``layer_<i>``, scale) as timm's ``param_groups_layer_decay`` assigns them."""
    if not hasattr(model, "group_matcher"):
        raise ConfigError(
            "optimizer.layer_decay", f"needs a timm model with group_matcher(); {type(model).__name__} has none"
        )
    if not (isinstance(layer_decay, (int, float)) and 0 < layer_decay <= 1):
        raise ConfigError(
            "optimizer.layer_decay", f"must be in (0, 1] such as 0.75, or null (off), got {layer_decay!r}"
        )
    layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)  # the grouping timm uses
    scales = {
        id(param): group["lr_scale"]
        for group in param_groups_layer_decay(model, weight_decay=0.0, layer_decay=layer_decay)
        for param in group["params"]
    }
    return {name: (f"layer_{layers[name]}", scales[id(param)]) for name, param in model.named_parameters()}


def matches(pattern: str, name: str) -> bool:
    """An fnmatch glob over parameter names that also takes everything under a module: ``layer4`` matches
    ``layer4.0.conv1.weight``, ``*`` matches all, ``layer[34]`` layer3 and layer4."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"{pattern}.*")


def _multipliers(model: torch.nn.Module, lr_mult: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
    """Each parameter's (group name, multiplier) by the first pattern of ``lr_mult`` that matches it
    (``rest``, 1.0 where none does); a pattern that takes no parameter is refused."""
    if not isinstance(lr_mult, Mapping) or not lr_mult:
        raise ConfigError("optimizer.lr_mult", f"must map parameter-name patterns to multipliers, got {lr_mult!r}")
    for pattern, mult in lr_mult.items():
        if not (isinstance(mult, (int, float)) and not isinstance(mult, bool) and mult > 0):
            raise ConfigError(f"optimizer.lr_mult.{pattern}", f"must be a positive multiplier, got {mult!r}")
    names = [name for name, _ in model.named_parameters()]
    first = {name: next((str(p) for p in lr_mult if matches(str(p), name)), None) for name in names}
    for pattern in lr_mult:
        if str(pattern) not in first.values():
            raise ConfigError(
                "optimizer.lr_mult",
                f"pattern {pattern!r} matches no parameter (or only ones an earlier pattern takes); "
                f"names look like {', '.join(names[:2])}, ..., {names[-1]}",
            )
    labels: dict[str, str] = {}
    for index, pattern in enumerate(map(str, lr_mult)):
        label = metric_name(pattern)
        labels[pattern] = f"{label}_{index}" if label in labels.values() else label
    return {name: ("rest", 1.0) if p is None else (labels[p], float(lr_mult[p])) for name, p in first.items()}


def metric_name(pattern: str) -> str:
    """A pattern as a group name MLflow takes in ``lr/<group>``: ``layer[34]`` is layer_34, ``*`` all."""
    return re.sub(r"[^\w.-]+", "_", pattern).strip("_.") or "all"


def param_groups(
    model: torch.nn.Module,
    weight_decay: float | None,
    decay_bias_and_norm: bool,
    layer_decay: float | None,
    lr_mult: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """Param groups with ``name`` and ``lr_scale`` (layer scale times multiplier), top group first.

    Without ``decay_bias_and_norm`` a group's biases and normalization weights (fewer than two
    dimensions) go to a twin group of the same name and scale without weight decay.
    """
    parts = [
        part
        for part in (
            layer_decay is not None and _layer_scales(model, layer_decay),
            lr_mult is not None and _multipliers(model, lr_mult),
        )
        if part
    ]
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        label = "/".join(part[name][0] for part in parts)
        scale = 1.0
        for part in parts:
            scale *= part[name][1]
        exempt = not decay_bias_and_norm and bool(weight_decay) and param.ndim <= 1
        group = groups.setdefault((label, exempt), {"name": label, "lr_scale": scale, "params": []})
        if exempt:
            group["weight_decay"] = 0.0
        group["params"].append(param)
    top = max(group["lr_scale"] for group in groups.values())
    if top != 1.0:
        setting = "optimizer.lr_mult" if lr_mult is not None else "optimizer.layer_decay"
        raise ConfigError(
            setting,
            f"the largest group scale must be 1.0 (the policy's LR is the top group's), got {top:g}; "
            "scale the policy's LRs instead",
        )
    return sorted(groups.values(), key=lambda group: -group["lr_scale"])


def table(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[dict[str, Any]]:
    """One row per named group: its scale, how many parameter tensors and values it holds, and example names."""
    names = {id(param): name for name, param in model.named_parameters()}
    rows: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        if "name" not in group:
            continue
        row = rows.setdefault(
            group["name"],
            {"group": group["name"], "scale": group["lr_scale"], "tensors": 0, "values": 0, "examples": []},
        )
        row["tensors"] += len(group["params"])
        row["values"] += sum(param.numel() for param in group["params"])
        row["examples"] = (row["examples"] + [names[id(param)] for param in group["params"]])[:EXAMPLES]
    return list(rows.values())


def scales(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each named group's LR scale (groups split only by weight decay share one)."""
    return {group["name"]: group["lr_scale"] for group in optimizer.param_groups if "name" in group}


def log_table(tracker: Any, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """The groups as an MLflow param (``param_groups``: name=scale, ...) and as ``param_groups.json``."""
    rows = table(optimizer, model)
    if not rows:
        return
    summary = ", ".join(f"{row['group']}={row['scale']:g}" for row in rows)
    tracker.params({"param_groups": summary[:PARAM_VALUE_LIMIT]})
    tracker.text(json.dumps(rows, indent=2) + "\n", "param_groups.json")
