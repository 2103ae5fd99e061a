"""The sweep summary pools jobs that differ only by seed, from runs in a real store."""

import statistics

from clrx.tracking.report import markdown, report


def _job(client, experiment, parent, job, overrides, seed, status="FINISHED", **metrics):
    run = client.create_run(
        experiment,
        tags={"mlflow.parentRunId": parent, "clrx.job": str(job), "clrx.overrides": overrides, "clrx.policy": "p"},
    )
    client.log_param(run.info.run_id, "trainer.seed", str(seed))
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)


def _sweep(client, jobs):
    experiment = client.create_experiment("clrx")
    parent = client.create_run(experiment).info.run_id
    for job, (decay, seed, acc, status) in enumerate(jobs):
        metrics = {} if status != "FINISHED" else {"val_acc": acc, "best_val_acc": acc + 0.01, "steps": 40.0}
        _job(
            client,
            experiment,
            parent,
            job,
            f"optimizer.weight_decay={decay} trainer.seed={seed}",
            seed,
            status,
            **metrics,
        )
    return parent


def test_jobs_differing_only_by_seed_share_a_row_with_mean_and_sd(tmp_path, store):
    _, client = store
    jobs = [("1e-4", 0, 0.90, "FINISHED"), ("0", 0, 0.80, "FINISHED"), ("1e-4", 1, 0.94, "FINISHED")]
    jobs += [("0", 1, 0.70, "FINISHED"), ("1e-4", 2, 0.92, "FINISHED"), ("0", 2, None, "FAILED")]
    table, best = report(client, _sweep(client, jobs), tmp_path)
    assert [row["swept"] for row in table] == ["optimizer.weight_decay=1e-4", "optimizer.weight_decay=0"]
    first, second = table
    assert first["job"] == "0,2,4" and first["seeds"] == "0,1,2" and first["status"] == "FINISHED"
    assert first["best_val_acc"] == statistics.mean([0.91, 0.95, 0.93])
    assert first["best_val_acc sd"] == statistics.stdev([0.91, 0.95, 0.93])
    assert first["val_acc"] == statistics.mean([0.90, 0.94, 0.92]) and first["steps"] == 40
    # the failed seed is counted, not averaged
    assert second["status"] == "2/3 FINISHED" and second["val_acc"] == 0.75
    assert second["val_acc sd"] == statistics.stdev([0.80, 0.70])
    assert best.startswith("best by best_val_acc (maximize): job 0,2,4, optimizer.weight_decay=1e-4: 0.93")
    summary = (tmp_path / "summary.md").read_text()
    assert summary.endswith(markdown(table)) and "| best_val_acc | best_val_acc sd |" in summary


def test_a_sweep_without_repeated_seeds_keeps_a_row_a_job(tmp_path, store):
    _, client = store
    jobs = [("1e-4", 0, 0.90, "FINISHED"), ("0", 0, 0.80, "FINISHED")]
    table, _ = report(client, _sweep(client, jobs), tmp_path)
    assert [(row["job"], row["val_acc"]) for row in table] == [(0, 0.90), (1, 0.80)] and "seeds" not in table[0]


def test_a_job_alone_beside_pooled_ones_keeps_its_own_row_and_status(tmp_path, store):
    _, client = store
    jobs = [("1e-4", 0, 0.90, "FINISHED"), ("1e-4", 1, 0.94, "FINISHED"), ("1e3", 0, None, "FAILED")]
    table, _ = report(client, _sweep(client, jobs), tmp_path)
    assert [(row["job"], row["status"]) for row in table] == [("0,1", "FINISHED"), (2, "FAILED")]
    assert table[1]["seeds"] == "0" and table[1]["val_acc"] is None


def test_a_repeated_trial_at_the_same_seed_is_not_pooled(tmp_path, store):
    _, client = store
    jobs = [("1e-4", 0, 0.90, "FINISHED"), ("1e-4", 0, 0.90, "FINISHED"), ("0", 0, 0.80, "FINISHED")]
    table, _ = report(client, _sweep(client, jobs), tmp_path)
    assert [row["job"] for row in table] == [0, 1, 2]
