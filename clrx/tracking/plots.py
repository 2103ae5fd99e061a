"""Figures of what a run actually applied."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def schedule_figure(
    steps: Sequence[int],
    lrs: Sequence[float],
    momenta: Sequence[float | None],
    losses: Sequence[float] | None,
    momentum_name: str | None,
) -> Figure:
    """LR, momentum (or beta1) and, after training, the loss against the optimizer step."""
    from matplotlib.figure import Figure  # a second of import: only when a figure is drawn

    panels = [("lr", lrs), (momentum_name or "momentum", momenta)] + ([("train_loss", losses)] if losses else [])
    figure = Figure(figsize=(8, 7), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True)
    for ax, (label, values) in zip(axes, panels, strict=True):
        ax.plot(steps, [float("nan") if v is None else v for v in values], linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    return figure
