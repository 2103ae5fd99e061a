"""Reading a finished range-test curve: each rule's suggested LR, and the bounds a policy takes.

Rules read the curve only; what shaped it (the schedule, smoothing, the stop) is ``clrx.range_test.curve``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from clrx.range_test.curve import Curve, Smoother

# The curve before this share of its points is too noisy to read bounds from.
SKIP_START = 0.1


@dataclass(frozen=True)
class Suggestion:
    """One rule's reading of the curve; ``base_lr`` only for rules that give a lower bound."""

    rule: str
    max_lr: float
    base_lr: float | None = None
    why: str = ""


def smoothed_accuracy(curve: Curve) -> tuple[list[int], list[float]] | None:
    """(steps, accuracy) to read the paper's rule from: validation if measured, else the batches'."""
    if len(curve.val_accuracy) >= 3:
        steps = sorted(curve.val_accuracy)
        return steps, [curve.val_accuracy[s] for s in steps]
    if any(a is None for a in curve.accuracy):
        return None
    smooth = Smoother(curve.beta)
    return list(range(len(curve.accuracy))), [smooth(a) for a in curve.accuracy]


def _paper(curve: Curve, usable: range, group: str) -> Suggestion | str:
    """Smith's reading of the accuracy curve: base where it starts to rise, max where the rise slows.

    "Starts" is 10% and "slows" 90% of the total rise up to the best accuracy. Without accuracy
    there is nothing to read (a loss keeps falling until the LR is already past divergence): then
    the reason, as a string.
    """
    accuracy = smoothed_accuracy(curve)
    if accuracy is None:
        return "needs an accuracy curve; the outputs were not class scores for integer labels"
    steps, values = accuracy
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if usable.start <= s < usable.stop]
    what = "validation accuracy" if len(curve.val_accuracy) >= 3 else "smoothed batch accuracy"
    if len(pairs) < 2:
        fix = f"lower {group}val_every" if what.startswith("validation") else f"lower {group}min_lr"
        return (
            f"needs >= 2 {what} points from step {usable.start} to the loss minimum at step {usable.stop - 1}, "
            f"got {len(pairs)}; raise {group}num_iter or {fix}"
        )
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
            end, start = i, i - longest[i]  # fastai's start: one before the run
    third = (end - start) / 3
    return usable.start + max(start + int(third) + int(third / 2), 0)  # a short run: never before the usable part


def suggest(curve: Curve) -> dict[str, Suggestion]:
    """Every rule's suggestion; the noisy first 10% of the points and the divergence are ignored."""
    return read(curve)[0]


def read(curve: Curve, group: str = "") -> tuple[dict[str, Suggestion], dict[str, str]]:
    """(each rule's suggestion, why each other rule gave none); ``group`` (``policy.``) prefixes settings named.

    ``paper`` (accuracy-based) needs an accuracy curve with at least two points before the loss's
    minimum; the loss-based ``steepest``, ``minimum/10`` and ``valley`` need only the loss.
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
        "paper": _paper(curve, usable, group),
        "steepest": Suggestion("steepest", curve.lrs[steep], why="fastest fall of the smoothed loss"),
        "minimum/10": Suggestion(
            "minimum/10", curve.lrs[lowest] / 10, why=f"a tenth of the lowest loss's lr {curve.lrs[lowest]:.3g}"
        ),
        "valley": Suggestion("valley", curve.lrs[_valley(curve.smoothed, usable)], why="fastai's valley"),
    }
    return (
        {rule: given for rule, given in found.items() if isinstance(given, Suggestion)},
        {rule: why for rule, why in found.items() if isinstance(why, str)},
    )


def bounds(suggestions: dict[str, Suggestion], rule: str, div: float, scale: float = 1.0) -> tuple[float, float]:
    """(base_lr, max_lr) by ``rule``, times ``scale``; rules without a lower bound use ``max_lr / div``."""
    chosen = suggestions[rule]
    base_lr = chosen.base_lr if chosen.base_lr is not None else chosen.max_lr / div
    return base_lr * scale, chosen.max_lr * scale


SUGGEST, NO_SUGGESTION = "clrx.suggest.", "clrx.no_suggestion."  # MLflow tag prefixes, one per rule


def suggestion_tags(suggestions: dict[str, Suggestion], no_suggestion: dict[str, str]) -> dict[str, str]:
    """``clrx.suggest.<rule>``: a rule's bounds as JSON; ``clrx.no_suggestion.<rule>``: why it gave none."""
    tags = {
        f"{SUGGEST}{rule}": json.dumps({"base_lr": s.base_lr, "max_lr": s.max_lr, "why": s.why})
        for rule, s in suggestions.items()
    }
    return tags | {f"{NO_SUGGESTION}{rule}": why for rule, why in no_suggestion.items()}


def suggestions_from_tags(tags: dict[str, str]) -> tuple[dict[str, Suggestion], dict[str, str]]:
    """What ``suggestion_tags`` wrote: (suggestions, why other rules gave none)."""
    suggestions = {
        name[len(SUGGEST) :]: Suggestion(name[len(SUGGEST) :], **json.loads(value))
        for name, value in tags.items()
        if name.startswith(SUGGEST)
    }
    return suggestions, {
        name[len(NO_SUGGESTION) :]: why for name, why in tags.items() if name.startswith(NO_SUGGESTION)
    }
