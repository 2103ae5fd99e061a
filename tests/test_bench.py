"""The speed benchmark runs end to end (its figures are read by people, not asserted), and its
reference is a real training run."""

import json

import pytest

from clrx.config.schema import compose_run
from clrx.studies.bench import main
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
    args = ["--block", "2", "--repeats", "2", "--runs", "1", "--out", str(tmp_path / "bench.json")]
    main([*args, "trainer.batch_size=32", "trainer.epochs=1"])
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in (
        "step_reference_ms",
        "step_clrx_ms",
        "step_ratio",
        "end_to_end_ratio",
        "train_and_eval_ratio",
        "startup_seconds",
        "import_torch_timm_seconds",
        "tiny_model_reference_us_per_step",
        "logging_us_per_step",
        "peak_rss_mb",
    ):
        assert figures[key] > 0, key
    low, high = figures["step_ratio_95ci"]
    assert low <= figures["step_ratio"] <= high
    assert figures["step_ratio"] == pytest.approx(figures["step_clrx_ms"] / figures["step_reference_ms"], rel=1.0)
