"""The speed benchmark runs end to end (its figures are read by people, not asserted), and its
reference is a real training run."""

import json

import pytest

from clrx.config.schema import compose_run
from clrx.studies.bench import main, median_interval, paired_ratios
from clrx.studies.hand_loop import hand_loop


def test_the_hand_written_reference_learns_and_follows_the_one_cycle_schedule():
    cfg = compose_run("trainer.epochs=2")
    loop, lrs, momenta = hand_loop(cfg), [], []
    for _ in range(2 * loop.steps_per_epoch):
        lrs.append(loop.optimizer.param_groups[0]["lr"])
        momenta.append(loop.optimizer.param_groups[0]["momentum"])
        loop.step()
    assert loop.evaluate() > 0.5  # digits: chance is 0.1
    policy = cfg.policy
    assert (lrs[0], max(lrs)) == pytest.approx((policy.base_lr, policy.max_lr), rel=0.05)
    assert lrs[-1] == pytest.approx(policy.base_lr / policy.final_div, rel=0.1)
    assert (min(momenta), max(momenta)) == pytest.approx((policy.base_momentum, policy.max_momentum), rel=0.01)


def test_bench_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--block", "2", "--repeats", "2", "--runs", "1", "--log-steps", "200"]
    args += ["--out", str(tmp_path / "bench.json")]
    main([*args, "trainer.batch_size=32", "trainer.epochs=1", "dataset.limit_train=128", "dataset.limit_val=64"])
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in (
        "step_reference_ms",
        "step_clrx_ms",
        "step_ratio",
        "end_to_end_ratio",
        "end_to_end_no_logged_model_ratio",
        "train_and_eval_ratio",
        "startup_clrx_ms",
        "import_torch_timm_seconds",
        "tiny_model_reference_us_per_step",
        "logging_us_per_step",
        "peak_rss_mb",
    ):
        assert figures[key] > 0, key
    for prefix in ("step_", "end_to_end_", "train_and_eval_", "startup_"):
        low, high = figures[f"{prefix}ratio_95ci"]
        assert low <= figures[f"{prefix}ratio"] <= high, prefix
    for name in ("clrx", "reference"):  # command to first step: within the whole run, after the imports
        startup = figures[f"startup_{name}_ms"] / 1000
        assert figures["import_torch_timm_seconds"] / 3 < startup < figures[f"end_to_end_{name}_ms"] / 1000, name


def test_ratios_pair_each_block_with_its_neighbour_and_take_medians():
    times = {"reference": [10.0, 20.0, 40.0], "clrx": [11.0, 20.0, 60.0]}  # pairs 1.1, 1.0, 1.5
    figures = paired_ratios(times, "step_")
    assert figures["step_reference_ms"] == 20.0 and figures["step_clrx_ms"] == 20.0
    assert figures["step_ratio"] == 1.1  # the median pair, not 20 / 20
    low, high = figures["step_ratio_95ci"]
    assert 1.0 <= low <= 1.1 <= high <= 1.5


def test_the_median_interval_is_exact_for_constant_values_and_widens_with_spread():
    assert median_interval([1.02] * 9) == [1.02, 1.02]
    values = [0.9, 0.95, 1.0, 1.0, 1.0, 1.05, 1.1]
    low, high = median_interval(values)
    assert 0.9 <= low < 1.0 < high <= 1.1  # a bootstrap median moves between the neighbours of 1.0
    assert median_interval(values) == [low, high]  # seeded: the same figures every time
