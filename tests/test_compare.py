"""The schedule comparison end to end at a tiny budget, its verdicts recomputed from what the store holds."""

import statistics

import pytest
from mlflow.entities import ViewType

from clrx.studies.compare import REFERENCE, SCHEDULES, main, verdict
from clrx.studies.reproduce import UNRESOLVED, Trained


def _seeds(*values):
    return [Trained(value, []) for value in values]


@pytest.mark.parametrize(
    "ours, expected",
    [
        ((0.90, 0.92), "better"),  # 0.91 vs 0.80, the larger sd 0.014: better
        ((0.70, 0.72), "worse"),
        ((0.79, 0.83), f"{UNRESOLVED} at 2 seeds"),  # 0.81 vs 0.80, within the sd 0.028
        ((0.80, 0.80), f"{UNRESOLVED} at 2 seeds"),
    ],
)
def test_verdicts_need_a_difference_beyond_one_sd(ours, expected):
    assert verdict(_seeds(*ours), _seeds(0.79, 0.81)) == expected


def test_compare_runs_every_schedule_under_one_parent_and_judges_from_the_store(tmp_path, store, capsys):
    uri, client = store
    out = tmp_path / "out"
    tiny = ["trainer.epochs=2", "dataset.limit_train=128", "dataset.limit_val=64", "trainer.device=cpu"]
    main(["--seeds", "2", "--out", str(out), f"tracking.uri={uri}", *tiny])
    experiment = client.get_experiment_by_name("clrx").experiment_id
    [parent] = client.search_runs([experiment], "attributes.run_name = 'compare'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", run_view_type=ViewType.ALL
    )
    assert len(children) == 2 * len(SCHEDULES)
    assert {(c.data.tags["clrx.study_entry"], c.data.params["trainer.seed"]) for c in children} == {
        (name, seed) for name in SCHEDULES for seed in ("0", "1")
    }
    # The oracle: final validation accuracy per schedule from the metric histories, judged by one sd.
    final = {name: [] for name in SCHEDULES}
    for child in children:
        history = sorted(client.get_metric_history(child.info.run_id, "val_acc"), key=lambda m: m.step)
        final[child.data.tags["clrx.study_entry"]].append(history[-1].value if child.info.status == "FINISHED" else 0)
    text = (out / "compare.md").read_text()
    assert text == capsys.readouterr().out.split("\nwritten to")[0]
    for name in SCHEDULES:
        mean, sd = statistics.mean(final[name]), statistics.stdev(final[name])
        assert f"| {name} |" in text and f"{mean:.4f} ± {sd:.4f}" in text
        if name == REFERENCE:
            continue
        reference = final[REFERENCE]
        gap = mean - statistics.mean(reference)
        limit = max(sd, statistics.stdev(reference))
        expected = "better" if gap > limit else "worse" if gap < -limit else f"{UNRESOLVED} at 2 seeds"
        against = text.split("## Validation")[0]  # the first table: each schedule against one-cycle
        [row] = [line for line in against.splitlines() if line.startswith(f"| {name} |")]
        assert row.split(" | ")[3] == expected, text  # schedule, final val_acc, one_cycle's, its verdict
    assert (out / "compare.png").stat().st_size > 0
    assert {"compare.md", "compare.png"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}


def test_an_unknown_schedule_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--schedules", "one_cycle,wsdd"])
    assert exited.value.code == 2
    assert f"unknown wsdd; choose from {', '.join(SCHEDULES)}, got 'one_cycle,wsdd'" in capsys.readouterr().err
