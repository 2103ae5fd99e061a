"""The decisions of the disciplined approach, as pure functions of what the stages measured.

A weight decay is read off LR range-test curves (one per candidate); the bisection around it is
decided by the short runs' validation loss. Each decision says which rule decided and the numbers it read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clrx.errors import ClrxError
from clrx.range_test.suggest import SKIP_START


@dataclass(frozen=True)
class Reading:
    """What the weight-decay rule reads off one range test: its lowest smoothed loss and how far it stays stable."""

    minimum: float
    lr_at_minimum: float
    stable_lr: float


@dataclass(frozen=True)
class Decision:
    """The chosen value, the rule in words, and why each candidate was or was not chosen."""

    chosen: float
    rule: str
    why: dict[float, str]


class NoCandidate(ClrxError):
    """Every candidate of a stage failed: nothing is left to choose from."""


def read_curve(
    lrs: Sequence[float], smoothed: Sequence[float], stable_factor: float, skip_start: float = SKIP_START
) -> Reading:
    """The minimum of the smoothed loss (the noisy first ``skip_start`` of the points ignored, as the bounds
    rules ignore them: ``range_test.skip_start``) and the last LR before the loss first exceeds
    ``stable_factor`` times that minimum."""
    if len(lrs) != len(smoothed) or len(lrs) < 2:
        raise ValueError(f"a curve needs at least 2 points of lr and smoothed loss, got {len(lrs)} and {len(smoothed)}")
    skip = int(len(lrs) * skip_start)
    lowest = min(range(skip, len(lrs)), key=lambda i: smoothed[i])
    minimum = smoothed[lowest]
    if not math.isfinite(minimum):
        raise ValueError("the smoothed loss is nowhere finite")
    stable = lowest
    while stable + 1 < len(lrs) and smoothed[stable + 1] <= stable_factor * minimum:
        stable += 1
    return Reading(minimum, lrs[lowest], lrs[stable])


def choose_weight_decay(readings: Mapping[float, Reading | str], tolerance: float, stable_factor: float) -> Decision:
    """The lowest minimum wins; minima within ``tolerance`` (relative) of it tie, and the tie goes to the curve
    stable to the larger LR (then to the larger weight decay). A candidate given as a string failed for that reason."""
    rule = (
        f"lowest minimum of the smoothed range-test loss; minima within {tolerance:.0%} of the lowest tie, "
        f"and a tie goes to the one stable to the larger LR (smoothed loss at most {stable_factor:g}x its minimum)"
    )
    read = {wd: r for wd, r in readings.items() if isinstance(r, Reading)}
    why = {wd: f"failed: {r}" for wd, r in readings.items() if isinstance(r, str)}
    if not read:
        raise NoCandidate("every range test failed: " + "; ".join(f"wd {wd:g} {w}" for wd, w in why.items()))
    lowest = min(r.minimum for r in read.values())
    tied = {wd: r for wd, r in read.items() if r.minimum <= lowest + tolerance * abs(lowest)}
    chosen = max(tied, key=lambda wd: (tied[wd].stable_lr, wd))
    for wd, r in read.items():
        numbers = f"minimum {r.minimum:.4g} at lr {r.lr_at_minimum:.3g}, stable to lr {r.stable_lr:.3g}"
        if wd == chosen:
            verdict = "chosen" + (f" (of {len(tied)} tied: stable to the largest LR)" if len(tied) > 1 else "")
        elif wd in tied:
            verdict = f"tied, but stable to a smaller LR than {tied[chosen].stable_lr:.3g}"
        else:
            verdict = f"minimum more than {tolerance:.0%} above the lowest {lowest:.4g}"
        why[wd] = f"{numbers}: {verdict}"
    return Decision(chosen, rule, why)


def bisection(center: float, factors: Sequence[float]) -> list[float]:
    """The weight decays a bisection tries around ``center`` (the paper's 3x, 1x, 1/3x), rounded to 3 digits."""
    return [float(f"{center * factor:.3g}") for factor in factors]


def choose_by_val_loss(losses: Mapping[float, float | str]) -> Decision:
    """The lowest final validation loss of the short runs; a run given as a string failed for that reason."""
    rule = "lowest final validation loss of the short one-cycle runs"
    scored = {wd: loss for wd, loss in losses.items() if not isinstance(loss, str) and math.isfinite(loss)}
    why = {wd: f"failed: {loss}" for wd, loss in losses.items() if isinstance(loss, str)}
    why |= {wd: f"val_loss {loss}" for wd, loss in losses.items() if not isinstance(loss, str) and wd not in scored}
    if not scored:
        raise NoCandidate("every short run failed: " + "; ".join(f"wd {wd:g} {w}" for wd, w in why.items()))
    chosen = min(scored, key=scored.get)
    for wd, loss in scored.items():
        why[wd] = f"val_loss {loss:.4g}: " + ("chosen" if wd == chosen else f"above {scored[chosen]:.4g}")
    return Decision(chosen, rule, why)


@dataclass(frozen=True)
class Budget:
    """Optimizer steps each stage may take, at most (a range test stops early when its loss diverges)."""

    range_tests: int  # how many
    range_test_steps: int
    short_runs: int
    short_steps: int
    final_steps: int  # the final training's, which every stage is measured against
    extra_range_test: bool  # one more range test if the bisection moves the weight decay off the grid
    trains: bool = True  # whether the final training is one of the stages run

    @property
    def total(self) -> int:
        tests = self.range_tests + self.extra_range_test
        final = self.final_steps if self.trains else 0
        return tests * self.range_test_steps + self.short_runs * self.short_steps + final

    def lines(self) -> list[str]:
        """The estimate as printed: each stage's steps and the total, relative to the final training."""
        final = self.final_steps
        parts = [
            (
                f"{self.range_tests} range tests x {self.range_test_steps} steps",
                self.range_tests * self.range_test_steps,
            ),
            (f"{self.short_runs} short runs x {self.short_steps} steps", self.short_runs * self.short_steps),
        ]
        if self.extra_range_test:
            parts.append(("up to 1 range test at a bisected weight decay", self.range_test_steps))
        if self.trains:
            parts.append(("final training", final))
        lines = [f"  {label}: {steps} steps ({steps / final:.2f}x)" for label, steps in parts if steps]
        return [*lines, f"  at most {self.total} optimizer steps in all, {self.total / final:.2f}x the final training"]
