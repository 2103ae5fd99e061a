"""Fine-tuning as fastai's ``fine_tune`` does it: the head and norm layers alone first, then everything.

``trainer.freeze_epochs=N`` holds every other parameter still for the first N epochs (no gradient,
so the optimizer leaves it and its state alone); the optimizer holds all groups from the start, so
unfreezing adds nothing mid-run. Whether a parameter is frozen is a function of the epoch: a run
resumed on either side of the unfreeze continues exactly. The policy runs twice, once over each
phase, as fastai's two ``fit_one_cycle`` calls do; a staged policy runs as configured instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from clrx.config.build import build_policy
from clrx.errors import ConfigError
from clrx.schedules.policies import Policy, Stages

# Normalization layers stay trainable while frozen (fastai's train_bn): their statistics must follow the new data.
NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
)


def frozen_parameters(model: torch.nn.Module) -> tuple[torch.nn.Parameter, ...]:
    """The parameters the frozen phase holds still: all but the classifier's (timm's ``get_classifier()``)
    and the normalization layers'."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Module) or not any(True for _ in head.parameters()):
        raise ConfigError(
            "trainer.freeze_epochs", f"needs a timm model whose get_classifier() has parameters; {type(model).__name__}"
        )
    kept = {id(param) for param in head.parameters()}
    kept |= {id(param) for module in model.modules() if isinstance(module, NORMS) for param in module.parameters()}
    return tuple(param for param in model.parameters() if id(param) not in kept)


def run_policy(
    node: DictConfig | Mapping[str, Any], steps_per_epoch: int, total_steps: int, freeze_epochs: int
) -> Policy:
    """The run's policy: with frozen epochs, the policy once over the frozen phase and once over the rest.

    A range test (``num_iter``) and a staged policy (``stages``) span the run as configured.
    """
    if not freeze_epochs or "stages" in node or "num_iter" in node:
        return build_policy(node, steps_per_epoch, total_steps)
    frozen = freeze_epochs * steps_per_epoch
    phases = (frozen, total_steps - frozen)
    return Stages(tuple((steps, build_policy(node, steps_per_epoch, steps)) for steps in phases))
