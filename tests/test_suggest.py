"""The range test's stop rule and every suggestion rule on curves built by hand, against values worked out here."""

import math

import pytest

from clrx.range_test.curve import Curve, Smoother
from clrx.range_test.suggest import Suggestion, bounds, read, smoothed_accuracy, suggest


def _curve(mode, lrs, smoothed, accuracy=None, val_accuracy=None):
    """A finished curve with these smoothed losses (beta 0: raw and smoothed are the same)."""
    return Curve(
        mode,
        beta=0.0,
        stop_factor=4.0,
        lrs=list(lrs),
        losses=list(smoothed),
        smoothed=list(smoothed),
        accuracy=list(accuracy or [None] * len(lrs)),
        val_accuracy=dict(val_accuracy or {}),
    )


# 20 points, lr = 10 ** (-4 + i / 4): the first 10% (2 points) are skipped: the spike at 0 would be the steepest
# fall into point 1 and the dip at 1 the minimum; the bump at 5 interrupts the fall but not the longest falling run.
EXP_LRS = [10 ** (-4 + i / 4) for i in range(20)]
EXP_LOSSES = [9.0, 0.5, 3.0, 2.95, 2.9, 3.1, 2.8, 2.7, 2.6, 2.5, 2.3, 1.5, 1.2, 1.1, 1.0, 1.4, 2.0, 2.5, 3.5, 5.0]


def test_loss_rules_on_an_exp_curve():
    found = suggest(_curve("exp", EXP_LRS, EXP_LOSSES))
    assert set(found) == {"steepest", "minimum/10", "valley"}  # no accuracy: no paper rule
    # The lowest loss from point 2 on is 1.0 at point 14; the dip at point 1 is in the skipped start.
    assert found["minimum/10"].max_lr == pytest.approx(10**-0.5 / 10)
    # Central differences s[i+1] - s[i-1] over a constant step in log(lr), points 2..14:
    # +2.45 -0.10 +0.15 -0.10 -0.40 -0.20 -0.20 -0.30 -1.00 -1.10 -0.40 -0.20 +0.30: steepest at point 11.
    assert found["steepest"].max_lr == pytest.approx(10**-1.25)
    # Longest falling run in points 2..14: all but the bump, 12 long, from start 0 (end 12 minus 12) to end 12;
    # a third is 4, its half 2: local index 0 + 4 + 2 = 6, point 8.
    assert found["valley"].max_lr == pytest.approx(1e-2)
    assert found["valley"].base_lr is None and found["steepest"].base_lr is None
    assert {rule: s.rule for rule, s in found.items()} == {rule: rule for rule in found}
    assert found["steepest"].why == "fastest fall of the smoothed loss" and found["valley"].why == "fastai's valley"
    assert found["minimum/10"].why == "a tenth of the lowest loss's lr 0.316"


def test_the_skipped_spike_enters_no_slope():
    """Ten points skip one; the fall from the spike at 0 is not a slope: point 1 has no left neighbour read."""
    losses = [9.0, 5.0, 3.0, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.9]
    found = suggest(_curve("linear", [0.1 * (i + 1) for i in range(10)], losses))
    # (s[i+1] - s[i-1]) / 0.2 at points 2..7: -11.0 -1.5 -1.0 ...; with point 0 read, point 1 would give -30.
    assert found["steepest"].max_lr == pytest.approx(0.3)


def test_a_curve_still_falling_at_its_end():
    """The lowest loss is the last point: slopes stop one before it, and the steepest is there."""
    found = suggest(_curve("linear", [0.1, 0.2, 0.3, 0.4, 0.5], [5.0, 4.9, 4.8, 4.0, 1.0]))
    # (s[i+1] - s[i-1]) / 0.2 at points 1..3: -1.0 -4.5 -19.0
    assert found["steepest"].max_lr == pytest.approx(0.4) and found["minimum/10"].max_lr == pytest.approx(0.05)


def test_slopes_divide_by_the_lr_step_however_uneven():
    lrs = [0.1, 0.2, 0.3, 1.3, 2.3, 2.4]
    losses = [5.0, 4.8, 4.0, 3.0, 1.0, 2.0]
    # points 1..3: -1.0 / 0.2 = -5, -1.8 / 1.1 = -1.6, -3.0 / 2.0 = -1.5; times the step instead: -0.2, -1.98, -6
    assert suggest(_curve("linear", lrs, losses))["steepest"].max_lr == 0.2


def test_valley_counts_only_strict_falls():
    """A flat stretch is not a fall: 3, 2, 2, 1 falls three points long (3, 2, 1), from start 0 to end 3."""
    found = suggest(_curve("linear", [0.1, 0.2, 0.3, 0.4, 0.5], [3.0, 2.0, 2.0, 1.0, 2.0]))
    # a third of 3 is 1, its half 0: point 1 (counting the flat point as a fall would give 4 long, from -1: point 0)
    assert found["valley"].max_lr == pytest.approx(0.2)


def test_loss_rules_on_a_linear_curve_measure_slopes_in_lr():
    """Under ten points nothing is skipped; the slope is per unit of lr, not of log(lr)."""
    lrs = [0.1 * (i + 1) for i in range(8)]
    losses = [5.0, 4.9, 4.7, 3.0, 2.9, 2.5, 2.4, 2.45]
    found = suggest(_curve("linear", lrs, losses))
    # (s[i+1] - s[i-1]) / 0.2 for points 1..6: -1.5 -9.5 -9.0 -2.5 -2.5 -0.25; in log(lr) point 3 would be steeper.
    assert found["steepest"].max_lr == pytest.approx(0.3)
    assert found["minimum/10"].max_lr == pytest.approx(0.07)
    # Points 0..6 all fall: run of 7 from start -1 (end 6 minus 7) to end 6; a third is 7/3: -1 + 2 + 1 = 2.
    assert found["valley"].max_lr == pytest.approx(0.3)


def test_a_curve_without_descent_gives_no_suggestion():
    """Rising from the first point read: every rule says there is nothing to read, none picks a point."""
    suggestions, why = read(_curve("linear", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [0.1, 0.2, 0.3]), "policy.")
    assert suggestions == {}
    assert set(why) == {"paper", "steepest", "minimum/10", "valley"} and len(set(why.values())) == 1
    assert why["steepest"] == (
        "no descent: the smoothed loss never fell 5% below its 1 at lr 0.1 (step 0); "
        "widen the range (policy.min_lr, policy.max_lr) or raise policy.num_iter"
    )


LINEAR_LRS = [0.1 * (i + 1) for i in range(10)]
LINEAR_LOSSES = [3.0, 2.9, 2.8, 2.6, 2.3, 2.0, 1.8, 1.7, 1.65, 1.9]  # lowest at point 8: points 1..8 usable


def test_paper_rule_reads_the_batch_accuracy_rise():
    accuracy = [0.5, 0.10, 0.12, 0.20, 0.40, 0.60, 0.80, 0.85, 0.90, 0.30]
    paper = suggest(_curve("linear", LINEAR_LRS, LINEAR_LOSSES, accuracy))["paper"]
    # From 0.10 (point 1) to the best 0.90 (point 8), a rise of 0.80: 10% of it (>= 0.18) first at point 3,
    # 90% (>= 0.82) first at point 7. The 0.5 at point 0 is in the skipped start.
    assert (paper.base_lr, paper.max_lr) == (pytest.approx(0.4), pytest.approx(0.8))
    assert paper.why.startswith("smoothed batch accuracy")


def test_paper_rule_prefers_three_validation_points_over_batch_accuracy():
    accuracy = [0.5] * 10  # flat: read, it would fall back to the first and best points
    val = {2: 0.1, 4: 0.3, 6: 0.8, 8: 0.9, 9: 0.2}  # point 9 is past the lowest loss: not read
    paper = suggest(_curve("linear", LINEAR_LRS, LINEAR_LOSSES, accuracy, val))["paper"]
    # Rise 0.8 from point 2: 10% (>= 0.18) at point 4, 90% (>= 0.82) at point 8.
    assert (paper.base_lr, paper.max_lr) == (pytest.approx(0.5), pytest.approx(0.9))
    assert paper.why.startswith("validation accuracy")
    two = read(_curve("linear", LINEAR_LRS, LINEAR_LOSSES, accuracy, {4: 0.3, 6: 0.8}))[1]["paper"]
    # two validation points are not a curve: the flat batch accuracy is read, and has no rise
    assert two == "smoothed batch accuracy never rose above its 0.5 at step 1 before the loss minimum"
    three = suggest(_curve("linear", LINEAR_LRS, LINEAR_LOSSES, accuracy, {2: 0.1, 4: 0.3, 8: 0.9}))["paper"]
    assert three.why == "validation accuracy: 10% of its rise at lr 0.5, 90% at 0.9" and three.rule == "paper"


def test_paper_rule_falls_back_to_the_first_and_best_points_on_a_jump():
    accuracy = [0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.95, 0.9, 0.9]
    paper = suggest(_curve("linear", LINEAR_LRS, LINEAR_LOSSES, accuracy))["paper"]
    # The jump at point 5 holds both 10% and 90% of the rise; then base is point 1 and max the best, point 7.
    assert (paper.base_lr, paper.max_lr) == (pytest.approx(0.2), pytest.approx(0.8))


def test_paper_rule_needs_two_accuracy_points():
    assert "paper" not in suggest(_curve("linear", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [0.1, 0.2, 0.3]))
    two = suggest(_curve("linear", [0.1, 0.2, 0.3], [2.0, 1.0, 3.0], [0.1, 0.5, 0.2]))["paper"]
    assert (two.base_lr, two.max_lr) == (0.1, 0.2)  # both shares reached at once at point 1: first and best
    partial = _curve("linear", LINEAR_LRS, LINEAR_LOSSES, [0.1] * 9 + [None])
    assert smoothed_accuracy(partial) is None and "paper" not in suggest(partial)


def test_smoothed_accuracy_uses_the_curves_smoothing():
    curve = _curve("linear", [0.1, 0.2], [1.0, 1.0], [0.2, 0.6])
    curve.beta = 0.5
    # averages 0.1 then 0.35, corrected by 1 - 0.5 and 1 - 0.25
    assert smoothed_accuracy(curve) == ([0, 1], [pytest.approx(0.2), pytest.approx(0.35 / 0.75)])


def test_bounds_take_the_rules_base_or_max_over_div_times_scale():
    found = {"paper": Suggestion("paper", 0.8, 0.3), "steepest": Suggestion("steepest", 0.6)}
    assert bounds(found, "paper", div=4) == (0.3, 0.8)
    assert bounds(found, "steepest", div=4) == (0.15, 0.6)
    assert bounds(found, "steepest", div=3, scale=2) == (pytest.approx(0.4), 1.2)
    assert bounds(found, "paper", div=4, scale=0.5) == (0.15, 0.4)


def test_smoother_is_a_bias_corrected_moving_average():
    smooth = Smoother(0.5)
    # averages 0.5, 1.25, 1.625 corrected by 0.5, 0.75, 0.875
    assert [smooth(v) for v in (1.0, 2.0, 2.0)] == pytest.approx([1.0, 5 / 3, 13 / 7])
    assert [Smoother(0.0)(v) for v in (3.0, 7.0)] == [3.0, 7.0]


@pytest.mark.parametrize("last, stops", [(7.99, False), (8.0, False), (8.01, True)])
def test_stop_rule_without_smoothing(last, stops):
    """Best 2.0 so far: the test stops above 4 x 2.0."""
    curve = Curve("exp", beta=0.0, stop_factor=4.0)
    assert [curve.add(lr, loss) for lr, loss in ((0.1, 3.0), (0.2, 2.0))] == [False, False]
    assert curve.add(0.3, last) is stops
    assert curve.smoothed == [3.0, 2.0, last]
    assert (curve.stop_reason is not None) is stops
    if stops:
        assert curve.stop_reason == "smoothed loss 8.01 exceeded 4x its minimum 2 at lr 0.3"


@pytest.mark.parametrize("last, stops", [(5.49, False), (5.51, True)])
def test_stop_rule_on_the_bias_corrected_average(last, stops):
    """beta 0.5: after 1.0 the average is 0.5 (corrected: 1.0); adding v gives (0.25 + v/2) / 0.75.

    That exceeds 4 x 1.0 for v above 5.5; uncorrected, the same losses would compare 0.25 + v/2 with 4 x 0.5.
    """
    curve = Curve("exp", beta=0.5, stop_factor=4.0)
    assert curve.add(0.1, 1.0) is False
    assert curve.add(0.2, last) is stops
    assert curve.smoothed == [1.0, pytest.approx((0.25 + last / 2) / 0.75)]


def test_stop_factor_is_the_curves_own():
    curve = Curve("exp", beta=0.0, stop_factor=2.0)
    curve.add(0.1, 1.0)
    assert curve.add(0.2, 1.99) is False and curve.add(0.3, 2.01) is True


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_non_finite_loss_stops_at_once(loss):
    curve = Curve("linear", beta=0.98, stop_factor=4.0)
    assert curve.add(0.1, 1.0) is False
    assert curve.add(0.25, loss) is True
    assert curve.smoothed == [1.0, math.inf] and curve.stop_reason == f"loss became {loss} at lr 0.25"


def test_rows_hold_every_step_with_blanks_where_nothing_was_measured(tmp_path):
    curve = Curve("linear", beta=0.0, stop_factor=4.0)
    curve.add(0.1, 2.0, 0.25)
    curve.add(0.2, 1.5)
    curve.val_accuracy[1], curve.val_loss[1] = 0.5, 0.7
    assert curve.rows() == [
        {"step": 0, "lr": 0.1, "loss": 2.0, "smoothed_loss": 2.0, "accuracy": 0.25, "val_accuracy": "", "val_loss": ""},
        {"step": 1, "lr": 0.2, "loss": 1.5, "smoothed_loss": 1.5, "accuracy": "", "val_accuracy": 0.5, "val_loss": 0.7},
    ]
    curve.write_csv(tmp_path / "curve.csv")
    single = Curve("linear", beta=0.0, stop_factor=4.0)
    single.add(0.1, 2.0)
    single.write_csv(tmp_path / "single.csv")
    assert (tmp_path / "single.csv").read_text().splitlines()[1] == "0,0.1,2.0,2.0,,,"
    assert (tmp_path / "curve.csv").read_text().splitlines() == [
        "step,lr,loss,smoothed_loss,accuracy,val_accuracy,val_loss",
        "0,0.1,2.0,2.0,0.25,,",
        "1,0.2,1.5,1.5,,0.5,0.7",
    ]


def test_valley_of_a_run_from_the_first_usable_point_stays_in_the_usable_part():
    # 2 points (under 10: none skipped) falling into the minimum at point 1: the run is points 0..1 and fastai's
    # start one before it, -1; a third of 2 is 0, so the pick would be index -1, the highest lr: it is point 0.
    found = suggest(_curve("linear", [0.1, 0.2], [2.0, 1.0]))
    assert found["valley"].max_lr == 0.1


# 50 points from lr 1e-5 up by a tenth of a decade: a logistic fall of 2 centred at lr 10**-2.5, a rise past 10**-1.
SPIKE_LRS = [10 ** (-5 + i / 10) for i in range(50)]


def _fall(lr):
    x = math.log10(lr)
    return 2.3 - 2.0 / (1 + math.exp(-(x + 2.5) * 3)) + (4.0 * (x + 1) if x > -1 else 0.0)


def test_an_early_spike_is_skipped_and_would_otherwise_be_picked():
    losses = [_fall(lr) for lr in SPIKE_LRS]
    losses[1], losses[2] = 0.01, 9.0  # a dip below any later loss, then a jump: both in the first 10% (5 points)
    found = suggest(_curve("exp", SPIKE_LRS, losses))
    assert found["steepest"].max_lr == pytest.approx(10**-2.5)  # the logistic's steepest point, in log(lr)
    lowest = min(range(5, 50), key=lambda i: losses[i])
    assert found["minimum/10"].max_lr == pytest.approx(SPIKE_LRS[lowest] / 10) and SPIKE_LRS[lowest] > 10**-2
    unskipped = suggest(_curve("exp", SPIKE_LRS, losses), skip_start=0.0)
    assert unskipped["minimum/10"].max_lr == pytest.approx(SPIKE_LRS[1] / 10)  # read, the dip is the minimum
    assert unskipped["steepest"].max_lr == pytest.approx(SPIKE_LRS[1])  # and the fall from 9 into it the steepest


@pytest.mark.parametrize("tail", [[math.nan] * 5, [math.inf, math.nan], [math.nan, 0.001, math.nan]])
def test_non_finite_points_are_never_picked(tail):
    """A NaN or inf tail, even one around a finite value lower than any: the picks of the curve without it."""
    losses = [_fall(lr) for lr in SPIKE_LRS[:40]]
    clean = suggest(_curve("exp", SPIKE_LRS[:40], losses), skip_start=0.1)
    lrs = SPIKE_LRS[: 40 + len(tail)]
    tailed = suggest(_curve("exp", lrs, losses + tail), skip_start=0.1 * 40 / len(lrs))  # the same 4 points skipped
    if math.isfinite(min(tail, key=lambda v: v if math.isfinite(v) else math.inf)):
        assert tailed["minimum/10"].max_lr == pytest.approx(lrs[41] / 10)  # a finite point in the tail is a point
    else:
        assert tailed == clean
    assert all(math.isfinite(s.max_lr) for s in tailed.values())


def test_a_curve_of_non_finite_losses_says_so():
    suggestions, why = read(_curve("exp", SPIKE_LRS[:10], [math.nan] * 10), "policy.")
    assert suggestions == {} and why["valley"] == (
        "needs >= 2 finite smoothed loss points after the first 0.1 of the steps (step 1), got 0; "
        "raise policy.num_iter or lower policy.skip_start"
    )


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_a_plateau_has_no_descent(noise):
    """A flat loss with noise under 5% of it: no rule picks its noise."""
    losses = [2.3 + noise * math.sin(7.0 * i) for i in range(50)]
    suggestions, why = read(_curve("exp", SPIKE_LRS, losses))
    assert suggestions == {} and all(reason.startswith("no descent") for reason in why.values())


def test_a_plateau_then_a_fall_is_read_in_the_fall():
    losses = [2.3] * 25 + [2.3 - 0.1 * i for i in range(1, 21)] + [1.0 + i for i in range(5)]
    found = suggest(_curve("exp", SPIKE_LRS, losses))
    assert found["minimum/10"].max_lr == pytest.approx(SPIKE_LRS[44] / 10)  # 0.3, the end of the fall
    assert SPIKE_LRS[25] <= found["valley"].max_lr <= SPIKE_LRS[44]
    assert SPIKE_LRS[25] <= found["steepest"].max_lr <= SPIKE_LRS[44]


def test_slopes_are_taken_against_log_lr_for_exp_sweeps_and_lr_for_linear_ones():
    """The same points: a fall of 1.0 around point 3 is steepest in log(lr), where the step is even; in lr the
    fall of 0.6 around point 2 is, its lr step being ten times smaller."""
    lrs = [10 ** (-4 + i / 2) for i in range(11)]
    losses = [3.0, 3.0, 2.9, 2.4, 1.9, 1.8, 1.7, 1.6, 1.5, 2.0, 3.0]
    # in log(lr): (s[i+1] - s[i-1]) / ln(10): point 2 -0.6, point 3 -1.0, point 4 -0.6: point 3
    assert suggest(_curve("exp", lrs, losses))["steepest"].max_lr == pytest.approx(10**-2.5)
    # in lr: point 2 -0.6 / (10**-2.5 - 10**-3.5) = -211, point 3 -1.0 / (10**-2 - 10**-3) = -111: point 2
    assert suggest(_curve("linear", lrs, losses))["steepest"].max_lr == pytest.approx(10**-3)


def test_the_validation_loss_is_read_where_it_was_measured():
    """metric val_loss: the rules read the validation points, not the training loss (here falling to the end)."""
    lrs = [0.01 * (i + 1) for i in range(40)]
    curve = _curve("linear", lrs, [3.0 - 0.05 * i for i in range(40)])
    curve.val_loss = {4: 2.5, 9: 2.4, 14: 1.6, 19: 1.2, 24: 1.1, 29: 1.5, 34: 4.0, 39: math.nan}
    found = suggest(curve, metric="val_loss")
    assert found["minimum/10"].max_lr == pytest.approx(0.025)  # lowest 1.1 at step 24
    # central differences over 0.1 of lr at steps 9..24: -9 -12 -5 +3: steepest at step 14
    assert (
        found["steepest"].max_lr == pytest.approx(0.15)
        and found["steepest"].why == "fastest fall of the validation loss"
    )
    assert suggest(curve)["minimum/10"].max_lr == pytest.approx(0.04)  # the training loss: lowest at lr 0.4
