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
RANGE_METRICS = ("loss", "val_loss")  # what the loss rules read: smoothed training loss, or validation loss
PAPER_ANNIHILATE_PCT = 0.1  # Smith 2018: the last few percent of the run, e.g. 10-15%

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


def _check_warmup_steps(value: object) -> None:
    whole = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    _require(whole, "warmup_steps", f"must be a whole number of steps >= 0, got {value!r}")


def _check_floor(min_lr: object, max_lr: float) -> None:
    _require(_is_number(min_lr) and 0 <= min_lr < max_lr, "min_lr", f"must be in [0, max_lr), got {min_lr!r}")


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


def _cos(start: float, end: float, pct: float) -> float:
    # Half a cosine from start (pct 0) to end (pct 1), written as torch's cosine annealing is.
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


ANNEALS = {"linear": _lerp, "cos": _cos}  # how one-cycle moves from one end of a phase to the other
# How warmup-stable-decay falls: the two above, or by 1 - sqrt of the progress (Hägele et al. 2024, arXiv 2405.18392).
DECAYS = {**ANNEALS, "sqrt": lambda start, end, pct: end + (start - end) * (1 - math.sqrt(pct))}


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

    Over ``total_steps`` the LR climbs from ``base_lr`` to ``max_lr`` and back in two equal
    steps, then, over the last ``annihilate_pct`` of the run (0.1 if unset), falls to
    ``base_lr / final_div``. ``pct_start`` is the other way to give the same length: the share
    of the run rising, the fall as long, annihilation the rest. ``three_phase=False`` is
    fastai's form: up over ``pct_start``, then straight down to ``base_lr / final_div``.
    ``anneal`` moves within each phase linearly (the paper) or along half a cosine (fastai).
    Momentum mirrors the LR during the cycle and stays at ``max_momentum`` while annihilating.
    Progress is measured in intervals between steps, so step 0 is at ``base_lr`` and step
    ``total_steps - 1`` is exactly at the final LR.
    """

    base_lr: float
    max_lr: float
    total_steps: int
    annihilate_pct: float | None = None
    final_div: float = 100.0
    base_momentum: float | None = 0.85
    max_momentum: float | None = 0.95
    anneal: str = "linear"
    pct_start: float | None = None
    three_phase: bool = True

    def __post_init__(self) -> None:
        _check_bounds(self.base_lr, self.max_lr)
        check_positive_whole("total_steps", self.total_steps, " of steps")
        _require(self.total_steps >= 2, "total_steps", f"must be at least 2, got {self.total_steps}")
        _require(
            self.annihilate_pct is None or (_is_number(self.annihilate_pct) and 0 <= self.annihilate_pct < 1),
            "annihilate_pct",
            f"must be in [0, 1), got {self.annihilate_pct!r}",
        )
        _require(
            _is_number(self.final_div) and self.final_div >= 1,
            "final_div",
            f"must be a number >= 1, got {self.final_div!r}",
        )
        _check_momentum_cycle(self.base_momentum, self.max_momentum)
        _require(self.anneal in ANNEALS, "anneal", f"must be one of {', '.join(ANNEALS)}, got {self.anneal!r}")
        _require(isinstance(self.three_phase, bool), "three_phase", f"must be true or false, got {self.three_phase!r}")
        if self.three_phase:
            _require(
                self.pct_start is None or self.annihilate_pct is None,
                "pct_start",
                "give pct_start or annihilate_pct, not both (annihilation takes 1 - 2 pct_start)",
            )
            _require(
                self.pct_start is None or (_is_number(self.pct_start) and 0 < self.pct_start <= 0.5),
                "pct_start",
                f"must be in (0, 0.5] with three_phase=true (the fall is as long as the rise), got {self.pct_start!r}",
            )
        else:
            _require(
                self.annihilate_pct is None,
                "annihilate_pct",
                "only applies to three_phase=true; the two-phase form falls straight to base_lr/final_div over "
                "the rest of the run after pct_start",
            )
            _require(
                _is_number(self.pct_start) and 0 < self.pct_start < 1,
                "pct_start",
                f"must be in (0, 1) with three_phase=false (the share of the run rising), got {self.pct_start!r}",
            )

    @property
    def peak(self) -> float:
        """The step at which the LR reaches ``max_lr`` (a fraction of a step in general)."""
        if self.pct_start is None:
            annihilate = PAPER_ANNIHILATE_PCT if self.annihilate_pct is None else self.annihilate_pct
            return (1 - annihilate) * (self.total_steps - 1) / 2
        return self.pct_start * (self.total_steps - 1)

    def __call__(self, step: int) -> Hyper:
        peak, last = self.peak, self.total_steps - 1
        fall_end = 2 * peak if self.three_phase else last
        final = self.base_lr / self.final_div
        top, bottom = self.max_momentum, self.base_momentum
        if step <= peak:
            pct, lrs, moms = step / peak, (self.base_lr, self.max_lr), (top, bottom)
        elif step <= fall_end:
            pct, moms = (step - peak) / (fall_end - peak), (bottom, top)
            lrs = (self.max_lr, self.base_lr if self.three_phase else final)
        else:
            pct = 1.0 if step >= last else (step - fall_end) / (last - fall_end)
            lrs, moms = (self.base_lr, final), (top, top)
        anneal = ANNEALS[self.anneal]
        return Hyper(anneal(*lrs, pct), None if top is None else anneal(*moms, pct))


@dataclass(frozen=True)
class Cosine:
    """Linear warm-up, then cosine annealing with optional warm restarts (SGDR, arXiv 1608.03983).

    The common baseline: the LR rises linearly from ``base_lr`` to ``max_lr`` over
    ``warmup_steps``, then follows half a cosine down to ``min_lr`` over ``cycle_steps``
    (unset: the rest of the run, ending exactly at ``min_lr`` on its last step). Each of up to
    ``cycle_limit`` cycles restarts at the previous peak times ``cycle_decay`` and lasts
    ``cycle_mul`` times as long; after the last the LR stays at ``min_lr``. The same schedule
    as timm's ``CosineLRScheduler`` with ``warmup_prefix=True`` (cycles start after warm-up).
    """

    base_lr: float
    max_lr: float
    total_steps: int
    warmup_steps: int = 0
    cycle_steps: int | None = None
    cycle_mul: float = 1.0
    cycle_decay: float = 1.0
    cycle_limit: int = 1
    min_lr: float = 0.0
    momentum: float | None = None

    def __post_init__(self) -> None:
        _check_bounds(self.base_lr, self.max_lr)
        check_positive_whole("total_steps", self.total_steps, " of steps")
        _check_warmup_steps(self.warmup_steps)
        if self.cycle_steps is None:
            room = self.total_steps - 2
            _require(
                self.warmup_steps <= room,
                "warmup_steps",
                f"must leave the cosine a step: at most total_steps - 2 = {room}, got {self.warmup_steps}",
            )
        else:
            check_positive_whole("cycle_steps", self.cycle_steps, " of steps")
        _require(
            _is_number(self.cycle_mul) and self.cycle_mul >= 1,
            "cycle_mul",
            f"must be a number >= 1, got {self.cycle_mul!r}",
        )
        _require(
            _is_number(self.cycle_decay) and 0 < self.cycle_decay <= 1,
            "cycle_decay",
            f"must be in (0, 1], got {self.cycle_decay!r}",
        )
        check_positive_whole("cycle_limit", self.cycle_limit, " of cycles")
        _check_floor(self.min_lr, self.max_lr)
        _check_momentum("momentum", self.momentum)

    @property
    def first_cycle(self) -> int:
        """Steps in the first cosine cycle: ``cycle_steps``, or the run after warm-up to its last step."""
        return self.total_steps - 1 - self.warmup_steps if self.cycle_steps is None else self.cycle_steps

    def __call__(self, step: int) -> Hyper:
        if step < self.warmup_steps:
            return Hyper(_lerp(self.base_lr, self.max_lr, step / self.warmup_steps), self.momentum)
        t, first, mul = step - self.warmup_steps, self.first_cycle, self.cycle_mul
        if mul == 1:
            (cycle, into), length = divmod(t, first), first
        else:  # each cycle mul times the last: timm's closed form, so both pick the same cycle at its edges
            cycle = math.floor(math.log(1 - t / first * (1 - mul), mul))
            length, into = mul**cycle * first, t - (1 - mul**cycle) / (1 - mul) * first
        if cycle >= self.cycle_limit:
            return Hyper(self.min_lr, self.momentum)
        return Hyper(_cos(self.max_lr * self.cycle_decay**cycle, self.min_lr, into / length), self.momentum)


@dataclass(frozen=True)
class WSD:
    """Warmup-stable-decay (trapezoidal): up, flat at ``max_lr``, then down over the end of the run.

    The LR rises linearly from ``base_lr`` to ``max_lr`` over ``warmup_steps`` (or the share
    ``warmup_frac`` of the run), stays there, and over the last ``decay_frac`` of the run falls to
    ``min_lr`` (``decay`` linear, cos or sqrt), reaching it on the last step. The flat stretch
    does not depend on when the run ends, so a run can be extended from ``decay_start`` and decay
    later; with ``decay_frac=0`` the LR stays at ``max_lr`` after warm-up. Momentum is constant.
    """

    base_lr: float
    max_lr: float
    total_steps: int
    warmup_steps: int | None = None
    warmup_frac: float | None = None
    decay_frac: float = 0.2
    decay: str = "linear"
    min_lr: float = 0.0
    momentum: float | None = None

    def __post_init__(self) -> None:
        _check_bounds(self.base_lr, self.max_lr)
        check_positive_whole("total_steps", self.total_steps, " of steps")
        _require(
            self.warmup_steps is None or self.warmup_frac is None,
            "warmup_steps",
            "give warmup_steps (or warmup_epochs) or warmup_frac, not both",
        )
        if self.warmup_steps is not None:
            _check_warmup_steps(self.warmup_steps)
        for name in ("warmup_frac", "decay_frac"):
            value = getattr(self, name)
            _require(
                (value is None and name == "warmup_frac") or (_is_number(value) and 0 <= value <= 1),
                name,
                f"must be a share of the run in [0, 1], got {value!r}",
            )
        _require(self.decay in DECAYS, "decay", f"must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        _check_floor(self.min_lr, self.max_lr)
        _check_momentum("momentum", self.momentum)
        _require(
            self.warmup <= self.decay_start,
            "decay_frac",
            f"warm-up ({self.warmup} steps) and decay ({self.total_steps - 1 - self.decay_start} steps) "
            f"overlap in a run of {self.total_steps} steps; shorten one",
        )

    @property
    def warmup(self) -> int:
        """Steps of warm-up: ``warmup_steps``, or ``warmup_frac`` of the run's intervals."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round((self.warmup_frac or 0) * (self.total_steps - 1))

    @property
    def decay_start(self) -> int:
        """The last step at ``max_lr``: the decay's first interval begins here."""
        return self.total_steps - 1 - round(self.decay_frac * (self.total_steps - 1))

    def __call__(self, step: int) -> Hyper:
        if step < self.warmup:
            return Hyper(_lerp(self.base_lr, self.max_lr, step / self.warmup), self.momentum)
        start, last = self.decay_start, self.total_steps - 1
        if step <= start:
            return Hyper(self.max_lr, self.momentum)
        pct = min(1.0, (step - start) / (last - start))
        return Hyper(DECAYS[self.decay](self.max_lr, self.min_lr, pct), self.momentum)


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
    multiplies both bounds (a grid of 0.5x, 1x, 2x the suggestion, say). No rule reads the first
    ``skip_start`` share of the steps (the first steps' spike). ``metric`` ``val_loss`` reads the loss
    rules off the validation loss measured every ``val_every`` steps on the first ``val_batches``
    validation batches (the same ones each time; null: all).
    ``repeats`` > 1 runs the test that many times (seeds ``trainer.seed`` on) and reads the median.
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
    skip_start: float = 0.1
    metric: str = "loss"
    val_batches: int | None = None
    repeats: int = 1

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
        _require(
            _is_number(self.skip_start) and 0 <= self.skip_start < 1,
            "skip_start",
            f"must be a share of the steps in [0, 1), got {self.skip_start!r}",
        )
        _require(
            self.metric in RANGE_METRICS, "metric", f"must be one of {', '.join(RANGE_METRICS)}, got {self.metric!r}"
        )
        _require(
            self.metric != "val_loss" or self.val_every > 0,
            "val_every",
            "must be above 0 with metric=val_loss: the validation loss is measured every val_every steps",
        )
        _require(
            self.val_batches is None or (isinstance(self.val_batches, int) and self.val_batches > 0),
            "val_batches",
            f"must be a whole number above 0, or null (the whole validation set), got {self.val_batches!r}",
        )
        _require(
            isinstance(self.repeats, int) and self.repeats >= 1,
            "repeats",
            f"must be a whole number >= 1, got {self.repeats!r}",
        )

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
