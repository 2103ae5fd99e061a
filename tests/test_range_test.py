"""The LR range test against analytic facts, and automatic bounds through the real app."""

import copy
import json
import logging
import math
import os
import subprocess
import sys
from datetime import datetime

import pytest
import torch

from clrx.config.schema import compose_run
from clrx.errors import ConfigError
from clrx.range_test.curve import Curve
from clrx.range_test.run import lr_range_test
from clrx.range_test.suggest import Suggestion, bounds, read, suggest, suggestion_tags
from clrx.schedules.policies import LRRange
from clrx.tracking.opening import LocalStore
from clrx.training.auto import auto_bounds, range_test_key
from clrx.training.checkpoint import rng_state
from clrx.training.run import train
from clrx.training.session import prepare
from tests.conftest import ROOT, main_in_process


def _least_squares(curvature: float, dim: int = 20, seed: int = 0):
    """A full-batch least-squares problem whose Hessian's largest eigenvalue is ``curvature``."""
    generator = torch.Generator().manual_seed(seed)
    eigenvalues = torch.logspace(math.log10(curvature / 100), math.log10(curvature), dim, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    # MSE(Xw, y) = (1/n)|Xw - y|^2 has Hessian (2/n) X^T X: pick X so that this is Q diag(eig) Q^T.
    inputs = q @ torch.diag(torch.sqrt(eigenvalues * dim / 2)) @ q.T
    targets = inputs @ torch.randn(dim, 1, generator=generator, dtype=torch.float64)
    model = torch.nn.Linear(dim, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    return model, [(inputs, targets)]


@pytest.mark.parametrize("curvature", [0.5, 3.0, 40.0])
@pytest.mark.parametrize("mode", ["linear", "exp"])
def test_gradient_descent_divergence_at_two_over_l_is_found(curvature, mode):
    """Plain gradient descent on a quadratic diverges for lr > 2/L; the test must see it and stay below."""
    model, loader = _least_squares(curvature)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    edge = 2 / curvature
    policy = LRRange(min_lr=edge * 1e-3, max_lr=edge * 5, num_iter=200, mode=mode, beta=0.9)
    curve, suggestions = lr_range_test(model, loader, optimizer, policy, loss_fn=torch.nn.functional.mse_loss)
    assert curve.stop_reason is not None and curve.lrs[-1] > edge  # divergence detected, past the edge
    assert "paper" not in suggestions  # no accuracy in a regression: the paper's rule has nothing to read
    base_lr, max_lr = bounds(suggestions, policy.rule, policy.div)
    assert edge / 5 < max_lr < edge and base_lr == pytest.approx(max_lr / 4)
    assert all(s.max_lr < curve.lrs[-1] for s in suggestions.values())


def test_the_test_leaves_weights_and_optimizer_state_as_they_were():
    model, loader = _least_squares(3.0)
    torch.nn.init.normal_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(loader[0][0]).sum().backward()
    optimizer.step()  # some momentum buffer to restore
    weights, state = model.weight.detach().clone(), copy.deepcopy(optimizer.state_dict())
    lr_range_test(model, loader, optimizer, LRRange(1e-3, 5.0, 50), loss_fn=torch.nn.functional.mse_loss)
    assert torch.equal(model.weight, weights)
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])


def test_suggestions_ignore_a_noisy_start():
    """A spike and dip in the first steps must not become the steepest point or the minimum."""
    curve = Curve("exp", beta=0.0, stop_factor=4.0)
    lrs = [1e-5 * 10 ** (6 * i / 99) for i in range(100)]
    for i, lr in enumerate(lrs):
        loss = 2.0 - 1.5 / (1 + math.exp(-(math.log10(lr) + 2.5) * 4)) + (5.0 if lr > 0.3 else 0.0)
        curve.add(lr, loss + (-1.9 if i == 2 else 3.0 if i == 4 else 0.0))
    found = suggest(curve)
    assert 1e-4 < found["steepest"].max_lr < 1e-2 and 1e-3 < found["minimum/10"].max_lr < 3e-2


def test_paper_rule_reads_the_accuracy_rise():
    curve = Curve("linear", beta=0.0, stop_factor=4.0)
    for i in range(100):
        lr = 0.01 * (i + 1)
        accuracy = 0.1 + 0.8 / (1 + math.exp(-(lr - 0.4) * 20)) if lr < 0.8 else 0.3
        curve.add(lr, 2.0 - accuracy, accuracy)
    paper = suggest(curve)["paper"]
    # the logistic rise from 0.1 to 0.9 centred at 0.4 passes 10% near lr 0.29 and 90% near lr 0.51
    assert paper.base_lr == pytest.approx(0.29, abs=0.02) and paper.max_lr == pytest.approx(0.51, abs=0.02)


def _tags(store, run_id):
    return store[1].get_run(run_id).data.tags


def test_a_rule_without_enough_points_says_why():
    """Loss lowest at step 15 of 51, validation every 10 steps: one validation point to read from."""
    curve = Curve("linear", beta=0.0, stop_factor=100.0)
    for step in range(51):
        curve.add(0.01 * (step + 1), 2.0 - 0.1 * step if step <= 15 else 0.5 + 0.1 * (step - 15), 0.5)
        if (step + 1) % 10 == 0:
            curve.val_accuracy[step] = 0.5
    suggestions, no_suggestion = read(curve, "policy.")
    assert sorted(suggestions) == ["minimum/10", "steepest", "valley"]
    assert no_suggestion == {
        "paper": "needs >= 2 validation accuracy points from step 5 to the loss minimum at step 15, got 1; "
        "raise policy.num_iter or lower policy.val_every"
    }
    assert suggest(curve) == suggestions
    curve.accuracy = [None] * 51
    curve.val_accuracy = {}
    assert read(curve)[1]["paper"].startswith("needs an accuracy curve")


def test_cli_range_test_logs_curve_plot_csv_and_suggestions(tmp_path, store, monkeypatch, capsys):
    """Wherever the loss diverges, every rule leaves its bounds or why it has none, in tags and log."""
    uri, client = store
    status, _ = main_in_process(
        "policy=range_test",
        "policy.num_iter=60",
        "policy.val_every=10",
        "trainer.device=cpu",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path}/run",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 0
    [run] = client.search_runs(client.get_experiment_by_name("clrx").experiment_id)
    steps = [m.step for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    assert steps == list(range(len(steps))) and 5 <= len(steps) <= 60
    assert len(client.get_metric_history(run.info.run_id, "smoothed_loss")) == len(steps)
    tags = run.data.tags
    stopped = tags["clrx.range_test.stop"] != "completed 60 steps"
    assert stopped == (len(steps) < 60)
    validated = [s for s in range(9, len(steps), 10) if not (stopped and s == len(steps) - 1)]  # none at the stop
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == validated
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"range_test.csv", "plots/range_test.png"} <= artifacts
    log = (tmp_path / "run" / "__main__.log").read_text()
    assert f"range test ended: {tags['clrx.range_test.stop']}\n" in log
    for rule in ("steepest", "minimum/10", "valley"):  # the loss-based rules always read something
        assert 0 < json.loads(tags[f"clrx.suggest.{rule}"])["max_lr"] < 10
    if "clrx.suggest.paper" in tags:
        paper = json.loads(tags["clrx.suggest.paper"])
        assert paper["base_lr"] < paper["max_lr"] and "clrx.no_suggestion.paper" not in tags
    else:
        why = tags["clrx.no_suggestion.paper"]
        assert why.startswith("needs >= 2 validation accuracy points") and f"paper      none: {why}\n" in log
    assert "by rule minimum/10: policy.base_lr=" in log


def test_reused_range_test_is_announced_and_a_rule_without_bounds_says_why(tmp_path, store, caplog):
    uri, client = store
    cfg = compose_run("policy.max_lr=auto", "range_test.rule=paper", "trainer.device=cpu", f"tracking.uri={uri}")
    session = prepare(cfg)
    key = range_test_key(cfg, session.total_steps)
    why = "needs >= 2 validation accuracy points from step 5 to the loss minimum at step 15, got 1"
    earlier = client.create_run(
        client.create_experiment("clrx"),
        tags={
            "clrx.range_test_key": key,
            **suggestion_tags({"minimum/10": Suggestion("minimum/10", 0.1)}, {"paper": why}),
        },
    )
    client.set_terminated(earlier.info.run_id, "FINISHED")
    started = datetime.fromtimestamp(earlier.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
    with caplog.at_level(logging.INFO, "clrx"), pytest.raises(ConfigError) as raised:
        auto_bounds(session, LocalStore.of(client), tmp_path, {})
    assert str(raised.value) == f"range_test.rule: 'paper' gave no suggestion here ({why}); choose one of: minimum/10"
    assert f"reusing range test {earlier.info.run_id} from {started}" in caplog.messages


def test_auto_bounds_restore_the_start_and_match_typed_in_bounds(tmp_path, store, caplog):
    """max_lr=auto trains exactly as a run with the range test's bounds typed in; the test is cached."""
    uri, client = store
    common = ["trainer.epochs=4", "trainer.progress=false", "trainer.save_model=false", "trainer.device=cpu"]
    common.append(f"tracking.uri={uri}")
    cfg = compose_run("policy.base_lr=auto", "policy.max_lr=auto", *common)

    session = prepare(cfg)
    before, first_batch = copy.deepcopy(session.state()), next(session.epoch(0))[0][1]
    generators = rng_state()
    with caplog.at_level(logging.INFO, "clrx"):
        found, rule, range_run = auto_bounds(session, LocalStore.of(client), tmp_path, {})
    assert any(m.startswith(f"range test {range_run} ended: ") for m in caplog.messages)
    after = session.state()
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert before["optimizer"] == after["optimizer"] and torch.equal(generators["torch"], rng_state()["torch"])
    assert torch.equal(first_batch, next(session.epoch(0))[0][1])  # the labels of training's first batch
    assert 0 < found["base_lr"] < found["max_lr"] < 10 and rule == "minimum/10"

    with caplog.at_level(logging.INFO, "clrx"):
        auto = train(cfg, tmp_path / "auto")  # the cached test: no second range-test run
    assert any(m.startswith(f"reusing range test {range_run} from 20") for m in caplog.messages)
    typed = train(
        compose_run(f"policy.base_lr={found['base_lr']}", f"policy.max_lr={found['max_lr']}", *common),
        tmp_path / "typed",
    )
    assert auto.val_acc == typed.val_acc and auto.val_acc > 0.9  # the same bounds from the same start: the same run
    losses = [
        [m.value for m in sorted(client.get_metric_history(r.run_id, "train_loss"), key=lambda m: m.step)]
        for r in (auto, typed)
    ]
    assert losses[0] == losses[1]
    tests = client.search_runs(
        [client.get_experiment_by_name("clrx").experiment_id], "tags.`clrx.policy` = 'range_test'"
    )
    assert [r.info.run_id for r in tests] == [range_run]
    tags = _tags(store, auto.run_id)
    assert tags["clrx.range_test_run_id"] == range_run and tags["clrx.bounds_rule"] == "minimum/10"
    assert float(client.get_run(auto.run_id).data.params["bounds.max_lr"]) == pytest.approx(found["max_lr"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["policy=range_test", "policy.min_lr=1", "policy.max_lr=0.1"], "policy.min_lr: must be below max_lr"),
        (["policy=range_test", "policy.num_iter=0"], "policy.num_iter: must be a positive whole number"),
        (["policy=fixed", "policy.lr=auto"], "policy.lr: auto is for base_lr and max_lr of a policy with both bounds"),
        (["policy=range_test", "policy.min_lr=50", "policy.max_lr=1000"], "lower min_lr"),
        (["policy.max_lr=auto", "trainer.dry_run=true"], "trainer.dry_run: auto bounds come from a range test"),
    ],
)
def test_bad_range_test_input_is_one_line(tmp_path, store, monkeypatch, capsys, overrides, expected):
    uri, client = store
    status, stderr = main_in_process(
        *overrides, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/run", monkeypatch=monkeypatch, capsys=capsys
    )
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and expected in lines[0], stderr
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert all(r.info.status == "FAILED" for r in client.search_runs(experiments))  # none left RUNNING


def test_diverging_at_once_is_a_config_error_naming_min_lr():
    model, loader = _least_squares(3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match="lower min_lr"):
        lr_range_test(model, loader, optimizer, LRRange(10.0, 100.0, 100), loss_fn=torch.nn.functional.mse_loss)


def test_ranks_average_the_loss_and_agree_on_stop_and_suggestions(tmp_path):
    """Two CPU processes see different batches; deciding on the rank-averaged loss, they still agree."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "helpers" / "ranked_range_test.py"),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first["world"] == 2 and first == second
    assert first["steps"] < 80  # the divergence stop fired, at the same step on both ranks
    csvs = [(tmp_path / f"rank{rank}" / "range_test.csv").read_text().splitlines() for rank in (0, 1)]
    assert [row.split(",")[:4] for row in csvs[0]] == [row.split(",")[:4] for row in csvs[1]]


def test_the_cache_key_follows_what_shapes_the_curve_only():
    cfg = compose_run()
    key = range_test_key(cfg, 176)
    same = compose_run("range_test.rule=valley", "range_test.div=3", "range_test.scale=2", "policy=triangular")
    assert range_test_key(same, 176) == key  # readings of the curve and the trained policy do not change it
    assert range_test_key(cfg, 88) != key  # a shorter test (num_iter null follows the run's length)
    assert range_test_key(compose_run("optimizer.weight_decay=0"), 176) != key
    assert range_test_key(compose_run("trainer.batch_size=32"), 176) != key
