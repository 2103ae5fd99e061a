"""Policies against torch's own schedulers, and the properties every policy must have."""

import math
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.scheduler.cosine_lr import CosineLRScheduler

from clrx.errors import ConfigError
from clrx.schedules.apply import applied_momentum, apply_hyper, momentum_name
from clrx.schedules.policies import (
    ANNEALS,
    CYCLIC_MODES,
    Cosine,
    Cyclic,
    Decay,
    Exp,
    Fixed,
    Hyper,
    LRRange,
    OneCycle,
    Stages,
)
from clrx.schedules.scheduler import PolicyScheduler


def _sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)


def _trace(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[Hyper]:
    """What the torch scheduler applies before each of ``steps`` optimizer steps."""
    optimizer = scheduler.optimizer
    values = []
    for _ in range(steps):
        values.append(Hyper(optimizer.param_groups[0]["lr"], applied_momentum(optimizer)))
        optimizer.step()
        scheduler.step()
    return values


def _assert_same(policy, oracle: list[Hyper] | dict[int, Hyper], scale: float, momentum: bool) -> None:
    for step, expected in oracle.items() if isinstance(oracle, dict) else enumerate(oracle):
        got = policy(step)
        assert math.isclose(got.lr, expected.lr, rel_tol=1e-9, abs_tol=1e-12 * scale), (step, got, expected)
        if momentum:
            assert math.isclose(got.momentum, expected.momentum, rel_tol=1e-9, abs_tol=1e-12), (step, got, expected)


def _torch_at(scheduler: torch.optim.lr_scheduler.CyclicLR, step: int) -> Hyper:
    """What ``CyclicLR`` applies before optimizer step ``step``, without stepping through the ones before."""
    scheduler.last_epoch = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr outside step(): deliberate, it is a closed form of last_epoch
        lr = scheduler.get_lr()[0]
    return Hyper(lr, applied_momentum(scheduler.optimizer))


bounds = st.tuples(st.floats(1e-8, 10.0), st.floats(1.001, 1e4)).map(lambda t: (t[0], t[0] * t[1]))
momenta = st.one_of(st.none(), st.tuples(st.floats(0.0, 0.9), st.floats(0.0, 0.09)).map(lambda t: (t[0], t[0] + t[1])))


@settings(deadline=None)
@given(
    lrs=bounds,
    stepsize=st.one_of(st.integers(1, 40), st.integers(10**4, 10**8)),
    cycles=st.floats(0.0, 4.5),
    mode=st.sampled_from(CYCLIC_MODES),
    gamma=st.floats(0.0, 1.0, exclude_min=True),  # the whole range exp_range allows
    momentum=momenta,
    data=st.data(),
)
def test_cyclic_matches_torch_cycliclr(lrs, stepsize, cycles, mode, gamma, momentum, data):
    """Every step of short runs; for long half cycles, the bounds, a step either side and steps drawn at random."""
    base_lr, max_lr = lrs
    gamma = gamma if mode == "exp_range" else 1.0
    base_m, max_m = momentum or (None, None)
    policy = Cyclic(base_lr, max_lr, stepsize, mode, gamma, base_m, max_m)
    oracle = torch.optim.lr_scheduler.CyclicLR(
        _sgd(),
        base_lr=base_lr,
        max_lr=max_lr,
        step_size_up=stepsize,
        mode=mode,
        gamma=gamma,
        cycle_momentum=momentum is not None,
        base_momentum=0.8 if base_m is None else base_m,
        max_momentum=0.9 if max_m is None else max_m,
    )
    last = int(cycles * 2 * stepsize)
    if last <= 400:
        steps = list(range(last + 1))
    else:
        edges = [k * stepsize + d for k in range(int(cycles * 2) + 1) for d in (-1, 0, 1)]
        drawn = data.draw(st.lists(st.integers(0, last), max_size=20))
        steps = sorted({s for s in edges + drawn if 0 <= s <= last})
    for step in steps:
        _assert_same(policy, {step: _torch_at(oracle, step)}, max_lr, momentum is not None)


# One-cycle's phase lengths: the three-phase form's annihilation share or its rise, or the two-phase form's rise.
phases = st.one_of(
    st.tuples(st.just(True), st.floats(0.001, 0.95), st.none()),
    st.tuples(st.just(True), st.none(), st.floats(0.025, 0.4995)),  # torch needs some annihilation
    st.tuples(st.just(False), st.none(), st.floats(0.001, 0.999)),
)


@settings(deadline=None)
@given(
    lrs=bounds,
    total_steps=st.integers(2, 400),
    phase=phases,
    anneal=st.sampled_from(list(ANNEALS)),
    final_div=st.floats(1.0, 1e8),
    momentum=momenta,
)
def test_one_cycle_matches_torch_onecyclelr(lrs, total_steps, phase, anneal, final_div, momentum):
    """clrx's one-cycle is torch's OneCycleLR, parametrized differently.

    Deliberate differences, mapped here: clrx gives both bounds (torch: max_lr and div_factor)
    and places the peak by a share of the ``total_steps - 1`` intervals between steps, splitting
    them exactly; torch ends its phases at ``pct_start * T - 1`` and (three-phase)
    ``2 * pct_start * T - 2``. With ``pct_start = (peak + 1) / T`` the phases coincide.
    torch cannot express ``annihilate_pct=0`` (an empty third phase divides by zero); clrx then
    ends the run at ``base_lr``, checked in ``test_one_cycle_shape_follows_the_paper``.
    """
    base_lr, max_lr = lrs
    base_m, max_m = momentum or (None, None)
    three_phase, annihilate_pct, pct_start = phase
    policy = OneCycle(
        base_lr, max_lr, total_steps, annihilate_pct, final_div, base_m, max_m, anneal, pct_start, three_phase
    )
    oracle = torch.optim.lr_scheduler.OneCycleLR(
        _sgd(),
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=(policy.peak + 1) / total_steps,
        anneal_strategy=anneal,
        three_phase=three_phase,
        div_factor=max_lr / base_lr,
        final_div_factor=final_div,
        cycle_momentum=momentum is not None,
        base_momentum=0.85 if base_m is None else base_m,
        max_momentum=0.95 if max_m is None else max_m,
    )
    _assert_same(policy, _trace(oracle, total_steps), max_lr, momentum is not None)


@settings(deadline=None)
@given(
    lrs=bounds,
    total_steps=st.integers(2, 400),
    warmup=st.integers(0, 60),
    cycle_steps=st.one_of(st.none(), st.integers(1, 120)),
    cycle_mul=st.one_of(st.just(1.0), st.floats(1.0, 3.0)),
    cycle_decay=st.floats(0.0, 1.0, exclude_min=True),
    cycle_limit=st.integers(1, 6),
    floor=st.one_of(st.just(0.0), st.floats(0.0, 1.0, exclude_max=True)),
)
def test_cosine_matches_timms_cosine_lr_scheduler(
    lrs, total_steps, warmup, cycle_steps, cycle_mul, cycle_decay, cycle_limit, floor
):
    """clrx's cosine is timm's ``CosineLRScheduler`` counted in updates, its cycles after the warm-up.

    Mapped here: clrx's ``base_lr`` is timm's ``warmup_lr_init``, ``max_lr`` the optimizer's LR,
    ``min_lr`` timm's ``lr_min``; an unset cycle is the rest of the run to its last step.
    Every step of the run, and as many again past its end (restarts, then the floor).
    """
    base_lr, max_lr = lrs
    warmup = min(warmup, total_steps - 2) if cycle_steps is None else warmup  # an unset cycle needs a step
    policy = Cosine(
        base_lr, max_lr, total_steps, warmup, cycle_steps, cycle_mul, cycle_decay, cycle_limit, floor * max_lr
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    oracle = CosineLRScheduler(
        optimizer,
        t_initial=policy.first_cycle,
        lr_min=floor * max_lr,
        cycle_mul=cycle_mul,
        cycle_decay=cycle_decay,
        cycle_limit=cycle_limit,
        warmup_t=warmup,
        warmup_lr_init=base_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    expected = {}
    for step in range(2 * total_steps):
        oracle.step_update(num_updates=step)
        expected[step] = Hyper(optimizer.param_groups[0]["lr"])
    _assert_same(policy, expected, max_lr, momentum=False)


def test_one_cycle_shape_follows_the_paper():
    policy = OneCycle(base_lr=0.08, max_lr=0.8, total_steps=1001, annihilate_pct=0.1, final_div=100)
    assert policy(0) == Hyper(0.08, 0.95)
    assert policy(450).lr == pytest.approx(0.8) and policy(450).momentum == pytest.approx(0.85)
    assert policy(900).lr == pytest.approx(0.08) and policy(900).momentum == pytest.approx(0.95)
    assert policy(950).lr == pytest.approx((0.08 + 0.0008) / 2) and policy(950).momentum == 0.95
    assert policy(1000).lr == pytest.approx(0.0008)
    no_annihilation = OneCycle(base_lr=0.08, max_lr=0.8, total_steps=101, annihilate_pct=0.0)
    assert no_annihilation(50).lr == pytest.approx(0.8) and no_annihilation(100).lr == pytest.approx(0.08)


def test_one_cycle_phases_by_pct_start_and_cos_annealing_by_hand():
    """pct_start places the peak (three-phase: the fall as long, annihilation the rest); cos follows half a cosine."""
    paper = OneCycle(base_lr=0.08, max_lr=0.8, total_steps=101, pct_start=0.3)
    assert [paper(k).lr for k in (0, 15, 30, 45, 60, 80, 100)] == pytest.approx(
        [0.08, 0.44, 0.8, 0.44, 0.08, (0.08 + 0.0008) / 2, 0.0008]
    )
    assert [paper(k).momentum for k in (0, 30, 60, 80)] == pytest.approx([0.95, 0.85, 0.95, 0.95])
    cos = OneCycle(base_lr=0.08, max_lr=0.8, total_steps=1001, anneal="cos")
    assert cos(150).lr == pytest.approx(0.08 + 0.72 * 0.25)  # a third of the rise: (1 - cos(pi/3)) / 2 of it
    assert cos(150).momentum == pytest.approx(0.95 - 0.1 * 0.25)
    assert [cos(k).lr for k in (225, 450, 675, 900, 950, 1000)] == pytest.approx(
        [0.44, 0.8, 0.44, 0.08, (0.08 + 0.0008) / 2, 0.0008]
    )


def test_two_phase_one_cycle_is_fastais_fit_one_cycle():
    """Up over pct_start, then straight down to base_lr / final_div over the rest; momentum mirrored."""
    fastai = OneCycle(0.02, 0.5, 201, final_div=4000, anneal="cos", pct_start=0.25, three_phase=False)
    assert fastai(0) == Hyper(pytest.approx(0.02), 0.95) and fastai.peak == 50
    assert [fastai(k).lr for k in (25, 50, 125, 200, 300)] == pytest.approx([0.26, 0.5, (0.5 + 5e-6) / 2, 5e-6, 5e-6])
    assert [fastai(k).momentum for k in (25, 50, 125, 200, 300)] == pytest.approx([0.9, 0.85, 0.9, 0.95, 0.95])
    assert fastai(75).lr == pytest.approx(5e-6 + (0.5 - 5e-6) * (1 + math.cos(math.pi / 6)) / 2)
    linear = OneCycle(0.02, 0.5, 201, final_div=4000, pct_start=0.25, three_phase=False)
    assert [linear(k).lr for k in (10, 50, 80)] == pytest.approx([0.02 + 0.48 / 5, 0.5, 0.5 - (0.5 - 5e-6) / 5])


def test_cosine_warms_up_then_anneals_to_the_floor_by_hand():
    policy = Cosine(base_lr=0.05, max_lr=0.5, total_steps=111, warmup_steps=10)
    assert policy.first_cycle == 100  # the rest of the run, to its last step
    assert [policy(k).lr for k in (0, 5, 10, 35, 60, 85, 110, 500)] == pytest.approx(
        [0.05, 0.275, 0.5, 0.5 * (1 + math.sqrt(0.5)) / 2, 0.25, 0.5 * (1 - math.sqrt(0.5)) / 2, 0.0, 0.0]
    )
    floor = Cosine(base_lr=0.05, max_lr=0.5, total_steps=111, warmup_steps=10, min_lr=0.1, momentum=0.9)
    assert [floor(k) for k in (5, 60, 110, 500)] == [
        Hyper(pytest.approx(0.275), 0.9),
        Hyper(pytest.approx(0.3), 0.9),
        Hyper(0.1, 0.9),
        Hyper(0.1, 0.9),
    ]
    assert Cosine(0.05, 0.5, total_steps=21)(0).lr == 0.5  # no warm-up: starts at the peak


def test_cosine_restarts_lengthen_and_lower_each_cycle_then_stay_at_the_floor():
    sgdr = Cosine(0.01, 1.0, 1000, cycle_steps=10, cycle_mul=2, cycle_decay=0.5, cycle_limit=3, min_lr=0.001)
    starts, peaks = (0, 10, 30), (1.0, 0.5, 0.25)  # cycles of 10, 20 and 40 steps
    assert [sgdr(k).lr for k in starts] == pytest.approx(peaks)
    halfway = [sgdr(k).lr for k in (5, 20, 50)]
    assert halfway == pytest.approx([(peak + 0.001) / 2 for peak in peaks])
    assert [sgdr(k).lr for k in (70, 71, 999)] == [0.001] * 3
    even = Cosine(0.01, 1.0, 1000, warmup_steps=4, cycle_steps=10, cycle_decay=0.5, cycle_limit=3)
    assert [even(k).lr for k in (4, 9, 14, 19, 24, 29, 34)] == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.0])


def test_paper_formula_examples():
    """Values computed by hand from the paper's formula (arXiv 1506.01186, section 3.1)."""
    tri2 = Cyclic(0.001, 0.005, stepsize=2000, mode="triangular2")
    assert [tri2(k).lr for k in (0, 1000, 2000, 4000, 6000, 10000)] == pytest.approx(
        [0.001, 0.003, 0.005, 0.001, 0.003, 0.002]
    )
    exp = Cyclic(0.001, 0.006, stepsize=2000, mode="exp_range", gamma=0.99994)
    assert exp(2000).lr == pytest.approx(0.001 + 0.005 * 0.99994**2000)


POLICIES = {  # every policy, and the highest LR it may apply
    "fixed": (Fixed(lr=0.1), 0.1),
    "fixed_momentum": (Fixed(lr=0.1, momentum=0.9), 0.1),
    "triangular": (Cyclic(0.01, 0.1, stepsize=7), 0.1),
    "triangular2": (Cyclic(0.01, 0.1, stepsize=7, mode="triangular2", base_momentum=0.85, max_momentum=0.95), 0.1),
    "exp_range": (Cyclic(0.01, 0.1, stepsize=7, mode="exp_range", gamma=0.99), 0.1),
    "welch": (Cyclic(0.01, 0.1, stepsize=7, window="welch"), 0.1),
    "hann": (Cyclic(0.01, 0.1, stepsize=7, window="hann", mode="triangular2"), 0.1),
    "exp": (Exp(0.1, gamma=0.95), 0.1),
    "decay": (Decay(0.01, 0.1, stepsize=20), 0.1),
    "one_cycle": (OneCycle(0.01, 0.1, total_steps=50), 0.1),
    "one_cycle_no_momentum": (OneCycle(0.01, 0.1, total_steps=50, base_momentum=None, max_momentum=None), 0.1),
    "one_cycle_cos": (OneCycle(0.01, 0.1, total_steps=50, anneal="cos", pct_start=0.3), 0.1),
    "one_cycle_two_phase": (OneCycle(0.01, 0.1, total_steps=50, anneal="cos", pct_start=0.25, three_phase=False), 0.1),
    "cosine": (Cosine(0.01, 0.1, total_steps=50, warmup_steps=5, min_lr=1e-4), 0.1),
    "cosine_restarts": (
        Cosine(0.01, 0.1, 50, cycle_steps=6, cycle_mul=1.5, cycle_decay=0.7, cycle_limit=4, min_lr=1e-4),
        0.1,
    ),
    "range_test_linear": (LRRange(1e-4, 1.0, num_iter=50), 1.0),
    "range_test_exp": (LRRange(1e-4, 1.0, num_iter=50, mode="exp"), 1.0),
    "stages": (Stages(((20, Cyclic(0.01, 0.1, 5, "triangular2")), (10, Fixed(0.001)), (5, Decay(1e-4, 1e-3, 5)))), 0.1),
}


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_is_a_pure_bounded_function_of_the_step(name):
    policy, top = POLICIES[name]
    forward = [policy(step) for step in range(60)]
    backward = [policy(step) for step in reversed(range(60))][::-1]
    assert forward == backward  # no hidden state: order of calls does not matter
    for hyper in forward:
        assert 0 < hyper.lr <= top * (1 + 1e-12)
        assert hyper.momentum is None or 0 <= hyper.momentum < 1
    assert pickle.loads(pickle.dumps(policy)) == policy


def test_windows_share_bounds_and_period_and_differ_in_between():
    shapes = {w: Cyclic(0.1, 1.0, stepsize=10, window=w) for w in ("triangular", "welch", "hann")}
    for step in (0, 10, 20, 30, 40):
        assert len({round(p(step).lr, 12) for p in shapes.values()}) == 1  # same at the bounds
    assert [shapes["welch"](k).lr for k in range(40)] == pytest.approx([shapes["welch"](k + 20).lr for k in range(40)])
    quarter = {w: p(5).lr for w, p in shapes.items()}  # halfway up: x = 0.5
    assert quarter["triangular"] == pytest.approx(0.55)  # 1 - x
    assert quarter["welch"] == pytest.approx(0.1 + 0.9 * 0.75)  # 1 - x^2
    assert quarter["hann"] == pytest.approx(0.55)  # (1 + cos(pi x)) / 2
    assert shapes["hann"](2).lr < shapes["triangular"](2).lr < shapes["welch"](2).lr


def test_baselines_and_stages_follow_the_paper():
    assert Exp(0.1, gamma=0.9)(3).lr == pytest.approx(0.1 * 0.9**3)
    decay = Decay(0.001, 0.006, stepsize=100)
    assert [decay(k).lr for k in (0, 50, 100, 1000)] == pytest.approx([0.006, 0.0035, 0.001, 0.001])
    table2 = Stages(  # CIFAR-10, Table 2: triangular2 with bounds and stepsize shrinking per stage
        (
            (16000, Cyclic(0.001, 0.005, 2000, "triangular2")),
            (6000, Cyclic(0.0001, 0.0005, 1000, "triangular2")),
            (3000, Cyclic(0.00001, 0.00005, 500, "triangular2")),
        )
    )
    assert [table2(k).lr for k in (0, 2000, 16000, 17000, 22000, 22500, 25000)] == pytest.approx(
        [0.001, 0.005, 0.0001, 0.0005, 0.00001, 0.00005, 0.00001]
    )
    linear, exp = LRRange(0.01, 1.0, 101), LRRange(0.01, 1.0, 101, mode="exp")
    assert linear(50).lr == pytest.approx(0.505) and exp(50).lr == pytest.approx(0.1)
    assert linear(100).lr == pytest.approx(1.0) and exp(100).lr == pytest.approx(1.0)


def test_scheduler_applies_the_policy_and_resumes_from_its_state_dict(tmp_path):
    policy = OneCycle(0.01, 0.1, total_steps=40)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = PolicyScheduler(optimizer, policy)
    seen = []
    for _ in range(15):
        seen.append(Hyper(optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
        optimizer.step()
        scheduler.step()
    assert seen == [policy(k) for k in range(15)]
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")

    fresh = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = PolicyScheduler(fresh, Fixed(0.5))
    resumed.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=False))
    resumed.step()  # steps 15 onward continue the same schedule
    assert resumed.policy == policy and resumed.get_last_lr() == [pytest.approx(policy(16).lr)]
    assert pickle.loads(pickle.dumps(scheduler)).last_epoch == 15


REFUSED = [  # every validated setting: a value just outside what it allows, and the one line that says so
    (lambda: Cyclic(0.1, 0.1, 5), "base_lr: must be below max_lr, got 0.1 >= 0.1"),
    (lambda: Cyclic(0.5, 0.1, 5), "base_lr: must be below max_lr, got 0.5 >= 0.1"),
    (lambda: Cyclic(-1.0, 0.1, 5), "base_lr: must be a positive number, got -1.0"),
    (lambda: Cyclic(0.0, 0.1, 5), "base_lr: must be a positive number, got 0.0"),
    (lambda: Cyclic(0.01, math.inf, 5), "max_lr: must be a positive number, got inf"),
    (lambda: Cyclic(0.01, True, 5), "max_lr: must be a positive number, got True"),
    (lambda: Cyclic(0.01, 0.1, 0), "stepsize: must be a positive whole number of steps, got 0"),
    (lambda: Cyclic(0.01, 0.1, 2.5), "stepsize: must be a positive whole number of steps, got 2.5"),
    (lambda: Cyclic(0.01, 0.1, True), "stepsize: must be a positive whole number of steps, got True"),
    (
        lambda: Cyclic(0.01, 0.1, 5, mode="square"),
        "mode: must be one of triangular, triangular2, exp_range, got 'square'",
    ),
    (lambda: Cyclic(0.01, 0.1, 5, gamma=0.9), "gamma: only applies to mode exp_range, not triangular"),
    (lambda: Cyclic(0.01, 0.1, 5, "exp_range", gamma=1.0001), "gamma: must be in (0, 1], got 1.0001"),
    (lambda: Cyclic(0.01, 0.1, 5, "exp_range", gamma=0.0), "gamma: must be in (0, 1], got 0.0"),
    (lambda: Cyclic(0.01, 0.1, 5, "exp_range", gamma="0.9"), "gamma: must be in (0, 1], got '0.9'"),
    (
        lambda: Cyclic(0.01, 0.1, 5, base_momentum=0.8),
        "base_momentum: set both base_momentum and max_momentum to cycle momentum, or neither",
    ),
    (
        lambda: Cyclic(0.01, 0.1, 5, max_momentum=0.8),
        "base_momentum: set both base_momentum and max_momentum to cycle momentum, or neither",
    ),
    (
        lambda: Cyclic(0.01, 0.1, 5, base_momentum=0.8, max_momentum=1.0),
        "max_momentum: must be null or in [0, 1), got 1.0",
    ),
    (
        lambda: Cyclic(0.01, 0.1, 5, base_momentum=-0.1, max_momentum=0.9),
        "base_momentum: must be null or in [0, 1), got -0.1",
    ),
    (
        lambda: Cyclic(0.01, 0.1, 5, base_momentum=0.9, max_momentum=0.8),
        "base_momentum: must not exceed max_momentum, got 0.9 > 0.8",
    ),
    (lambda: Cyclic(0.01, 0.1, 5, window="cosine"), "window: must be one of triangular, welch, hann, got 'cosine'"),
    (lambda: OneCycle(0.01, 0.1, 1), "total_steps: must be at least 2, got 1"),
    (lambda: OneCycle(0.01, 0.1, 0), "total_steps: must be a positive whole number of steps, got 0"),
    (lambda: OneCycle(0.01, 0.1, 100, annihilate_pct=1.0), "annihilate_pct: must be in [0, 1), got 1.0"),
    (lambda: OneCycle(0.01, 0.1, 100, annihilate_pct=-0.01), "annihilate_pct: must be in [0, 1), got -0.01"),
    (lambda: OneCycle(0.01, 0.1, 100, annihilate_pct="0.1"), "annihilate_pct: must be in [0, 1), got '0.1'"),
    (lambda: OneCycle(0.01, 0.1, 100, final_div=0.99), "final_div: must be a number >= 1, got 0.99"),
    (lambda: OneCycle(0.01, 0.1, 100, final_div=math.nan), "final_div: must be a number >= 1, got nan"),
    (
        lambda: OneCycle(0.01, 0.1, 100, base_momentum=0.99),
        "base_momentum: must not exceed max_momentum, got 0.99 > 0.95",
    ),
    (lambda: OneCycle(0.1, 0.01, 100), "base_lr: must be below max_lr, got 0.1 >= 0.01"),
    (lambda: OneCycle(0.01, 0.1, 100, anneal="cosine"), "anneal: must be one of linear, cos, got 'cosine'"),
    (lambda: OneCycle(0.01, 0.1, 100, three_phase="no"), "three_phase: must be true or false, got 'no'"),
    (
        lambda: OneCycle(0.01, 0.1, 100, 0.1, pct_start=0.3),
        "pct_start: give pct_start or annihilate_pct, not both (annihilation takes 1 - 2 pct_start)",
    ),
    (
        lambda: OneCycle(0.01, 0.1, 100, pct_start=0.51),
        "pct_start: must be in (0, 0.5] with three_phase=true (the fall is as long as the rise), got 0.51",
    ),
    (
        lambda: OneCycle(0.01, 0.1, 100, pct_start=0.0),
        "pct_start: must be in (0, 0.5] with three_phase=true (the fall is as long as the rise), got 0.0",
    ),
    (
        lambda: OneCycle(0.01, 0.1, 100, 0.1, pct_start=0.25, three_phase=False),
        "annihilate_pct: only applies to three_phase=true; the two-phase form falls straight to "
        "base_lr/final_div over the rest of the run after pct_start",
    ),
    (
        lambda: OneCycle(0.01, 0.1, 100, three_phase=False),
        "pct_start: must be in (0, 1) with three_phase=false (the share of the run rising), got None",
    ),
    (
        lambda: OneCycle(0.01, 0.1, 100, pct_start=1.0, three_phase=False),
        "pct_start: must be in (0, 1) with three_phase=false (the share of the run rising), got 1.0",
    ),
    (
        lambda: OneCycle(0.01, 0.1, 100, pct_start=0.0, three_phase=False),
        "pct_start: must be in (0, 1) with three_phase=false (the share of the run rising), got 0.0",
    ),
    (lambda: Cosine(0.1, 0.01, 100), "base_lr: must be below max_lr, got 0.1 >= 0.01"),
    (lambda: Cosine(0.01, 0.1, 0), "total_steps: must be a positive whole number of steps, got 0"),
    (lambda: Cosine(0.01, 0.1, 100, warmup_steps=-1), "warmup_steps: must be a whole number of steps >= 0, got -1"),
    (lambda: Cosine(0.01, 0.1, 100, warmup_steps=2.5), "warmup_steps: must be a whole number of steps >= 0, got 2.5"),
    (lambda: Cosine(0.01, 0.1, 100, warmup_steps=True), "warmup_steps: must be a whole number of steps >= 0, got True"),
    (
        lambda: Cosine(0.01, 0.1, 100, warmup_steps=99),
        "warmup_steps: must leave the cosine a step: at most total_steps - 2 = 98, got 99",
    ),
    (lambda: Cosine(0.01, 0.1, 100, cycle_steps=0), "cycle_steps: must be a positive whole number of steps, got 0"),
    (lambda: Cosine(0.01, 0.1, 100, cycle_mul=0.99), "cycle_mul: must be a number >= 1, got 0.99"),
    (lambda: Cosine(0.01, 0.1, 100, cycle_mul=math.inf), "cycle_mul: must be a number >= 1, got inf"),
    (lambda: Cosine(0.01, 0.1, 100, cycle_decay=0.0), "cycle_decay: must be in (0, 1], got 0.0"),
    (lambda: Cosine(0.01, 0.1, 100, cycle_decay=1.01), "cycle_decay: must be in (0, 1], got 1.01"),
    (lambda: Cosine(0.01, 0.1, 100, cycle_limit=0), "cycle_limit: must be a positive whole number of cycles, got 0"),
    (lambda: Cosine(0.01, 0.1, 100, min_lr=-1e-9), "min_lr: must be in [0, max_lr), got -1e-09"),
    (lambda: Cosine(0.01, 0.1, 100, min_lr=0.1), "min_lr: must be in [0, max_lr), got 0.1"),
    (lambda: Cosine(0.01, 0.1, 100, min_lr=None), "min_lr: must be in [0, max_lr), got None"),
    (lambda: Cosine(0.01, 0.1, 100, momentum=1.0), "momentum: must be null or in [0, 1), got 1.0"),
    (lambda: Fixed(float("nan")), "lr: must be a positive number, got nan"),
    (lambda: Fixed(0.1, momentum=-0.1), "momentum: must be null or in [0, 1), got -0.1"),
    (lambda: Fixed(0.1, momentum=1.0), "momentum: must be null or in [0, 1), got 1.0"),
    (lambda: LRRange(1.0, 0.1, 100), "min_lr: must be below max_lr, got 1.0 >= 0.1"),
    (lambda: LRRange(0.1, 0.1, 100), "min_lr: must be below max_lr, got 0.1 >= 0.1"),
    (lambda: LRRange(0.0, 0.1, 100), "min_lr: must be a positive number, got 0.0"),
    (lambda: LRRange(1e-3, -1.0, 100), "max_lr: must be a positive number, got -1.0"),
    (lambda: LRRange(1e-3, 1.0, 0), "num_iter: must be a positive whole number of steps, got 0"),
    (lambda: LRRange(1e-3, 1.0, 1), "num_iter: must be at least 2, got 1"),
    (lambda: LRRange(1e-3, 1.0, 100, mode="cubic"), "mode: must be one of linear, exp, got 'cubic'"),
    (lambda: LRRange(1e-3, 1.0, 100, momentum=1.0), "momentum: must be null or in [0, 1), got 1.0"),
    (lambda: LRRange(1e-3, 1.0, 100, beta=1.0), "beta: must be in [0, 1), got 1.0"),
    (lambda: LRRange(1e-3, 1.0, 100, beta=-0.01), "beta: must be in [0, 1), got -0.01"),
    (lambda: LRRange(1e-3, 1.0, 100, stop_factor=1.0), "stop_factor: must be a number above 1, got 1.0"),
    (lambda: LRRange(1e-3, 1.0, 100, stop_factor=-4.0), "stop_factor: must be a number above 1, got -4.0"),
    (lambda: LRRange(1e-3, 1.0, 100, val_every=-1), "val_every: must be a whole number >= 0 (0: off), got -1"),
    (lambda: LRRange(1e-3, 1.0, 100, val_every=2.5), "val_every: must be a whole number >= 0 (0: off), got 2.5"),
    (
        lambda: LRRange(1e-3, 1.0, 100, rule="best"),
        "rule: must be one of paper, steepest, minimum/10, valley, got 'best'",
    ),
    (lambda: LRRange(1e-3, 1.0, 100, div=1.0), "div: must be a number above 1, got 1.0"),
    (lambda: LRRange(1e-3, 1.0, 100, div=0.0), "div: must be a number above 1, got 0.0"),
    (lambda: LRRange(1e-3, 1.0, 100, scale=0.0), "scale: must be a positive number, got 0.0"),
    (lambda: LRRange(1e-3, 1.0, 100, scale=math.inf), "scale: must be a positive number, got inf"),
    (lambda: Decay(0.1, 0.01, 5), "base_lr: must be below max_lr, got 0.1 >= 0.01"),
    (lambda: Decay(0.01, 0.1, 0), "stepsize: must be a positive whole number of steps, got 0"),
    (lambda: Decay(0.01, 0.1, 5, momentum=1.0), "momentum: must be null or in [0, 1), got 1.0"),
    (lambda: Exp(0.1, gamma=1.5), "gamma: must be in (0, 1], got 1.5"),
    (lambda: Exp(0.1, gamma=0.0), "gamma: must be in (0, 1], got 0.0"),
    (lambda: Exp(0.0), "base_lr: must be a positive number, got 0.0"),
    (lambda: Exp(0.1, momentum=1.0), "momentum: must be null or in [0, 1), got 1.0"),
    (lambda: Stages(()), "stages: needs at least one stage"),
    (
        lambda: Stages(((5, Fixed(0.1)), (0, Fixed(0.01)))),
        "stages[1].steps: must be a positive whole number of steps, got 0",
    ),
]


@pytest.mark.parametrize("make, message", REFUSED)
def test_bad_values_name_the_setting(make, message):
    with pytest.raises(ConfigError) as raised:
        make()
    assert str(raised.value) == message
    assert raised.value.setting == message.split(":")[0]


def test_the_edges_of_every_allowed_range_are_accepted():
    Cyclic(0.01, 0.1, 1, "exp_range", gamma=1.0, base_momentum=0.0, max_momentum=0.0)
    Cyclic(0.01, 0.1, 1, "exp_range", gamma=1e-300, base_momentum=0.9, max_momentum=0.9)
    OneCycle(0.01, 0.1, 2, annihilate_pct=0.0, final_div=1.0, base_momentum=None, max_momentum=None)
    assert OneCycle(0.01, 0.1, 3, pct_start=0.5)(2).lr == pytest.approx(0.01)  # no annihilation left
    assert OneCycle(0.01, 0.1, 3, pct_start=0.999, three_phase=False)(2).lr == pytest.approx(1e-4)
    OneCycle(0.01, 0.1, 3, pct_start=1e-9, three_phase=False)
    assert Cosine(0.01, 0.1, 3, warmup_steps=1)(2).lr == 0.0  # the most warm-up an unset cycle allows
    Cosine(0.01, 0.1, 1, warmup_steps=0, cycle_steps=1, cycle_mul=1.0, cycle_decay=1e-300, cycle_limit=1)
    Cosine(0.01, 0.1, 5, warmup_steps=9, cycle_steps=3, min_lr=0.1 * (1 - 1e-12), momentum=0.0)
    Fixed(1e-300, momentum=0.0)
    Exp(0.1, gamma=1.0)
    Decay(0.01, 0.1, 1)
    assert Stages(((3, Fixed(0.1)),))(7) == Hyper(0.1)  # one stage is enough
    policy = LRRange(0.01, 0.1, 2, beta=0.0, stop_factor=1.0001, val_every=0, div=1.0001, scale=1e-300)
    assert [policy(0).lr, policy(1).lr, policy(5).lr] == [0.01, 0.1, 0.1]


def test_range_test_defaults_are_fastais():
    """Smoothing 0.98, stop at 4x the best loss, the lower bound a quarter of max_lr by minimum/10."""
    policy = LRRange(1e-4, 1.0, 100)
    assert (policy.mode, policy.beta, policy.stop_factor, policy.val_every) == ("linear", 0.98, 4.0, 0)
    assert (policy.rule, policy.div, policy.scale, policy.momentum) == ("minimum/10", 4.0, 1.0, None)


def test_policy_defaults():
    assert Cyclic(0.01, 0.1, 5) == Cyclic(0.01, 0.1, 5, "triangular", 1.0, None, None, "triangular")
    assert OneCycle(0.01, 0.1, 5) == OneCycle(0.01, 0.1, 5, None, 100.0, 0.85, 0.95, "linear", None, True)
    assert OneCycle(0.01, 0.1, 101).peak == OneCycle(0.01, 0.1, 101, 0.1).peak == 45  # the paper's 10% annihilation
    assert Cosine(0.01, 0.1, 5) == Cosine(0.01, 0.1, 5, 0, None, 1.0, 1.0, 1, 0.0, None)
    assert Exp(0.1) == Exp(0.1, 0.9999, None) and Fixed(0.1).momentum is None and Decay(0.01, 0.1, 5).momentum is None


def test_hyper_goes_into_every_group_sgd_momentum_and_adam_beta1():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    sgd = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.1}], lr=1.0, momentum=0.9)
    apply_hyper(sgd, Hyper(0.5, 0.85))
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.5, 0.05])
    assert [g["momentum"] for g in sgd.param_groups] == [0.85, 0.85]
    adam = torch.optim.Adam(params, lr=1.0, betas=(0.9, 0.99))
    apply_hyper(adam, Hyper(0.01, 0.85))
    assert adam.param_groups[0]["betas"] == (0.85, 0.99)
    assert momentum_name(adam) == "beta1" and momentum_name(sgd) == "momentum"
    apply_hyper(adam, Hyper(0.02))  # no momentum: leave beta1 alone
    assert adam.param_groups[0]["betas"] == (0.85, 0.99) and adam.param_groups[0]["lr"] == 0.02


@pytest.mark.parametrize(
    "policy",
    [Fixed(0.1, 0.8), Exp(0.1, 0.9, 0.8), Decay(0.01, 0.1, 5, 0.8), LRRange(0.01, 1.0, 5, momentum=0.8)]
    + [LRRange(0.01, 1.0, 5, mode="exp", momentum=0.8), Cosine(0.01, 0.1, 6, warmup_steps=3, momentum=0.8)],
    ids=["fixed", "exp", "decay", "range_test", "range_test_exp", "cosine"],
)
def test_a_fixed_momentum_is_applied_at_every_step(policy):
    assert [policy(step).momentum for step in range(8)] == [0.8] * 8
