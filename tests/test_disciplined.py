"""The disciplined approach: its decision rules on constructed curves, and the command end to end on digits."""

import math
from pathlib import Path

import pytest
from mlflow.entities import ViewType

from clrx.config.schema import compose_run
from clrx.disciplined.__main__ import compose_root, main
from clrx.disciplined.procedure import Procedure
from clrx.disciplined.rules import (
    NoCandidate,
    Reading,
    bisection,
    choose_by_val_loss,
    choose_weight_decay,
    read_curve,
)

LRS = [0.1 * (i + 1) for i in range(20)]


def _curve(floor: float, diverges_at: int) -> list[float]:
    """A smoothed loss falling from 3 to ``floor`` at step 8, flat, then climbing steeply from ``diverges_at``."""
    values = []
    for i in range(20):
        value = 3 - (3 - floor) * min(i, 8) / 8
        values.append(value * (3 ** (i - diverges_at + 1) if i >= diverges_at else 1))
    return values


def _readings(*curves):
    return {wd: read_curve(LRS, curve, 2.0) for wd, curve in curves}


def test_a_curve_is_read_at_its_minimum_and_stable_until_it_doubles():
    reading = read_curve(LRS, _curve(1.0, diverges_at=12), stable_factor=2.0)
    assert reading.minimum == 1.0 and reading.lr_at_minimum == pytest.approx(0.9)
    # step 12 is 3x the minimum: the last stable point is step 11
    assert reading.stable_lr == pytest.approx(1.2)
    assert read_curve(LRS, _curve(1.0, diverges_at=12), stable_factor=4.0).stable_lr == pytest.approx(1.3)


def test_the_lowest_minimum_wins_clearly():
    readings = _readings((1e-3, _curve(1.5, 15)), (1e-4, _curve(1.0, 10)), (0.0, _curve(1.4, 18)))
    decision = choose_weight_decay(readings, tolerance=0.02, stable_factor=2.0)
    assert decision.chosen == 1e-4  # although the others stay stable to larger LRs
    assert decision.why[1e-4].endswith("chosen")
    assert "more than 2% above the lowest 1" in decision.why[1e-3]


def test_a_tie_goes_to_the_curve_stable_to_the_larger_lr():
    readings = _readings((1e-3, _curve(1.0, 10)), (1e-4, _curve(1.01, 16)), (1e-5, _curve(1.3, 19)))
    decision = choose_weight_decay(readings, tolerance=0.02, stable_factor=2.0)
    assert decision.chosen == 1e-4  # 1% above the lowest: tied, and stable to lr 1.6 instead of 1.0
    assert "of 2 tied" in decision.why[1e-4] and "tied, but stable to a smaller LR" in decision.why[1e-3]
    # without tolerance the lowest minimum wins outright
    assert choose_weight_decay(readings, tolerance=0.0, stable_factor=2.0).chosen == 1e-3
    # a tie on both counts goes to the larger weight decay
    same = {wd: Reading(1.0, 0.5, 1.0) for wd in (0.0, 1e-5, 1e-4)}
    assert choose_weight_decay(same, 0.02, 2.0).chosen == 1e-4


def test_a_diverging_weight_decay_is_left_out_and_named():
    readings = _readings((1e-4, _curve(1.2, 12)), (0.0, _curve(1.3, 12)))
    readings[1e-3] = "policy.min_lr: the loss diverged within the first 2 steps"
    decision = choose_weight_decay(readings, tolerance=0.02, stable_factor=2.0)
    assert decision.chosen == 1e-4 and decision.why[1e-3].startswith("failed: policy.min_lr")
    with pytest.raises(NoCandidate, match="every range test failed: wd 0.001 failed"):
        choose_weight_decay({1e-3: "diverged"}, 0.02, 2.0)
    with pytest.raises(ValueError, match="nowhere finite"):
        read_curve([1.0, 2.0], [math.inf, math.inf], 2.0)


def test_the_bisection_tries_three_times_and_a_third_and_the_lowest_val_loss_wins():
    assert bisection(1e-4, [3, 1, 1 / 3]) == [3e-4, 1e-4, 3.33e-5]
    decision = choose_by_val_loss(
        {3e-4: 0.31, 1e-4: 0.29, 3.33e-5: "TrainingDiverged: loss became nan", 1e-5: math.nan}
    )
    assert decision.chosen == 1e-4
    assert decision.why[3.33e-5].startswith("failed") and decision.why[1e-5] == "val_loss nan"
    with pytest.raises(NoCandidate, match="every short run failed"):
        choose_by_val_loss({1e-4: "diverged"})


@pytest.mark.parametrize("final_steps", [160, 1000, 39 * 90])  # digits' defaults; CIFAR-10's batch 512 for 90 epochs
def test_the_default_settings_cost_at_most_two_and_a_half_final_trainings(final_steps):
    """Priced from conf/disciplined/default.yaml as composed, every stage run, epochs to match ``final_steps``."""
    epochs = 8 if final_steps == 160 else 90 if final_steps > 1000 else 10
    procedure = Procedure(compose_root([f"trainer.epochs={epochs}"]), [], client=None, parent="", out=Path("."))
    procedure.steps_per_epoch, procedure.final_steps = final_steps // epochs, final_steps
    budget = procedure.budget()
    assert (budget.range_tests, budget.short_runs, budget.extra_range_test) == (4, 3, True)
    assert budget.final_steps == final_steps and budget.total <= 2.5 * final_steps
    assert budget.lines()[-1] == (
        f"  at most {budget.total} optimizer steps in all, {budget.total / final_steps:.2f}x the final training"
    )
    # a given weight decay leaves one range test (for the bounds) and no short run
    given = Procedure(compose_root([f"trainer.epochs={epochs}"]), ["optimizer.weight_decay=1e-4"], None, "", Path("."))
    given.steps_per_epoch, given.final_steps = procedure.steps_per_epoch, final_steps
    assert (given.budget().range_tests, given.budget().short_runs, given.budget().extra_range_test) == (1, 0, False)
    # a range test's length given on the command line is the one priced (and run)
    length = Procedure(compose_root(["range_test.num_iter=7"]), ["range_test.num_iter=7"], None, "", Path("."))
    length.steps_per_epoch, length.final_steps = procedure.steps_per_epoch, final_steps
    assert length.budget().range_test_steps == 7


TINY = (
    "dataset.limit_train=256",
    "dataset.limit_val=64",
    "trainer.epochs=2",
    "trainer.progress=false",
    "disciplined.batch.min_steps_per_epoch=4",
    # 20 steps from 1e-3, spaced in log-LR as the procedure's tests are: each curve has a descent to read
    "range_test.min_lr=1e-3",
    "range_test.num_iter=20",
)


def _family(client, out):
    """The parent run (named in the report's folder) and its children, in the order they ran."""
    [parent] = client.search_runs(
        [client.get_experiment_by_name("clrx").experiment_id],
        f"tags.`clrx.output_dir` = '{out.resolve()}'",
        run_view_type=ViewType.ALL,
    )
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", run_view_type=ViewType.ALL
    )
    return parent, sorted(children, key=lambda run: int(run.data.tags["clrx.job"]))


def test_every_stage_runs_under_one_parent_and_the_command_repeats_the_last_run(tmp_path, store, capsys):
    uri, client = store
    out = tmp_path / "out"
    main([*TINY, "disciplined.weight_decay.grid=[1e-3,1e-4]", f"tracking.uri={uri}", f"disciplined.out={out}"])
    printed = capsys.readouterr().out
    parent, children = _family(client, out)
    assert parent.info.status == "FINISHED"
    stages = [child.data.tags["clrx.disciplined.stage"] for child in children]
    # two range tests, three short runs, perhaps one more range test at a bisected weight decay, the training
    assert stages[:5] == ["weight_decay"] * 2 + ["bisect"] * 3 and stages[-1] == "train"
    assert stages[5:-1] in ([], ["bounds"])
    assert all(child.info.status == "FINISHED" for child in children)
    tests = [child for child in children if child.data.params.get("policy.num_iter") == "20"]
    assert len(tests) == stages.count("weight_decay") + stages.count("bounds")
    assert all(child.data.params["policy.mode"] == "exp" for child in tests)  # the short tests sweep in log-LR
    assert "budget estimate, before any training" in printed and "1. Batch size" in printed
    assert printed.index("budget estimate") < printed.index("range test wd 0.001: training")
    # the largest batch up to 256 images / 4 steps: nothing runs out of memory here
    assert "batch 64" in printed and children[-1].data.params["trainer.batch_size"] == "64"
    [command] = [line for line in printed.splitlines() if line.startswith("python -m clrx ")]
    assert parent.data.tags["clrx.disciplined.command"] == command
    # the command composes the config the final run logged, key by key
    final = children[-1].data.params
    cfg = compose_run(*command.split()[3:])
    for key in ("optimizer.weight_decay", "policy.max_lr", "policy.base_lr", "trainer.batch_size", "trainer.epochs"):
        assert str(cfg[key.split(".")[0]][key.split(".")[1]]) == final[key], key
    assert final["policy.base_momentum"] == "0.85" and final["policy.max_momentum"] == "0.95"
    chosen = float(final["optimizer.weight_decay"])
    shorts = [float(child.data.params["optimizer.weight_decay"]) for child in children[2:5]]
    assert (
        chosen in shorts
        and shorts[1] in (1e-3, 1e-4)
        and shorts == pytest.approx([3 * shorts[1], shorts[1], shorts[1] / 3], rel=1e-2)
    )
    assert all(child.data.params["trainer.epochs"] == "1" for child in children[2:5])  # a quarter of 2, at least 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/disciplined.md", "report/stage2.png", "report/stage3.png", "report/stage5.png"} <= artifacts
    text = (out / "disciplined.md").read_text()
    for rule in ("Rule: lowest minimum of the smoothed range-test loss", "Rule: lowest final validation loss"):
        assert rule in text
    assert "Rule: range_test.rule minimum/10" in text and command in text

    # Only the range tests again: every one is reused from the store, none runs anew.
    again = tmp_path / "again"
    stages_only = "disciplined.stages=[weight_decay]"
    main(
        [
            *TINY,
            "disciplined.weight_decay.grid=[1e-3,1e-4]",
            stages_only,
            f"tracking.uri={uri}",
            f"disciplined.out={again}",
        ]
    )
    printed = capsys.readouterr().out
    parent_again, rerun = _family(client, again)
    assert rerun == [] and parent_again.info.status == "FINISHED"
    for child in children[:2]:
        assert f"reusing run {child.info.run_id}" in printed
    assert "5. Full one-cycle training: skipped: not in disciplined.stages" in printed


def test_given_inputs_skip_their_stages(tmp_path, store, capsys):
    uri, client = store
    out = tmp_path / "out"
    given = ("trainer.batch_size=32", "optimizer.weight_decay=1e-4", "policy.max_lr=0.3", "policy.base_lr=0.03")
    main([*TINY, *given, f"tracking.uri={uri}", f"disciplined.out={out}"])
    printed = capsys.readouterr().out
    parent, children = _family(client, out)
    assert [child.data.tags["clrx.disciplined.stage"] for child in children] == ["train"]
    assert "1. Batch size: the largest that trains a step: skipped: trainer.batch_size=32 given" in printed
    assert "one LR range test per candidate: skipped: optimizer.weight_decay=1e-4 given" in printed
    assert "bisection with short one-cycle runs: skipped: optimizer.weight_decay=1e-4 given" in printed
    assert "4. LR bounds at the chosen weight decay: skipped: policy.max_lr=0.3 given" in printed
    params = children[0].data.params
    assert (params["trainer.batch_size"], params["optimizer.weight_decay"], params["policy.max_lr"]) == (
        "32",
        "0.0001",
        "0.3",
    )
    assert "final training: 16 steps (1.00x)" in printed  # 256 / 32 x 2 epochs, and nothing else
    assert parent.info.status == "FINISHED"


def test_a_failing_range_test_is_reported_and_the_others_go_on(tmp_path, store, capsys):
    uri, client = store
    out = tmp_path / "out"
    # weight decay 1e6 blows the weights up as soon as the LR leaves its minimum
    only = ("disciplined.weight_decay.grid=[1e6,1e-4]", "disciplined.stages=[weight_decay,bounds]")
    main([*TINY, *only, f"tracking.uri={uri}", f"disciplined.out={out}"])
    printed = capsys.readouterr().out
    parent, children = _family(client, out)
    assert [child.info.status for child in children] == ["FAILED", "FINISHED"]
    assert "range test wd 1e+06: failed: range_test.min_lr: the loss diverged" in printed
    assert "2. Weight decay: one LR range test per candidate: weight decay 0.0001" in printed
    assert "| 1e+06 |  | failed: range_test.min_lr" in (out / "disciplined.md").read_text()
    assert parent.info.status == "FINISHED"

    # With no candidate left the procedure stops in one line, its parent FAILED.
    with pytest.raises(SystemExit) as exited:
        main(
            [
                *TINY,
                "disciplined.weight_decay.grid=[1e6]",
                f"tracking.uri={uri}",
                f"disciplined.out={tmp_path / 'none'}",
            ]
        )
    err = capsys.readouterr().err
    assert exited.value.code == 1
    assert err.strip().splitlines()[-1].startswith("clrx.disciplined: error: every range test failed: wd 1e+06 failed")
    parent, _ = _family(client, tmp_path / "none")
    assert parent.info.status == "FAILED"
    running = client.search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []


def test_bad_settings_end_in_one_line_before_any_run(tmp_path, store, capsys):
    uri, client = store
    for bad, message in (
        ("disciplined.stages=[batch,warmup]", "disciplined.stages: 'warmup' is no stage"),
        ("disciplined.weight_decay.grid=[-1]", "disciplined.weight_decay.grid: must be a list of weight decays >= 0"),
        (
            "disciplined.weight_decay.range_test_mode=log",
            "disciplined.weight_decay.range_test_mode: must be linear or exp",
        ),
        ("policy=triangular", "policy: the disciplined approach trains one cycle"),
    ):
        with pytest.raises(SystemExit) as exited:
            main([bad, f"tracking.uri={uri}"])
        assert exited.value.code == 2
        assert capsys.readouterr().err.strip().startswith(f"clrx.disciplined: error: {message}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
