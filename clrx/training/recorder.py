"""The per-step record of a run: applied lr and momentum, the loss, and the gradient norm where clipped.

Losses (and norms) stay on the device as tensors and are read back every ``every`` steps with a single sync,
so a GPU step never waits for the host; that read also averages them over the processes (so all
of them see the same numbers) and checks the loss is still finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from clrx.errors import TrainingDiverged
from clrx.tracking.store import Tracker


class Recorder:
    def __init__(
        self,
        tracker: Tracker,
        momentum_name: str | None,
        every: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda losses: losses,
        on_drain: Callable[[int, float, float], None] = lambda n, lr, loss: None,
        lr_setting: str = "policy.max_lr",
        group_scales: Mapping[str, float] | None = None,
    ) -> None:
        self.tracker, self.momentum_name, self.every = tracker, momentum_name, every
        # lr/<group> for each named param group: the recorded (top group's) lr times the group's scale.
        self.group_scales = [(f"lr/{name}", scale) for name, scale in (group_scales or {}).items()]
        self.lr_setting = lr_setting  # what a diverged run is told to lower
        self.reduce, self.on_drain = reduce, on_drain
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.momenta: list[float | None] = []
        self.losses: list[float] = []
        self._pending: list[torch.Tensor] = []

    def record(
        self, step: int, lr: float, momentum: float | None, loss: torch.Tensor, grad_norm: torch.Tensor | None = None
    ) -> None:
        self.steps.append(step)
        self.lrs.append(lr)
        self.momenta.append(momentum)
        loss = loss.detach()
        self._pending.append(loss if grad_norm is None else torch.stack([loss.float(), grad_norm.detach().float()]))
        if len(self._pending) >= self.every:
            self.drain()

    def drain(self) -> None:
        """Read pending losses, stop on a non-finite one, and pass every point to the tracker."""
        if not self._pending:
            return
        read = self.reduce(torch.stack(self._pending).float()).tolist()
        values = [each[0] if isinstance(each, list) else each for each in read]
        first = len(self.losses)
        self._pending = []
        points = []
        for index, loss in enumerate(values, start=first):
            step, lr = self.steps[index], self.lrs[index]
            if not math.isfinite(loss):  # what came before it still reaches the run, for diagnosis
                self.losses.extend(values[: index - first])
                self.tracker.points(points)
                raise TrainingDiverged(
                    f"loss became {loss} at step {step} (lr {lr:.4g}); lower the learning rate ({self.lr_setting})"
                )
            points.append(("lr", lr, step))
            if self.group_scales:
                points.extend((key, lr * scale, step) for key, scale in self.group_scales)
            if self.momentum_name is not None:
                points.append((self.momentum_name, self.momenta[index], step))
            points.append(("train_loss", loss, step))
            if isinstance(read[index - first], list):
                points.append(("grad_norm", read[index - first][1], step))
        self.losses.extend(values)
        self.tracker.points(points)
        self.on_drain(len(values), self.lrs[-1], self.losses[-1])

    def epoch_loss(self, steps: int) -> float:
        """Mean training loss over the last ``steps`` drained steps."""
        recent = self.losses[-steps:]
        return sum(recent) / len(recent)

    def state(self) -> dict[str, Any]:
        """The drained steps' record, for a checkpoint (drain first); steps are 0, 1, ... and not stored."""
        return {"lrs": list(self.lrs), "momenta": list(self.momenta), "losses": list(self.losses)}

    def load(self, state: Mapping[str, Any]) -> None:
        self.lrs, self.momenta, self.losses = list(state["lrs"]), list(state["momenta"]), list(state["losses"])
        self.steps = list(range(len(self.lrs)))
