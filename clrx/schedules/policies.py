"""Learning-rate and momentum policies as pure functions of the optimizer step.

A policy maps the optimizer step (counted after gradient accumulation, starting at 0) to the
hyper-parameters to apply before that step. Having no hidden state is what makes previews,
resume and multi-process runs trivially consistent.

    >>> policy = Cyclic(base_lr=0.001, max_lr=0.006, stepsize=2000, mode="triangular2")
    >>> policy(2000).lr
    0.006
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from clrx.errors import ConfigError, check_positive_whole

CYCLIC_MODES = ("triangular", "triangular2", "exp_range")
RANGE_MODES = ("linear", "exp")
RANGE_RULES = ("paper", "steepest", "minimum/10", "valley")

# Shape of a cycle's rise, 1 at the peak (x = 0) and 0 at the bounds (x = 1): the paper's three windows.
WINDOWS = {
    "triangular": lambda x: 1 - x,
    "welch": lambda x: 1 - x * x,
    "hann": lambda x: (1 + math.cos(math.pi * x)) / 2,
}


@dataclass(frozen=True)
class Hyper:
    """What a policy sets for one step; momentum None leaves the optimizer's own value."""

    lr: float
    momentum: float | None = None


class Policy(Protocol):
    def __call__(self, step: int) -> Hyper: ...


def _require(ok: bool, setting: str, problem: str) -> None:
    if not ok:
        raise ConfigError(setting, problem)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_lr(setting: str, value: object) -> None:
    _require(_is_number(value) and value > 0, setting, f"must be a positive number, got {value!r}")


def _check_bounds(base_lr: float, max_lr: float) -> None:
    _check_lr("base_lr", base_lr)
    _check_lr("max_lr", max_lr)
    _require(base_lr < max_lr, "base_lr", f"must be below max_lr, got {base_lr} >= {max_lr}")


def _check_momentum(setting: str, value: object) -> None:
    _require(
        value is None or (_is_number(value) and 0 <= value < 1),
        setting,
        f"must be null or in [0, 1), got {value!r}",
    )


def _check_momentum_cycle(base: float | None, top: float | None) -> None:
    _check_momentum("base_momentum", base)
    _check_momentum("max_momentum", top)
    _require(
        (base is None) == (top is None),
        "base_momentum",
        "set both base_momentum and max_momentum to cycle momentum, or neither",
    )
    _require(
        base is None or base <= top,
        "base_momentum",
        f"must not exceed max_momentum, got {base} > {top}",
    )


def _lerp(start: float, end: float, pct: float) -> float:
    # Written as torch's linear annealing is, so both agree to the last bit.
    return (end - start) * pct + start


@dataclass(frozen=True)
class Fixed:
    """A constant learning rate (the paper's baseline)."""

    lr: float
    momentum: float | None = None

    def __post_init__(self) -> None:
        _check_lr("lr", self.lr)
        _check_momentum("momentum", self.momentum)

    def __call__(self, step: int) -> Hyper:
        return Hyper(self.lr, self.momentum)


@dataclass(frozen=True)
class Cyclic:
    """Smith's cyclical learning rate (arXiv 1506.01186): a triangle between the bounds.

    ``stepsize`` is half a cycle in optimizer steps. ``mode`` names the paper's amplitude rules:
    ``triangular2`` halves the amplitude after each cycle, ``exp_range`` scales it by
    ``gamma ** step``. ``window`` shapes the cycle: linear, Welch (parabolic) or Hann
    (sinusoidal), all with the same bounds and period. With both momentum bounds set, momentum
    cycles the opposite way, scaled the same way (as torch's ``CyclicLR`` does).
    """

    base_lr: float
    max_lr: float
    stepsize: int
    mode: str = "triangular"
    gamma: float = 1.0
    base_momentum: float | None = None
    max_momentum: float | None = None
    window: str = "triangular"

    def __post_init__(self) -> None:
        _check_bounds(self.base_lr, self.max_lr)
        check_positive_whole("stepsize", self.stepsize, " of steps")
        _require(
            self.mode in CYCLIC_MODES,
            "mode",
            f"must be one of {', '.join(CYCLIC_MODES)}, got {self.mode!r}",
        )
        _require(
            _is_number(self.gamma) and 0 < self.gamma <= 1,
            "gamma",
            f"must be in (0, 1], got {self.gamma!r}",
        )
        _require(
            self.mode == "exp_range" or self.gamma == 1,
            "gamma",
            f"only applies to mode exp_range, not {self.mode}",
        )
        _check_momentum_cycle(self.base_momentum, self.max_momentum)
        _require(self.window in WINDOWS, "window", f"must be one of {', '.join(WINDOWS)}, got {self.window!r}")

    def _amplitude(self, step: int, cycle: int) -> float:
        if self.mode == "triangular2":
            return 1 / 2 ** (cycle - 1)
        if self.mode == "exp_range":
            return self.gamma**step
        return 1.0

    def __call__(self, step: int) -> Hyper:
        cycle = math.floor(1 + step / (2 * self.stepsize))
        x = abs(step / self.stepsize - 2 * cycle + 1)
        height = WINDOWS[self.window](min(x, 1.0)) * self._amplitude(step, cycle)
        lr = self.base_lr + (self.max_lr - self.base_lr) * height
        if self.max_momentum is None:
            return Hyper(lr)
        return Hyper(lr, self.max_momentum - (self.max_momentum - self.base_momentum) * height)


@dataclass(frozen=True)
class OneCycle:
    """One cycle with cyclical momentum and a final annihilation (arXiv 1803.09820).

    Over ``total_steps`` the LR climbs linearly from ``base_lr`` to ``max_lr`` and back in two
    equal steps, then, over the last ``annihilate_pct`` of the run, falls to
    ``base_lr / final_div``. Momentum mirrors the LR during the cycle and stays at
    ``max_momentum`` while annihilating. Progress is measured in intervals between steps, so
    step 0 is at ``base_lr`` and step ``total_steps - 1`` is exactly at the final LR.
    """

    base_lr: float
    max_lr: float
    total_steps: int
    annihilate_pct: float = 0.1
    final_div: float = 100.0
    base_momentum: float | None = 0.85
    max_momentum: float | None = 0.95

    def __post_init__(self) -> None:
        _check_bounds(self.base_lr, self.max_lr)
        check_positive_whole("total_steps", self.total_steps, " of steps")
        _require(self.total_steps >= 2, "total_steps", f"must be at least 2, got {self.total_steps}")
        _require(
            _is_number(self.annihilate_pct) and 0 <= self.annihilate_pct < 1,
            "annihilate_pct",
            f"must be in [0, 1), got {self.annihilate_pct!r}",
        )
        _require(
            _is_number(self.final_div) and self.final_div >= 1,
            "final_div",
            f"must be a number >= 1, got {self.final_div!r}",
        )
        _check_momentum_cycle(self.base_momentum, self.max_momentum)

    @property
    def half_cycle(self) -> float:
        """Length of each of the cycle's two steps, in optimizer steps."""
        return (1 - self.annihilate_pct) * (self.total_steps - 1) / 2

    def __call__(self, step: int) -> Hyper:
        half, last = self.half_cycle, self.total_steps - 1
        top, bottom = self.max_momentum, self.base_momentum
        if step <= half:
            pct, lrs, moms = step / half, (self.base_lr, self.max_lr), (top, bottom)
        elif step <= 2 * half:
            pct, lrs, moms = (step - half) / half, (self.max_lr, self.base_lr), (bottom, top)
        else:
            pct = 1.0 if step >= last else (step - 2 * half) / (last - 2 * half)
            lrs, moms = (self.base_lr, self.base_lr / self.final_div), (top, top)
        return Hyper(_lerp(*lrs, pct), None if top is None else _lerp(*moms, pct))


@dataclass(frozen=True)
class Exp:
    """The paper's exponential baseline: ``base_lr * gamma ** step``."""

    base_lr: float
    gamma: float = 0.9999
    momentum: float | None = None

    def __post_init__(self) -> None:
        _check_lr("base_lr", self.base_lr)
        _require(_is_number(self.gamma) and 0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma!r}")
        _check_momentum("momentum", self.momentum)

    def __call__(self, step: int) -> Hyper:
        return Hyper(self.base_lr * self.gamma**step, self.momentum)


@dataclass(frozen=True)
class Decay:
    """The paper's decay baseline: from ``max_lr`` linearly down to ``base_lr`` over ``stepsize``, then flat."""

    base_lr: float
    max_lr: float
    stepsize: int
    momentum: float | None = None

    def __post_init__(self) -> None:
        _check_bounds(self.base_lr, self.max_lr)
        check_positive_whole("stepsize", self.stepsize, " of steps")
        _check_momentum("momentum", self.momentum)

    def __call__(self, step: int) -> Hyper:
        return Hyper(_lerp(self.max_lr, self.base_lr, min(1.0, step / self.stepsize)), self.momentum)


@dataclass(frozen=True)
class LRRange:
    """The LR range test's schedule: ``min_lr`` to ``max_lr`` over ``num_iter`` steps.

    ``linear`` as in Smith's paper, ``exp`` (``min_lr * (max_lr/min_lr) ** pct``) as in fastai.
    ``beta`` smooths the loss (bias-corrected moving average); the test stops once the smoothed
    loss exceeds ``stop_factor`` times its minimum. ``val_every`` > 0 also measures validation
    accuracy every that many steps, the curve the paper reads its bounds from. ``rule`` picks the
    suggestion turned into bounds; rules without a lower bound use ``max_lr / div``; ``scale``
    multiplies both bounds (a grid of 0.5x, 1x, 2x the suggestion, say).
    """

    min_lr: float
    max_lr: float
    num_iter: int
    mode: str = "linear"
    momentum: float | None = None
    beta: float = 0.98
    stop_factor: float = 4.0
    val_every: int = 0
    rule: str = "minimum/10"
    div: float = 4.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_lr("min_lr", self.min_lr)
        _check_lr("max_lr", self.max_lr)
        _require(self.min_lr < self.max_lr, "min_lr", f"must be below max_lr, got {self.min_lr} >= {self.max_lr}")
        check_positive_whole("num_iter", self.num_iter, " of steps")
        _require(self.num_iter >= 2, "num_iter", f"must be at least 2, got {self.num_iter}")
        _require(self.mode in RANGE_MODES, "mode", f"must be one of {', '.join(RANGE_MODES)}, got {self.mode!r}")
        _check_momentum("momentum", self.momentum)
        _require(_is_number(self.beta) and 0 <= self.beta < 1, "beta", f"must be in [0, 1), got {self.beta!r}")
        _require(
            _is_number(self.stop_factor) and self.stop_factor > 1,
            "stop_factor",
            f"must be a number above 1, got {self.stop_factor!r}",
        )
        _require(
            isinstance(self.val_every, int) and self.val_every >= 0,
            "val_every",
            f"must be a whole number >= 0 (0: off), got {self.val_every!r}",
        )
        _require(self.rule in RANGE_RULES, "rule", f"must be one of {', '.join(RANGE_RULES)}, got {self.rule!r}")
        _require(_is_number(self.div) and self.div > 1, "div", f"must be a number above 1, got {self.div!r}")
        _require(_is_number(self.scale) and self.scale > 0, "scale", f"must be a positive number, got {self.scale!r}")

    def __call__(self, step: int) -> Hyper:
        pct = min(1.0, step / (self.num_iter - 1))
        if self.mode == "exp":
            return Hyper(self.min_lr * (self.max_lr / self.min_lr) ** pct, self.momentum)
        return Hyper(_lerp(self.min_lr, self.max_lr, pct), self.momentum)


@dataclass(frozen=True)
class Stages:
    """Policies one after another, each counting its own steps from 0 (the paper's Table 2).

    ``stages`` holds ``(steps, policy)`` pairs; the last stage runs on for as long as training does.
    """

    stages: tuple[tuple[int, Policy], ...]

    def __post_init__(self) -> None:
        _require(len(self.stages) > 0, "stages", "needs at least one stage")
        for index, (steps, _) in enumerate(self.stages):
            check_positive_whole(f"stages[{index}].steps", steps, " of steps")

    def __call__(self, step: int) -> Hyper:
        start = 0
        for steps, policy in self.stages[:-1]:
            if step < start + steps:
                return policy(step - start)
            start += steps
        return self.stages[-1][1](step - start)
