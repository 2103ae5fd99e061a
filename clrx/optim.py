"""Optimizers that keep their own step size or average: schedule-free SGD and AdamW, and Prodigy.

Schedule-free optimizers (arXiv 2405.15682) take gradients at one point (y) and evaluate another,
an average (x), so they are switched to ``eval()`` for evaluation and checkpoints; their average
assumes the LR stops changing after warm-up. Prodigy (arXiv 2306.06101) scales the LR by its own
estimate ``d``, so what a step really uses is ``d x lr``.
"""

from __future__ import annotations

import torch
from prodigyopt import Prodigy

from clrx.errors import ConfigError
from clrx.schedules.policies import WSD, Cosine, Fixed, LRRange, Policy

CONSTANT = (
    "keep their own average and need a constant LR after warm-up; use policy=fixed or policy=wsd with decay_frac=0"
)
# Prodigy's authors pair it with no schedule or a cosine one; a cycle would fight its estimate of d.
PRODIGY = "estimates its own LR and takes a warm-up, then a constant or falling one; use policy=fixed, wsd or cosine"


class CappedProdigy(Prodigy):
    """Prodigy whose estimate ``d`` never exceeds ``d_limit`` (None: no limit), so ``d x lr`` is bounded."""

    def __init__(self, params, d_limit: float | None = None, **settings) -> None:
        if d_limit is not None and not d_limit > 0:
            raise ConfigError("d_limit", f"must be a positive number or null (no limit), got {d_limit!r}")
        super().__init__(params, **settings)
        self.d_limit = d_limit

    def step(self, closure=None):
        loss = super().step(closure)
        if self.d_limit is not None:
            for group in self.param_groups:
                group["d"] = min(group["d"], self.d_limit)
        return loss


def schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is one of schedule-free's, which switch between training and evaluated weights."""
    return "train_mode" in optimizer.param_groups[0]


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR the next step uses: the group's ``lr``, times Prodigy's (or D-Adaptation's) ``d`` where it has one."""
    group = optimizer.param_groups[0]
    return group["lr"] * group.get("d", 1.0)


def check_policy(optimizer: torch.optim.Optimizer, policy: Policy | type[Policy], group: str = "policy") -> None:
    """Refuse a schedule that fights the optimizer's own: a changing LR after warm-up for schedule-free optimizers
    (a range test is a probe, not a schedule), a cycle or a range test for Prodigy, which sets the LR itself.

    ``policy`` may be a class only, before automatic bounds are known: its kind is checked, not its settings.
    """
    kind = policy if isinstance(policy, type) else type(policy)
    if schedule_free(optimizer):
        constant = issubclass(kind, WSD) and (isinstance(policy, type) or policy.decay_frac == 0)
        if not (issubclass(kind, (Fixed, LRRange)) or constant):
            raise ConfigError(group, f"schedule-free optimizers {CONSTANT}; got {kind.__name__}")
    elif "d" in optimizer.param_groups[0] and not issubclass(kind, (Fixed, WSD, Cosine)):
        raise ConfigError(group, f"Prodigy {PRODIGY}; got {kind.__name__}")
