"""Any clrx policy as a standard torch LR scheduler, for researchers with their own loop.

optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
scheduler = PolicyScheduler(optimizer, OneCycle(base_lr=0.08, max_lr=0.8, total_steps=1000))
for batch in batches:
    loss(batch).backward(); optimizer.step(); optimizer.zero_grad(); scheduler.step()
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from clrx.schedules.apply import apply_hyper
from clrx.schedules.policies import Hyper, Policy


class PolicyScheduler(LRScheduler):
    """Applies ``policy(step)`` (lr times a group's ``lr_scale``, and momentum or beta1) at each step.

    The policy is a frozen value, so ``state_dict()`` is just the step count and the policy:
    it pickles, and ``load_state_dict`` resumes the schedule exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Policy, last_epoch: int = -1) -> None:
        self.policy = policy
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        hyper = self.policy(self.last_epoch)
        if hyper.momentum is not None:
            apply_hyper(self.optimizer, Hyper(hyper.lr, hyper.momentum))
        return [hyper.lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]
