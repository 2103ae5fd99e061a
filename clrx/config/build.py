"""Turn config nodes into objects, rejecting bad settings before any work starts.

Every group node names its ``_target_``; its keys are checked against the target's signature so
that a typo fails with the full key and the allowed names, not deep inside a constructor.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from timm.optim import param_groups_weight_decay

from clrx.config.schema import IN_EPOCHS
from clrx.errors import ConfigError
from clrx.param_groups import param_groups
from clrx.schedules.policies import Policy

OPTIMIZER_FRACTIONS = ("momentum", "alpha", "rho")


def settings_of(node: DictConfig | dict[str, Any], group: str) -> dict[str, Any]:
    """A node's settings as plain values; a mandatory one left unset (``???``) is a ConfigError."""
    if not isinstance(node, DictConfig):
        return dict(node)
    for key in sorted(OmegaConf.missing_keys(node)):  # full keys when the node sits in a larger config
        key = key if key.startswith(f"{group}.") else f"{group}.{key}"
        raise ConfigError(key, f"has no value; set it on the command line, e.g. {key}=...")
    return OmegaConf.to_container(node, resolve=True)


def _target(group: str, settings: dict[str, Any]) -> Any:
    path = settings.pop("_target_", None)
    if not isinstance(path, str):
        raise ConfigError(f"{group}._target_", "must name the class or function to build")
    try:
        target = get_object(path)
    except Exception:
        raise ConfigError(f"{group}._target_", f"cannot import {path!r}") from None
    if not callable(target):
        raise ConfigError(f"{group}._target_", f"{path!r} is a {type(target).__name__}, not a class or function")
    return target


def instantiate(
    node: DictConfig | dict[str, Any],
    group: str,
    defaults: dict[str, Any] | None = None,
    **runtime: Any,
) -> Any:
    """Build ``node``'s target with its settings plus ``runtime`` arguments.

    ``defaults`` fill parameters the target accepts and the config leaves unset (or null), such
    as the run's total number of steps. ConfigErrors from the target gain the group prefix.
    """
    settings = settings_of(node, group)
    target = _target(group, settings)
    params = inspect.signature(target).parameters
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [name for name, p in params.items() if name not in runtime and p.kind not in variadic]
    for key in settings:
        if key in runtime:
            raise ConfigError(f"{group}.{key}", f"is set by clrx at run time ({_runtime_owner(key)})")
        if not open_ended and key not in params:
            raise ConfigError(
                f"{group}.{key}", f"is not a setting of {target.__name__}; settings: {', '.join(allowed)}"
            )
    for key, value in (defaults or {}).items():
        if key in params and settings.get(key) is None:
            settings[key] = value
    try:
        return target(**settings, **runtime)
    except ConfigError as error:
        raise error.within(group) from None


def _runtime_owner(key: str) -> str:
    return "the policy sets it each step" if key == "lr" else "derived from the dataset and run"


def _epochs_to_steps(
    settings: dict[str, Any], name: str, in_epochs: str, group: str, steps_per_epoch: int, least: int = 1
) -> None:
    """Replace the length ``in_epochs`` by ``name`` in optimizer steps (at least ``least``)."""
    epochs = settings.pop(in_epochs, None)
    if epochs is None:
        return
    if settings.get(name) is not None:
        raise ConfigError(f"{group}.{name}", f"give {name} or {in_epochs}, not both")
    number = isinstance(epochs, (int, float)) and not isinstance(epochs, bool)
    if not (number and (epochs > 0 if least else epochs >= 0)):
        raise ConfigError(
            f"{group}.{in_epochs}", f"must be a {'positive number' if least else 'number >= 0'}, got {epochs!r}"
        )
    settings[name] = max(least, round(epochs * steps_per_epoch))


def build_policy(
    node: DictConfig | dict[str, Any], steps_per_epoch: int, total_steps: int, group: str = "policy"
) -> Policy:
    """The configured policy; lengths given in epochs become optimizer steps.

    A node with ``stages`` builds each stage's policy for that stage's length (``steps`` or
    ``epochs``; the last stage's length defaults to the rest of the run).
    """
    settings = settings_of(node, group)
    if "stages" not in settings:
        for name, (in_epochs, least) in IN_EPOCHS.items():
            _epochs_to_steps(settings, name, in_epochs, group, steps_per_epoch, least)
        return instantiate(settings, group, defaults={"total_steps": total_steps, "num_iter": total_steps})
    stages, start = [], 0
    entries = settings["stages"]
    if not isinstance(entries, list) or not entries or not all(isinstance(stage, dict) for stage in entries):
        problem = f"must be a list of stages, each {{steps or epochs, policy}}; got {entries!r}"
        raise ConfigError(f"{group}.stages", problem)
    for index, stage in enumerate(entries):
        key, stage = f"{group}.stages[{index}]", dict(stage)
        unknown = set(stage) - {"steps", "epochs", "policy"}
        if unknown:
            raise ConfigError(f"{key}.{min(unknown)}", "is not a stage setting; settings: steps, epochs, policy")
        _epochs_to_steps(stage, "steps", "epochs", key, steps_per_epoch)
        if stage.get("steps") is None:
            if index < len(entries) - 1:
                raise ConfigError(f"{key}.steps", "every stage but the last needs a length: steps or epochs")
            stage["steps"] = max(1, total_steps - start)
        if not isinstance(stage.get("policy"), dict):
            raise ConfigError(f"{key}.policy", "each stage needs a policy node with a _target_")
        stages.append((stage["steps"], build_policy(stage["policy"], steps_per_epoch, stage["steps"], f"{key}.policy")))
        start += stage["steps"] if isinstance(stage["steps"], int) else 0
    return instantiate({"_target_": settings["_target_"]}, group, stages=tuple(stages))


def build_optimizer(node: DictConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The configured torch optimizer for ``model``, its fractions and weight decay checked first.

    ``decay_bias_and_norm: false`` exempts biases and normalization weights (every parameter
    with fewer than two dimensions) from weight decay, as timm's helper sorts them. ``layer_decay``
    and ``lr_mult`` give groups their own LR scales (``clrx.param_groups``).
    """
    settings = settings_of(node, "optimizer")
    for key in OPTIMIZER_FRACTIONS:
        value = settings.get(key)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ConfigError(f"optimizer.{key}", f"must be in [0, 1), got {value!r}")
    for index, value in enumerate(settings.get("betas") or ()):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ConfigError(f"optimizer.betas[{index}]", f"must be in [0, 1), got {value!r}")
    if settings.get("nesterov") and not (settings.get("momentum") or 0) > 0:
        raise ConfigError("optimizer.nesterov", "needs optimizer.momentum above 0; set a momentum or nesterov=false")
    decay = settings.get("weight_decay")
    if decay is not None and not (isinstance(decay, (int, float)) and decay >= 0):
        raise ConfigError("optimizer.weight_decay", f"must be a number >= 0, got {decay!r}")
    every = settings.pop("decay_bias_and_norm", True)
    if not isinstance(every, bool):
        raise ConfigError("optimizer.decay_bias_and_norm", f"must be true or false, got {every!r}")
    layer_decay, lr_mult = settings.pop("layer_decay", None), settings.pop("lr_mult", None)
    if layer_decay is not None or lr_mult is not None:
        groups = param_groups(model, decay, every, layer_decay, lr_mult)
        return instantiate(settings, "optimizer", params=groups, lr=lr)
    if every or not decay:
        return instantiate(settings, "optimizer", params=model.parameters(), lr=lr)
    groups = param_groups_weight_decay(model, settings.pop("weight_decay"))
    return instantiate(settings, "optimizer", params=groups, lr=lr)
