"""Writing a policy's values into an optimizer's param groups."""

from __future__ import annotations

import torch

from clrx.schedules.policies import Hyper


def momentum_name(optimizer: torch.optim.Optimizer) -> str | None:
    """What the optimizer's momentum is called: ``beta1`` (Adam-like), ``momentum`` or None."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return "beta1"
    return "momentum" if "momentum" in group else None


def apply_hyper(optimizer: torch.optim.Optimizer, hyper: Hyper) -> None:
    """Set lr (times a group's ``lr_scale``, timm's per-group multiplier) and momentum or beta1."""
    for group in optimizer.param_groups:
        group["lr"] = hyper.lr * group.get("lr_scale", 1.0)
        if hyper.momentum is None:
            continue
        if "betas" in group:
            group["betas"] = (hyper.momentum, *group["betas"][1:])
        else:
            group["momentum"] = hyper.momentum


def applied_momentum(optimizer: torch.optim.Optimizer) -> float | None:
    """The momentum (or beta1) the first param group will use on its next step."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return group["betas"][0]
    return group.get("momentum")
