"""Reading a finished range-test curve: each rule's suggested LR, and the bounds a policy takes.

Rules read the curve only; what shaped it (the schedule, smoothing, the stop) is ``clrx.range_test.curve``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

from clrx.range_test.curve import Curve, Smoother
from clrx.schedules.policies import RANGE_RULES as RULES

# The default share of the curve's steps, from its start, that no rule reads: the first steps' spike
# (a fresh model's loss jumps and dips before it settles) is not a descent. ``range_test.skip_start``.
SKIP_START = 0.1
# A descent: the loss read falls at least this share below its value at the first point read.
MIN_DROP = 0.05


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


def loss_series(curve: Curve, metric: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) the loss rules read: the smoothed training loss at every step, or the validation
    loss at the steps where it was measured (``val_loss``)."""
    if metric == "val_loss":
        steps = sorted(curve.val_loss)
        return steps, [curve.val_loss[s] for s in steps]
    return list(range(len(curve.smoothed))), list(curve.smoothed)


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
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if s in usable and math.isfinite(v)]
    what = "validation accuracy" if len(curve.val_accuracy) >= 3 else "smoothed batch accuracy"
    if len(pairs) < 2:
        fix = f"lower {group}val_every" if what.startswith("validation") else f"lower {group}min_lr"
        return (
            f"needs >= 2 {what} points from step {usable.start} to the loss minimum at step {usable.stop - 1}, "
            f"got {len(pairs)}; raise {group}num_iter or {fix}"
        )
    best = max(range(len(pairs)), key=lambda i: pairs[i][1])
    start, rise = pairs[0][1], pairs[best][1] - pairs[0][1]
    if rise <= 0:
        return f"{what} never rose above its {start:.3g} at step {pairs[0][0]} before the loss minimum"

    def first_reaching(share: float) -> int:
        return next(s for s, v in pairs[: best + 1] if v - start >= share * rise)

    base, top = first_reaching(0.1), first_reaching(0.9)
    if top <= base:
        base, top = pairs[0][0], pairs[best][0]
    why = f"{what}: 10% of its rise at lr {curve.lrs[base]:.3g}, 90% at {curve.lrs[top]:.3g}"
    return Suggestion("paper", curve.lrs[top], curve.lrs[base], why)


def _valley(values: list[float]) -> int:
    """fastai's valley: two thirds into the longest stretch over which the loss keeps falling (an index of values)."""
    longest = [1] * len(values)
    start, end = 0, 0
    for i in range(1, len(values)):
        for j in range(i):
            if values[i] < values[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[i] > longest[end]:
            end, start = i, i - longest[i]  # fastai's start: one before the run
    third = (end - start) / 3
    return max(start + int(third) + int(third / 2), 0)  # a short run: never before the first value


def _steepest(points: list[tuple[int, float]], x: list[float], lowest: int) -> int:
    """The point (an index of ``points``) where the loss falls fastest against x, up to the lowest point.

    Central differences between a point's neighbours among the points read; with no interior point, or
    none falling, the lowest point.
    """
    slopes = {
        i: (points[i + 1][1] - points[i - 1][1]) / (x[points[i + 1][0]] - x[points[i - 1][0]])
        for i in range(1, min(lowest + 1, len(points) - 1))
    }
    steep = min(slopes, key=slopes.get, default=lowest)
    return steep if slopes.get(steep, -1.0) < 0 else lowest


def suggest(curve: Curve, skip_start: float = SKIP_START, metric: str = "loss") -> dict[str, Suggestion]:
    """Every rule's suggestion; the first ``skip_start`` of the steps and the divergence are ignored."""
    return read(curve, skip_start=skip_start, metric=metric)[0]


def read(
    curve: Curve, group: str = "", skip_start: float = SKIP_START, metric: str = "loss"
) -> tuple[dict[str, Suggestion], dict[str, str]]:
    """(each rule's suggestion, why each other rule gave none); ``group`` (``policy.``) prefixes settings named.

    Every rule reads the points from step ``skip_start * steps`` on whose value is finite (a NaN or
    infinite loss is never a pick), up to the lowest of them. Slopes are taken against log(lr) for an
    ``exp`` sweep, against lr for a ``linear`` one. A curve whose loss never falls ``MIN_DROP`` below
    its first point read has no descent: then no rule suggests anything, and each says so.
    ``paper`` (accuracy-based) needs an accuracy curve with at least two points before the loss's
    minimum; the loss-based ``steepest``, ``minimum/10`` and ``valley`` need only the loss (``metric``).
    """
    first = int(len(curve.lrs) * skip_start)
    what = "validation loss" if metric == "val_loss" else "smoothed loss"
    points = [(s, v) for s, v in zip(*loss_series(curve, metric), strict=True) if s >= first and math.isfinite(v)]
    if len(points) < 2:
        fix = f"lower {group}val_every or " if metric == "val_loss" else ""
        why = (
            f"needs >= 2 finite {what} points after the first {skip_start:g} of the steps (step {first}), "
            f"got {len(points)}; {fix}raise {group}num_iter or lower {group}skip_start"
        )
        return {}, dict.fromkeys(RULES, why)
    lowest = min(range(len(points)), key=lambda i: points[i][1])
    (start_step, start), low = points[0], points[lowest][1]
    if start - low < MIN_DROP * abs(start):
        why = (
            f"no descent: the {what} never fell {MIN_DROP:.0%} below its {start:.3g} at lr {curve.lrs[start_step]:.3g} "
            f"(step {start_step}); widen the range ({group}min_lr, {group}max_lr) or raise {group}num_iter"
        )
        return {}, dict.fromkeys(RULES, why)
    x = [math.log(lr) if curve.mode == "exp" else lr for lr in curve.lrs]
    lowest_step = points[lowest][0]
    low_lr = curve.lrs[lowest_step]
    steep = points[_steepest(points, x, lowest)][0]
    valley = points[_valley([v for _, v in points[: lowest + 1]])][0]
    found = {
        "paper": _paper(curve, range(first, lowest_step + 1), group),
        "steepest": Suggestion("steepest", curve.lrs[steep], why=f"fastest fall of the {what}"),
        "minimum/10": Suggestion("minimum/10", low_lr / 10, why=f"a tenth of the lowest loss's lr {low_lr:.3g}"),
        "valley": Suggestion("valley", curve.lrs[valley], why="fastai's valley"),
    }
    return (
        {rule: given for rule, given in found.items() if isinstance(given, Suggestion)},
        {rule: why for rule, why in found.items() if isinstance(why, str)},
    )


def median_of(
    readings: list[tuple[dict[str, Suggestion], dict[str, str]]],
) -> tuple[dict[str, Suggestion], dict[str, str]]:
    """Repeated tests read as one: each rule's median suggestion, its spread (min-max) in ``why``.

    A rule counts where it gave a suggestion; one that gave none in any repeat says why (the first's reason).
    A lower bound is the median of the repeats' lower bounds.
    """
    suggestions, no_suggestion = {}, {}
    for rule in RULES:
        given = [found[rule] for found, _ in readings if rule in found]
        reasons = [why[rule] for _, why in readings if rule in why]
        if not given:
            no_suggestion.update({rule: reasons[0]} if reasons else {})
            continue
        tops = [s.max_lr for s in given]
        bases = [s.base_lr for s in given if s.base_lr is not None]
        base = statistics.median(bases) if bases else None
        spread = f"max_lr {min(tops):.3g}-{max(tops):.3g}"
        if bases:
            spread += f", base_lr {min(bases):.3g}-{max(bases):.3g}"
        why = f"median of {len(given)}/{len(readings)} repeats ({spread})"
        suggestions[rule] = Suggestion(rule, statistics.median(tops), base, why)
    return suggestions, no_suggestion


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
