"""The reproduction script runs end to end and reports every study (its numbers are for people)."""

from mlflow.entities import ViewType

from clrx.reproduce import HAND_PICKED, POLICIES, WEIGHT_DECAYS, main


def test_reproduce_reports_every_study_under_one_parent(tmp_path, store):
    uri, client = store
    main(["--seeds", "1", "--epochs", "2", "--out", str(tmp_path / "out"), f"tracking.uri={uri}"])
    text = (tmp_path / "out" / "reproduce.md").read_text()
    assert text.count("\n## ") == 3 and (tmp_path / "out" / "reproduce.png").stat().st_size > 0
    for name in POLICIES:
        assert f"| {name} | 2 |" in text and f"| {name} | 1 |" in text
    assert "seeds reached it)" in text
    assert all(f"hand-picked {top:g}" in text for top in HAND_PICKED)
    assert all(f"| {decay} |" in text for decay in WEIGHT_DECAYS)
    experiment = client.get_experiment_by_name("clrx").experiment_id
    [parent] = client.search_runs([experiment], "attributes.run_name = 'reproduce'")
    children = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", run_view_type=ViewType.ALL
    )
    assert parent.info.status == "FINISHED" and len(children) == 2 * len(POLICIES) + 1 + len(HAND_PICKED) + 4
    assert all(child.info.status == "FINISHED" for child in children)
