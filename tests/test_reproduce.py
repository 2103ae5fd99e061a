"""The reproduction script runs end to end and checks each claim against what it measured."""

from mlflow.entities import ViewType

from clrx.studies.reproduce import (
    HAND_PICKED,
    POLICIES,
    UNRESOLVED,
    WEIGHT_DECAYS,
    Trained,
    claims,
    main,
    procedure_claim,
)


def test_reproduce_reports_every_study_under_one_parent(tmp_path, store):
    uri, client = store
    out = tmp_path / "out"
    # One seed, one (diverging) hand-picked bound, 4 steps an epoch: the verdicts themselves are unit-tested below.
    args = ["--seeds", "1", "--epochs", "2", "--max-lrs", "1e6", "--out", str(out), f"tracking.uri={uri}"]
    main([*args, "dataset.limit_train=256", "dataset.limit_val=64", "range_test.num_iter=30", "range_test.mode=exp"])
    text = (out / "reproduce.md").read_text()
    assert text.count("\n## ") == 5 and (out / "reproduce.png").stat().st_size > 0
    for name in POLICIES:
        assert f"| {name} | 2 | 8 |" in text and f"| {name} | 1 | 4 |" in text
    assert "seeds reached it)" in text
    assert "| hand-picked 1e+06 | 1e+06 | 0.0000 ± 0.0000 (1 diverged) |" in text  # a result, not a crash
    assert all(f"| {decay} |" in text for decay in WEIGHT_DECAYS)
    verdicts = ("| holds |", "| does not hold here |", f"| {UNRESOLVED} |")
    assert sum(text.count(verdict) for verdict in verdicts) == 2 * (len(POLICIES) - 1) + 3
    assert all(
        f"| wd {decay}, max_lr 1e+06 | 1e+06 | 0.0000 ± 0.0000 (1 diverged) |" in text for decay in WEIGHT_DECAYS
    )
    assert "| disciplined procedure |" in text
    experiment = client.get_experiment_by_name("clrx").experiment_id
    [parent] = client.search_runs([experiment], "attributes.run_name = 'reproduce'")
    children = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", run_view_type=ViewType.ALL
    )
    assert parent.info.status == "FINISHED"
    # the procedure is one child, its own runs are its children; the hand grid is weight decay x the one max_lr
    assert len(children) == 2 * len(POLICIES) + 1 + 1 + len(WEIGHT_DECAYS) + 1 + len(WEIGHT_DECAYS)
    failed = sorted(child.info.run_name for child in children if child.info.status != "FINISHED")
    grid = sorted(f"grid wd {decay} max_lr 1e+06 seed 0" for decay in WEIGHT_DECAYS)
    assert failed == sorted(["one_cycle hand-picked 1e+06 seed 0", *grid])
    [procedure] = [child for child in children if child.info.run_name == "disciplined seed 0"]
    grandchildren = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{procedure.info.run_id}'")
    assert procedure.info.status == "FINISHED"
    assert "train" in {run.data.tags["clrx.disciplined.stage"] for run in grandchildren}
    assert {"reproduce.md", "reproduce.png"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}


def _seeds(*accuracies, steps=(10, 20), top=None):
    """Runs whose accuracy climbs to ``acc`` at the last of ``steps``, half of it before."""
    return [Trained(acc, [(steps[0], acc / 2), (steps[1], acc)], top) for acc in accuracies]


def _measured(fast_policy_curve, auto_acc, best_decay, decays=None):
    table = {(name, 4): _seeds(0.80, 0.82) for name in POLICIES}
    table |= {(name, 2): _seeds(0.70, 0.72) for name in POLICIES}
    table[("one_cycle", 4)] = [Trained(0.9, fast_policy_curve), Trained(0.9, fast_policy_curve)]
    table[("one_cycle", 2)] = _seeds(0.85, 0.86)
    bounds = {"range test (auto)": _seeds(auto_acc, auto_acc, top=0.4)}
    bounds |= {f"hand-picked {top:g}": _seeds(0.5 + top / 10, 0.5 + top / 10, top=top) for top in HAND_PICKED}
    decays = decays or {decay: _seeds(*((0.9, 0.9) if decay == best_decay else (0.8, 0.8))) for decay in WEIGHT_DECAYS}
    return {row["claim"]: row["verdict"] for row in claims(table, 4, bounds, decays)}


WD_CLAIM = "on small data more weight decay (1e-3 or 1e-4) is best"


def test_claims_hold_where_the_measurements_support_them():
    verdicts = _measured([(10, 0.85), (20, 0.9)], auto_acc=0.8, best_decay="1e-3")
    assert verdicts["one_cycle reaches fixed's final accuracy in fewer steps"] == "holds"
    assert verdicts["one_cycle at half the budget matches fixed at the full budget"] == "holds"
    assert verdicts["the range test's bounds are as good as the best hand-picked ones (within one sd)"] == "holds"
    assert verdicts[WD_CLAIM] == "holds"
    # the other policies end where fixed ends, at fixed's last step: not fewer steps, and worse at half
    assert verdicts["triangular2 reaches fixed's final accuracy in fewer steps"] == "does not hold here"
    assert verdicts["exp_range at half the budget matches fixed at the full budget"] == "does not hold here"


def test_claims_fail_where_the_measurements_do_not_support_them():
    verdicts = _measured([(10, 0.5), (20, 0.9)], auto_acc=0.5, best_decay="0")
    assert verdicts["one_cycle reaches fixed's final accuracy in fewer steps"] == "does not hold here"
    assert verdicts["the range test's bounds are as good as the best hand-picked ones (within one sd)"] == (
        "does not hold here"
    )
    assert verdicts[WD_CLAIM] == "does not hold here"


def test_a_weight_decay_lead_within_the_spread_is_reported_unresolved():
    decays = {"1e-3": _seeds(0.80, 0.90), "1e-4": _seeds(0.84, 0.84), "1e-5": _seeds(0.86, 0.88), "0": _seeds(0.8, 0.8)}
    verdicts = _measured([(10, 0.85), (20, 0.9)], auto_acc=0.8, best_decay=None, decays=decays)
    assert verdicts[WD_CLAIM] == UNRESOLVED  # 1e-5 leads by 0.02, 1e-3's sd is 0.07


def test_the_procedure_is_judged_against_the_best_cell_of_the_grid():
    grid = {"wd 1e-4, max_lr 0.3": _seeds(0.90, 0.92), "wd 0, max_lr 3": _seeds(0.5, 0.5, top=3)}
    claim = procedure_claim({"disciplined procedure": _seeds(0.89, 0.91)} | grid)
    assert claim["verdict"] == "holds" and "best of 2, wd 1e-4, max_lr 0.3: 0.9100" in claim["measured"]
    assert procedure_claim({"disciplined procedure": _seeds(0.80, 0.81)} | grid)["verdict"] == "does not hold here"
