"""The LR range test's record: the smoothed loss, the divergence stop, and the bounds read off it.

The schedule itself is the ``LRRange`` policy and the steps are the training loop's; this module
watches the losses, decides when to stop and reads suggestions off the finished curve.
"""

from __future__ import annotations

import copy
import csv
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from clrx.errors import ConfigError
from clrx.optim import apply_hyper
from clrx.policies import Hyper, LRRange

# The curve before this share of its points is too noisy to read bounds from.
SKIP_START = 0.1


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
    """Per-step LR, raw and smoothed loss, batch accuracy; validation accuracy where measured."""

    mode: str
    beta: float
    stop_factor: float
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    val_accuracy: dict[int, float] = field(default_factory=dict)
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
            }
            for step in range(len(self.lrs))
        ]

    def write_csv(self, path: Path) -> None:
        rows = self.rows()
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


@dataclass(frozen=True)
class Suggestion:
    """One rule's reading of the curve; ``base_lr`` only for rules that give a lower bound."""

    rule: str
    max_lr: float
    base_lr: float | None = None
    why: str = ""


def _smoothed_accuracy(curve: Curve) -> tuple[list[int], list[float]] | None:
    """(steps, accuracy) to read the paper's rule from: validation if measured, else the batches'."""
    if len(curve.val_accuracy) >= 3:
        steps = sorted(curve.val_accuracy)
        return steps, [curve.val_accuracy[s] for s in steps]
    if any(a is None for a in curve.accuracy):
        return None
    smooth = Smoother(curve.beta)
    return list(range(len(curve.accuracy))), [smooth(a) for a in curve.accuracy]


def _paper(curve: Curve, usable: range) -> Suggestion | None:
    """Smith's reading of the accuracy curve: base where it starts to rise, max where the rise slows.

    "Starts" is 10% and "slows" 90% of the total rise up to the best accuracy. Without accuracy
    there is nothing to read: a loss keeps falling until the LR is already past divergence.
    """
    accuracy = _smoothed_accuracy(curve)
    if accuracy is None:
        return None
    steps, values = accuracy
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if usable.start <= s < usable.stop]
    if len(pairs) < 2:
        return None
    what = "validation accuracy" if len(curve.val_accuracy) >= 3 else "smoothed batch accuracy"
    best = max(range(len(pairs)), key=lambda i: pairs[i][1])
    start, rise = pairs[0][1], pairs[best][1] - pairs[0][1]

    def first_reaching(share: float) -> int:
        return next(s for s, v in pairs[: best + 1] if v - start >= share * rise)

    base, top = first_reaching(0.1), first_reaching(0.9)
    if top <= base:
        base, top = pairs[0][0], pairs[best][0]
    why = f"{what}: 10% of its rise at lr {curve.lrs[base]:.3g}, 90% at {curve.lrs[top]:.3g}"
    return Suggestion("paper", curve.lrs[top], curve.lrs[base], why)


def _valley(smoothed: list[float], usable: range) -> int:
    """fastai's valley: two thirds into the longest stretch over which the loss keeps falling."""
    values = [smoothed[i] for i in usable]
    longest = [1] * len(values)
    start, end = 0, 0
    for i in range(1, len(values)):
        for j in range(i):
            if values[i] < values[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[i] > longest[end]:
            end, start = i, i - longest[i]
    third = (end - start) / 3
    return usable.start + start + int(third) + int(third / 2)


def suggest(curve: Curve) -> dict[str, Suggestion]:
    """Every rule's suggestion; the noisy first 10% of the points and the divergence are ignored.

    ``paper`` (accuracy-based) needs an accuracy curve; the loss-based ``steepest``,
    ``minimum/10`` and ``valley`` need only the loss.
    """
    count = len(curve.smoothed)
    skip = int(count * SKIP_START) if count >= 10 else 0
    lowest = min(range(skip, count), key=lambda i: curve.smoothed[i])
    usable = range(skip, lowest + 1)
    x = [math.log(lr) if curve.mode == "exp" else lr for lr in curve.lrs]
    slopes = {
        i: (curve.smoothed[i + 1] - curve.smoothed[i - 1]) / (x[i + 1] - x[i - 1])
        for i in range(max(usable.start, 1), min(usable.stop, count - 1))
    }
    steep = min(slopes, key=slopes.get) if slopes else lowest
    found = {
        "paper": _paper(curve, usable),
        "steepest": Suggestion("steepest", curve.lrs[steep], why="fastest fall of the smoothed loss"),
        "minimum/10": Suggestion(
            "minimum/10", curve.lrs[lowest] / 10, why=f"a tenth of the lowest loss's lr {curve.lrs[lowest]:.3g}"
        ),
        "valley": Suggestion("valley", curve.lrs[_valley(curve.smoothed, usable)], why="fastai's valley"),
    }
    return {rule: suggestion for rule, suggestion in found.items() if suggestion is not None}


def bounds(suggestions: dict[str, Suggestion], rule: str, div: float, scale: float = 1.0) -> tuple[float, float]:
    """(base_lr, max_lr) by ``rule``, times ``scale``; rules without a lower bound use ``max_lr / div``."""
    chosen = suggestions[rule]
    base_lr = chosen.base_lr if chosen.base_lr is not None else chosen.max_lr / div
    return base_lr * scale, chosen.max_lr * scale


def range_figure(curve: Curve, suggestions: dict[str, Suggestion]) -> Figure:
    """Loss (raw and smoothed) and accuracy against the LR, the suggested bounds marked."""
    figure = Figure(figsize=(8, 7), layout="constrained")
    loss_ax, acc_ax = figure.subplots(2, 1, sharex=True)
    finite = [i for i, v in enumerate(curve.losses) if math.isfinite(v)]
    loss_ax.plot([curve.lrs[i] for i in finite], [curve.losses[i] for i in finite], alpha=0.3, label="loss")
    loss_ax.plot(curve.lrs, curve.smoothed, label=f"smoothed (beta {curve.beta})")
    if finite:
        low, high = min(curve.losses[i] for i in finite), max(curve.smoothed[i] for i in finite)
        loss_ax.set_ylim(
            min(low, min(curve.smoothed)) * 0.95, min(high, curve.stop_factor * min(curve.smoothed)) * 1.05
        )
    loss_ax.set_ylabel("training loss")
    accuracy = _smoothed_accuracy(curve)
    if accuracy is not None:
        steps, values = accuracy
        acc_ax.plot([curve.lrs[s] for s in steps], values, marker="o" if curve.val_accuracy else None)
    acc_ax.set_ylabel("validation accuracy" if len(curve.val_accuracy) >= 3 else "batch accuracy (smoothed)")
    acc_ax.set_xlabel("learning rate")
    colors = {"paper": "tab:green", "steepest": "tab:red", "minimum/10": "tab:purple", "valley": "tab:orange"}
    for ax in (loss_ax, acc_ax):
        if curve.mode == "exp":
            ax.set_xscale("log")
        for suggestion in suggestions.values():
            ax.axvline(suggestion.max_lr, color=colors[suggestion.rule], linestyle="--", label=suggestion.rule)
            if suggestion.base_lr is not None:
                ax.axvline(suggestion.base_lr, color=colors[suggestion.rule], linestyle=":", label="paper's base")
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    return figure


def run_range_test(
    policy: LRRange,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Any],
    train_step: Callable[[Any], tuple[float, float | None]],
    evaluate: Callable[[], float] | None = None,
    on_step: Callable[[int, Hyper, Curve], None] | None = None,
) -> Curve:
    """Step through ``policy`` until it ends or the loss diverges; the curve it leaves.

    ``train_step(batch)`` does one optimizer step and returns (loss, batch accuracy or None).
    ``evaluate()`` returns validation accuracy, asked every ``policy.val_every`` steps.
    """
    curve = Curve(policy.mode, policy.beta, policy.stop_factor)
    for step in range(policy.num_iter):
        hyper = policy(step)
        apply_hyper(optimizer, hyper)
        loss, accuracy = train_step(next(batches))
        stop = curve.add(hyper.lr, loss, accuracy)
        if evaluate is not None and policy.val_every and (step + 1) % policy.val_every == 0 and not stop:
            curve.val_accuracy[step] = evaluate()
        if on_step is not None:
            on_step(step, hyper, curve)
        if stop:
            break
    if len(curve.lrs) < max(5, policy.num_iter // 20):
        raise ConfigError(
            "min_lr",
            f"the loss diverged within the first {len(curve.lrs)} steps ({curve.stop_reason}); lower min_lr",
        )
    return curve


def lr_range_test(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    policy: LRRange,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy,
    restore: bool = True,
) -> tuple[Curve, dict[str, Suggestion]]:
    """The range test on your own model, loader and optimizer; weights and optimizer state restored.

    The loader yields (inputs, targets) on the model's device; it is cycled as often as needed.
    Batch accuracy is recorded when the outputs are class scores for integer targets.
    """
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())) if restore else None
    model.train()

    def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float | None]:
        inputs, targets = batch
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item(), batch_accuracy(outputs, targets)

    try:
        curve = run_range_test(policy, optimizer, itertools.cycle(loader), train_step)
    finally:
        if saved is not None:
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
    return curve, suggest(curve)


def batch_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Top-1 accuracy for class scores and integer labels; None for anything else (regression)."""
    if outputs.ndim != 2 or targets.ndim != 1 or targets.is_floating_point():
        return None
    return (outputs.argmax(dim=1) == targets).float().mean().item()
