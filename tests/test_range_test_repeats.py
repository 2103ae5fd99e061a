"""Repeated range tests under one parent run, and the range test read off the validation loss, through the CLI."""

import json
import logging
import math
import statistics

import pytest
import torch

from clrx.config.schema import compose_run
from clrx.range_test.suggest import Suggestion, median_of
from clrx.tracking.opening import LocalStore
from clrx.training.auto import auto_bounds
from clrx.training.session import prepare
from tests.conftest import main_in_process

TINY = ["policy=range_test", "policy.num_iter=30", "policy.mode=exp", "policy.min_lr=1e-3", "trainer.device=cpu"]


def test_median_of_repeats_takes_each_rules_median_and_spread():
    readings = [
        ({"steepest": Suggestion("steepest", 0.1), "paper": Suggestion("paper", 0.4, 0.1)}, {"valley": "flat"}),
        ({"steepest": Suggestion("steepest", 0.3)}, {"paper": "no accuracy", "valley": "flat again"}),
        ({"steepest": Suggestion("steepest", 0.2), "paper": Suggestion("paper", 0.6, 0.3)}, {"valley": "flat"}),
    ]
    suggestions, why = median_of(readings)
    assert suggestions["steepest"] == Suggestion("steepest", 0.2, None, "median of 3/3 repeats (max_lr 0.1-0.3)")
    assert suggestions["paper"] == Suggestion(
        "paper", 0.5, 0.2, "median of 2/3 repeats (max_lr 0.4-0.6, base_lr 0.1-0.3)"
    )
    assert why == {"valley": "flat"} and "minimum/10" not in suggestions | why


def test_repeats_are_children_of_one_run_that_holds_the_medians(tmp_path, store, monkeypatch, capsys):
    uri, client = store
    status, err = main_in_process(
        *TINY,
        "policy.repeats=3",
        "trainer.seed=5",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path}/run",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 0, err
    runs = client.search_runs(client.get_experiment_by_name("clrx").experiment_id)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["clrx.seed"]) for r in children) == [5, 6, 7]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["trainer.seed"] for r in children} == {"5", "6", "7"}
    # The parent's suggestions are the medians of what the children logged, read back from the store.
    for rule in ("steepest", "minimum/10", "valley"):
        tops = [
            json.loads(r.data.tags[f"clrx.suggest.{rule}"])["max_lr"]
            for r in children
            if f"clrx.suggest.{rule}" in r.data.tags
        ]
        median = json.loads(parent.data.tags[f"clrx.suggest.{rule}"])
        assert median["max_lr"] == statistics.median(tops)
        assert median["why"].startswith(f"median of {len(tops)}/3 repeats (max_lr {min(tops):.3g}-{max(tops):.3g}")
    assert len({json.loads(r.data.tags["clrx.suggest.steepest"])["max_lr"] for r in children}) > 1  # seeds differ
    log = (tmp_path / "run" / "__main__.log").read_text()
    assert "range test ended: 3 repeats, seeds 5 on; read as medians" in log and "by rule minimum/10:" in log


def test_the_validation_loss_curve_is_measured_logged_and_read(tmp_path, store, monkeypatch, capsys):
    uri, client = store
    status, err = main_in_process(
        *TINY,
        "policy.metric=val_loss",
        "policy.val_every=3",
        "policy.num_iter=45",
        "policy.min_lr=0.01",
        "policy.max_lr=3",
        "policy.val_batches=2",
        "policy.stop_factor=100",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path}/run",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 0, err
    [run] = client.search_runs(client.get_experiment_by_name("clrx").experiment_id)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert sorted(history) == list(range(2, 45, 3))
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    tags = run.data.tags
    # The minimum/10 rule reads the logged validation points from step 4 (10% of 45) on.
    read = {step: value for step, value in history.items() if step >= 4}
    lowest = min(read, key=read.get)
    assert json.loads(tags["clrx.suggest.minimum/10"])["max_lr"] == lrs[lowest] / 10
    # steepest: central differences against log(lr) between logged neighbours, up to the lowest point
    steps = sorted(read)
    slopes = {
        steps[i]: (read[steps[i + 1]] - read[steps[i - 1]]) / math.log(lrs[steps[i + 1]] / lrs[steps[i - 1]])
        for i in range(1, steps.index(lowest) + 1)
    }
    steepest = json.loads(tags["clrx.suggest.steepest"])
    assert steepest["max_lr"] == lrs[min(slopes, key=slopes.get)]
    assert steepest["why"] == "fastest fall of the validation loss"


def test_val_loss_needs_val_every(tmp_path, store, monkeypatch, capsys):
    uri, client = store
    status, err = main_in_process(
        *TINY,
        "policy.metric=val_loss",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path}/run",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "clrx: error: policy.val_every: must be above 0 with metric=val_loss: "
        "the validation loss is measured every val_every steps"
    )


def test_the_validation_subset_is_the_same_first_batches_each_time():
    """evaluate(batches=k) scores the first k validation batches: the same samples, however often it is asked."""
    session = prepare(compose_run("trainer.device=cpu", "trainer.batch_size=32"))
    images, labels = next(iter(session.val_loader))
    logits = session.model.eval()(session.inputs(images, train=False))
    session.model.train()
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    one = session.evaluate(batches=1)
    assert one == session.evaluate(batches=1) and one["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert one["val_acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert session.evaluate(batches=10**6) == session.evaluate() != one


def test_a_range_too_low_to_move_the_loss_says_so_in_one_line(tmp_path, store, monkeypatch, capsys):
    uri, client = store
    args = ["policy=range_test", "policy.num_iter=20", "policy.min_lr=1e-7", "policy.max_lr=1e-6", "trainer.device=cpu"]
    status, err = main_in_process(
        *args, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/run", monkeypatch=monkeypatch, capsys=capsys
    )
    assert status == 0, err
    [run] = client.search_runs(client.get_experiment_by_name("clrx").experiment_id)
    assert not [tag for tag in run.data.tags if tag.startswith("clrx.suggest.")]
    why = run.data.tags["clrx.no_suggestion.minimum/10"]
    assert why.startswith("no descent: the smoothed loss never fell 5% below its ")
    log = (tmp_path / "run" / "__main__.log").read_text()
    assert log.count(why) == 1 and f"no rule suggests bounds: {why}\n" in log and "suggestions:" not in log


def test_auto_bounds_from_repeats_take_the_medians_and_are_reused(tmp_path, store, caplog):
    uri, client = store
    cfg = compose_run(
        "policy.max_lr=auto",
        "range_test.repeats=2",
        "range_test.num_iter=30",
        "range_test.mode=exp",
        "range_test.max_lr=3",
        "trainer.device=cpu",
        f"tracking.uri={uri}",
    )
    session = prepare(cfg)
    found, rule, parent = auto_bounds(session, LocalStore.of(client), tmp_path, {})
    children = client.search_runs(
        [client.get_experiment_by_name("clrx").experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert sorted(c.data.tags["clrx.seed"] for c in children) == ["0", "1"]
    assert not any("clrx.range_test_key" in c.data.tags for c in children)  # only the parent is the cached test
    tops = [json.loads(c.data.tags["clrx.suggest.minimum/10"])["max_lr"] for c in children]
    assert found["max_lr"] == statistics.median(tops) and found["base_lr"] == found["max_lr"] / cfg.range_test.div
    with caplog.at_level(logging.INFO, "clrx"):
        assert auto_bounds(session, LocalStore.of(client), tmp_path, {}) == (found, rule, parent)
    assert any(m.startswith(f"reusing range test {parent}") for m in caplog.messages)
