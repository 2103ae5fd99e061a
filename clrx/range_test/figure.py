"""The range test's figure: loss and accuracy against the LR, with each rule's suggestion marked."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from clrx.range_test.curve import Curve
from clrx.range_test.suggest import Suggestion, smoothed_accuracy

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def range_figure(curve: Curve, suggestions: dict[str, Suggestion], metric: str = "loss") -> Figure:
    """Loss (raw and smoothed; the validation loss where the rules read it) and accuracy against the LR,
    the suggested bounds marked."""
    from matplotlib.figure import Figure  # a second of import: only when a figure is drawn

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
    if metric == "val_loss" and curve.val_loss:
        steps = sorted(curve.val_loss)
        loss_ax.plot([curve.lrs[s] for s in steps], [curve.val_loss[s] for s in steps], marker="o", label="val_loss")
    loss_ax.set_ylabel("loss")
    accuracy = smoothed_accuracy(curve)
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
