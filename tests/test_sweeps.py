"""Real Hydra multiruns: one MLflow parent run, complete children, a summary that lists every job."""

import csv

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from clrx.__main__ import job_name
from clrx.config.schema import compose_run
from clrx.tracking.report import main as report_main
from clrx.tracking.report import overlay
from clrx.tracking.store import PARENT_FILE
from tests.conftest import free_port, main_in_process, run_cli, start_mlflow_server

# Every job trains one epoch of 4 steps on a fixed subset of digits: what a sweep does does not depend on the data.
SUBSET = ("trainer.epochs=1", "dataset.limit_train=256", "dataset.limit_val=64")
STEPS_PER_EPOCH = 256 // 64


def _sweep_run(tmp_path, *args):
    done = run_cli("-m", *args, *SUBSET, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _sweep(tmp_path, *args):
    _sweep_run(tmp_path, *args)
    return tmp_path / "sweep"


def _family(client, sweep_dir):
    parent = (sweep_dir / PARENT_FILE).read_text().strip()
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", run_view_type=ViewType.ALL)
    return client.get_run(parent), sorted(runs, key=lambda r: int(r.data.tags["clrx.job"]))


def _summary(sweep_dir):
    with (sweep_dir / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_weight_decay_range_tests_are_children_of_one_parent_with_the_overlay(tmp_path, store):
    uri, client = store  # the default store of the folder the sweep runs in
    sweep_dir = _sweep(tmp_path, "+sweep=wd_range_test", "policy.num_iter=30")
    parent, children = _family(client, sweep_dir)
    assert parent.info.status == "FINISHED" and len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["clrx.policy"] == "range_test"
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "smoothed_loss"))
        assert steps == list(range(len(steps))) and len(steps) >= 5
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "lr")) == steps
    swept = [row["swept"] for row in _summary(sweep_dir)]
    assert swept == [f"optimizer.weight_decay={wd}" for wd in ("0.001", "0.0001", "1e-05", "0")]
    assert all(float(row["minimum/10 max_lr"]) > 0 for row in _summary(sweep_dir))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert artifacts == {"summary/summary.csv", "summary/summary.md", "summary/summary.png"}
    markdown = (sweep_dir / "summary.md").read_text()
    assert all(f"optimizer.weight_decay={wd} " in markdown for wd in ("0.001", "0.0001", "1e-05", "0"))
    loss_ax, accuracy_ax = overlay(client, children).axes
    for ax in (loss_ax, accuracy_ax):  # one curve per weight decay, in sweep order, against the LR
        assert [line.get_label() for line in ax.get_lines()] == swept
    assert loss_ax.get_ylabel() == "smoothed training loss" and accuracy_ax.get_xlabel() == "learning rate"


def test_parallel_jobs_on_sqlite_lose_nothing_and_a_diverging_child_fails_alone(tmp_path, store):
    uri, client = store
    sweep_dir = _sweep(
        tmp_path, "hydra/launcher=parallel", "policy=fixed", "policy.lr=0.02,0.05,0.1,1000000.0", "trainer.log_every=2"
    )
    parent, children = _family(client, sweep_dir)
    statuses = {child.data.tags["clrx.overrides"].split()[1]: child.info.status for child in children}
    assert statuses == {
        "policy.lr=0.02": "FINISHED",
        "policy.lr=0.05": "FINISHED",
        "policy.lr=0.1": "FINISHED",
        "policy.lr=1000000.0": "FAILED",
    }
    for child in children:
        if child.info.status == "FINISHED":
            for key in ("lr", "momentum", "train_loss"):
                steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, key))
                assert steps == list(range(STEPS_PER_EPOCH)), key
    rows = _summary(sweep_dir)
    assert [row["status"] for row in rows] == ["FINISHED"] * 3 + ["FAILED"]  # best first, the failure last
    assert [float(row["best_val_acc"]) for row in rows[:3]] == sorted(
        (float(r["best_val_acc"]) for r in rows[:3]), reverse=True
    )
    assert "loss became" in rows[3]["failure"] and parent.info.status == "FINISHED"


def test_a_job_with_a_bad_value_is_reported_failed_and_the_rest_run(tmp_path, store):
    uri, client = store
    done = _sweep_run(tmp_path, "policy.base_lr=0.01,0.9")
    sweep_dir = tmp_path / "sweep"
    parent, children = _family(client, sweep_dir)
    assert [child.info.status for child in children] == ["FINISHED", "FAILED"]
    assert "policy.base_lr: must be below max_lr" in children[1].data.tags["clrx.failure"]
    # Named by what each job changed; what the sweep did is printed, with where its summary went.
    assert [child.info.run_name for child in children] == [
        "job 0: base_lr=0.01 epochs=1 limit_train=256 limit_val=64",
        "job 1: base_lr=0.9 epochs=1 limit_train=256 limit_val=64",
    ]
    assert f"sweep folder sweep, parent MLflow run {parent.info.run_id}\n" in done.stdout
    summary = "sweep summary: sweep/summary.csv, summary.md, summary.png (also under summary/ on parent MLflow run"
    assert f"{summary} {parent.info.run_id} at {uri})" in done.stdout
    assert "clrx.range_test" not in children[0].data.tags  # no range test behind this run
    assert client.get_experiment_by_name("clrx").tags["mlflow.experimentKind"] == "custom_model_development"


def test_job_names_say_what_the_job_changed():
    overrides = ["+sweep=clr_vs_fixed", "optimizer.weight_decay=1e-05", "policy=triangular2", "tracking.uri=x"]
    assert job_name(3, overrides) == "job 3: weight_decay=1e-05 policy=triangular2"
    assert job_name(0, ["hydra/launcher=parallel"]) == "job 0"
    long = job_name(12, [f"policy.max_lr={'9' * 100}"])
    assert len(long) == 80 and long.startswith("job 12: max_lr=999") and long.endswith("...")


def test_report_rebuilds_a_summary_and_rejects_unknown_runs(tmp_path, store, capsys):
    uri, client = store
    sweep_dir = _sweep(tmp_path, "optimizer.weight_decay=1e-3,0")
    (sweep_dir / "summary.md").unlink()
    report_main([str(sweep_dir), "--tracking-uri", uri])
    assert "optimizer.weight_decay=0.001" in (sweep_dir / "summary.md").read_text()
    with pytest.raises(SystemExit) as exited:
        report_main(["0123456789abcdef", "--tracking-uri", uri])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == f"clrx.tracking.report: error: no MLflow run '0123456789abcdef' in {uri}"


def test_bisect_sweeps_three_values_around_the_given_weight_decay():
    cfg = compose_run("+sweep=wd_bisect", "wd=1e-4", return_hydra=True)
    assert cfg.hydra.sweeper.params["optimizer.weight_decay"] == "0.0003,0.0001,3.33e-05"
    assert cfg.policy._target_ == "clrx.schedules.policies.LRRange"


@pytest.mark.parametrize("launcher, target", [("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher, target):
    cfg = compose_run(f"hydra/launcher={launcher}", return_hydra=True)
    assert OmegaConf.select(cfg, "hydra.launcher._target_").endswith(target)


@pytest.mark.parametrize(
    "sweep, jobs, extra",
    [
        ("wd_bisect", 3, ["wd=1e-3", "policy.num_iter=30"]),
        ("clr_vs_fixed", 6, []),
        ("one_cycle_grid", 12, []),
    ],
)
def test_every_shipped_sweep_runs(tmp_path, store, sweep, jobs, extra):
    """The remaining sweeps in sweeps/, at one epoch a job (wd_range_test has its own test above)."""
    uri, client = store
    sweep_dir = _sweep(tmp_path, f"+sweep={sweep}", *extra, "range_test.num_iter=30")
    parent, children = _family(client, sweep_dir)
    assert len(children) == jobs and all(child.info.status == "FINISHED" for child in children)
    assert len(_summary(sweep_dir)) == jobs and parent.info.status == "FINISHED"
    if sweep != "wd_bisect":  # training sweeps: bounds from the range test, linked from every child
        assert all("clrx.range_test_run_id" in child.data.tags for child in children)
    if sweep == "clr_vs_fixed":  # one shared range: fixed runs sit at its two ends
        variant = "+sweep/clr_vs_fixed="
        params = {
            next(t for t in c.data.tags["clrx.overrides"].split() if t.startswith(variant))[
                len(variant) :
            ]: c.data.params
            for c in children
        }
        assert len({c.data.tags["clrx.range_test_run_id"] for c in children}) == 1
        assert params["fixed_base"]["bounds.lr"] == params["triangular"]["bounds.base_lr"]
        assert params["fixed_max"]["bounds.lr"] == params["one_cycle"]["bounds.max_lr"]


def test_clr_vs_fixed_puts_fixed_runs_at_the_ends_of_the_shared_range(tmp_path, store):
    uri, client = store
    cfgs = {v: compose_run("+sweep=clr_vs_fixed", f"+sweep/clr_vs_fixed={v}") for v in ("fixed_base", "fixed_max")}
    assert cfgs["fixed_base"].policy.lr == "auto.base_lr" and cfgs["fixed_max"].policy.lr == "auto.max_lr"
    assert compose_run("+sweep=clr_vs_fixed", "+sweep/clr_vs_fixed=triangular2").policy.max_lr == "auto"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["optimizer.weight_decay=choice()"], "empty choice is not legal"),
        (["+sweep=wd_bisect", "wd=0"], "wd must be a positive number, got 0"),
        (["trainer.epochs=1,abc"], "trainer.epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (["policy=fixed,nope"], "policy=nope is not available; choose one of:"),
    ],
)
def test_bad_sweeps_are_one_line_and_leave_no_parent_running(tmp_path, store, monkeypatch, capsys, args, expected):
    uri, client = store
    status, stderr = main_in_process(
        "-m", *args, f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep", monkeypatch=monkeypatch, capsys=capsys
    )
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and expected in lines[0], stderr
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not [r for r in client.search_runs(experiments) if r.info.status == "RUNNING"]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1, stopped after the test."""
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_parallel_jobs_against_a_local_mlflow_server_lose_nothing(tmp_path, mlflow_server):
    client = MlflowClient(mlflow_server)
    sweep_dir = _sweep(
        tmp_path, "hydra/launcher=parallel", "optimizer.weight_decay=1e-3,1e-4,0", f"tracking.uri={mlflow_server}"
    )
    parent, children = _family(client, sweep_dir)
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED"] * 3
    for child in children:
        for key in ("lr", "momentum", "train_loss"):
            assert sorted(m.step for m in client.get_metric_history(child.info.run_id, key)) == list(
                range(STEPS_PER_EPOCH)
            )
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} >= {"summary/summary.md"}


def test_a_sweep_whose_store_cannot_be_opened_stops_with_one_line(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    status, stderr = main_in_process(
        "-m",
        "optimizer.weight_decay=0,1e-3",
        f"tracking.uri=sqlite:///{blocked}/mlflow.db",
        f"hydra.sweep.dir={tmp_path}/sweep",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "tracking.uri: cannot open MLflow store" in lines[0], stderr
