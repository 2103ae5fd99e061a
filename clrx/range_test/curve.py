"""The LR range test's record: per-step LR and loss, the smoothed loss and the divergence stop.

The schedule is the ``LRRange`` policy and the steps are taken in ``clrx.range_test.run``; reading
bounds off a finished curve is ``clrx.range_test.suggest``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path


class Smoother:
    """Exponential moving average with bias correction (fastai's ``lr_find`` smoothing)."""

    def __init__(self, beta: float) -> None:
        self.beta, self.average, self.count = beta, 0.0, 0

    def __call__(self, value: float) -> float:
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.average / (1 - self.beta**self.count)


@dataclass
class Curve:
    """Per-step LR, raw and smoothed loss, batch accuracy; validation accuracy and loss where measured."""

    mode: str
    beta: float
    stop_factor: float
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    val_accuracy: dict[int, float] = field(default_factory=dict)
    val_loss: dict[int, float] = field(default_factory=dict)
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        self._smooth = Smoother(self.beta)

    def add(self, lr: float, loss: float, accuracy: float | None = None) -> bool:
        """Record one step; True once the test should stop (loss not finite or far above its best)."""
        smoothed = self._smooth(loss) if math.isfinite(loss) else math.inf
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(smoothed)
        self.accuracy.append(accuracy)
        best = min(self.smoothed)
        if not math.isfinite(smoothed):
            self.stop_reason = f"loss became {loss} at lr {lr:.4g}"
        elif smoothed > self.stop_factor * best:
            self.stop_reason = (
                f"smoothed loss {smoothed:.4g} exceeded {self.stop_factor:g}x its minimum {best:.4g} at lr {lr:.4g}"
            )
        return self.stop_reason is not None

    def rows(self) -> list[dict[str, float | str]]:
        return [
            {
                "step": step,
                "lr": self.lrs[step],
                "loss": self.losses[step],
                "smoothed_loss": self.smoothed[step],
                "accuracy": "" if self.accuracy[step] is None else self.accuracy[step],
                "val_accuracy": self.val_accuracy.get(step, ""),
                "val_loss": self.val_loss.get(step, ""),
            }
            for step in range(len(self.lrs))
        ]

    def write_csv(self, path: Path) -> None:
        rows = self.rows()
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
