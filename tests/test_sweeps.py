"""Real Hydra multiruns: one MLflow parent run, complete children, a summary that lists every job."""

import csv

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from clrx.__main__ import job_name
from clrx.config.schema import compose_run
from clrx.report import main as report_main
from clrx.tracking.report import overlay
from tests.conftest import free_port, main_in_process, run_cli, start_mlflow_server, sweep_family

# Every job trains one epoch of 4 steps on a fixed subset of digits: what a sweep does does not depend on the data.
SUBSET = ("trainer.epochs=1", "dataset.limit_train=256", "dataset.limit_val=64")
STEPS_PER_EPOCH = 256 // 64


def _sweep_run(tmp_path, *args, status=0):
    done = run_cli("-m", *args, *SUBSET, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert done.returncode == status, done.stderr[-3000:]
    return done


def _sweep(tmp_path, *args):
    _sweep_run(tmp_path, *args)
    return tmp_path / "sweep"


def _summary(sweep_dir):
    with (sweep_dir / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_weight_decay_range_tests_are_children_of_one_parent_with_the_overlay(tmp_path, store):
    uri, client = store  # the default store of the folder the sweep runs in
    sweep_dir = _sweep(tmp_path, "+sweep=wd_range_test", "policy.num_iter=30")
    parent, children = sweep_family(client, sweep_dir)
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
    args = ("hydra/launcher=parallel", "policy=fixed", "policy.lr=0.02,0.05,0.1,1000000.0", "trainer.log_every=2")
    done = _sweep_run(tmp_path, *args)  # every job ran; the sweep's end names the one that failed
    sweep_dir = tmp_path / "sweep"
    parent, children = sweep_family(client, sweep_dir)
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
    failure = children[3].data.tags["clrx.failure"]
    assert done.stderr.splitlines() == [f"clrx: 1 of 4 sweep jobs failed: job 3 (policy.lr=1000000.0): {failure}"]


def test_a_job_with_a_bad_value_is_reported_failed_and_the_rest_run(tmp_path, store):
    uri, client = store
    done = _sweep_run(tmp_path, "policy.base_lr=0.01,0.9")
    sweep_dir = tmp_path / "sweep"
    parent, children = sweep_family(client, sweep_dir)
    assert [child.info.status for child in children] == ["FINISHED", "FAILED"]
    assert children[1].data.tags["clrx.failure"] == "policy.base_lr: must be below max_lr, got 0.9 >= 0.5"
    assert done.stderr.splitlines() == [
        "clrx: 1 of 2 sweep jobs failed: job 1 (policy.base_lr=0.9): "
        "policy.base_lr: must be below max_lr, got 0.9 >= 0.5"
    ]
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


def test_an_optuna_search_ranks_a_diverging_trial_last_and_names_the_best(tmp_path, store):
    """The shipped Optuna sweep (TPE, seed 0), four trials over max_lr values of which one diverges."""
    uri, client = store
    done = _sweep_run(
        tmp_path,
        "+sweep=optuna_search",
        "hydra.sweeper.n_trials=4",
        "policy.max_lr=choice(0.1,0.2,0.4,1000000.0)",  # the command line replaces the sweep's ranges
        "optimizer.weight_decay=1e-4",
        "loss.label_smoothing=0.1",
        "trainer.batch_size=16",  # 16 steps: enough for max_lr 1e6 to diverge
        "tracking.log_model=false",
    )
    sweep_dir = tmp_path / "sweep"
    parent, children = sweep_family(client, sweep_dir)
    assert parent.info.status == "FINISHED" and len(children) == 4
    diverged = [child for child in children if child.data.params["policy.max_lr"] == "1000000.0"]
    trained = [child for child in children if child not in diverged]
    assert diverged and trained  # seed 0 draws both kinds
    assert all(c.info.status == "FAILED" and "loss became" in c.data.tags["clrx.failure"] for c in diverged)
    assert all(child.info.status == "FINISHED" for child in trained)
    assert "Failed experiment" not in done.stderr + done.stdout  # every job returned a value Optuna could rank
    best_value = max(child.data.metrics["best_val_acc"] for child in trained)
    rows = _summary(sweep_dir)  # best first, the diverged last
    assert [row["status"] for row in rows] == ["FINISHED"] * len(trained) + ["FAILED"] * len(diverged)
    scores = [float(row["best_val_acc"]) for row in rows[: len(trained)]]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(best_value)
    prefix = "best by best_val_acc (maximize): job "
    line = next(text for text in done.stdout.splitlines() if text.startswith(prefix))
    job, _, rest = line.removeprefix(prefix).partition(", ")
    named = next(child for child in children if child.data.tags["clrx.job"] == job)
    assert named.data.metrics["best_val_acc"] == best_value
    assert rest == f"policy.max_lr={named.data.params['policy.max_lr']}: {best_value:.4g}"
    assert (sweep_dir / "summary.md").read_text().startswith(line)
    optuna = OmegaConf.load(sweep_dir / "optimization_results.yaml")  # Optuna's own pick agrees
    assert optuna.best_value == best_value
    assert optuna.best_params["policy.max_lr"] == float(named.data.params["policy.max_lr"])


def test_jobs_that_raise_fail_their_runs_and_the_sweep_in_one_line(tmp_path, store, monkeypatch, capsys):
    uri, client = store

    def crash(cfg, *_):
        raise RuntimeError(f"no luck with weight decay {cfg.optimizer.weight_decay}")

    monkeypatch.setattr("clrx.training.run.train", crash)
    args = ("-m", "optimizer.weight_decay=0,1e-3", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep")
    status, stderr = main_in_process(*args, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 1 and stderr.splitlines() == [
        "clrx: error: 2 of 2 sweep jobs failed: "
        "job 0 (optimizer.weight_decay=0): RuntimeError: no luck with weight decay 0; "
        "job 1 (optimizer.weight_decay=0.001): RuntimeError: no luck with weight decay 0.001"
    ], stderr
    parent, children = sweep_family(client, tmp_path / "sweep")
    assert parent.info.status == "FAILED" and [child.info.status for child in children] == ["FAILED", "FAILED"]
    assert children[0].data.tags["clrx.failure"] == "RuntimeError: no luck with weight decay 0"


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
    assert capsys.readouterr().err.strip() == f"clrx.report: error: no MLflow run '0123456789abcdef' in {uri}"


def test_the_regularization_balance_sweeps_weight_decay_by_label_smoothing_at_one_schedule():
    cfg = compose_run("+sweep=reg_balance", return_hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params == {"optimizer.weight_decay": "1e-3,1e-4,1e-5,0", "loss.label_smoothing": "0,0.05,0.1"}
    assert cfg.hydra.runtime.choices["policy"] == "one_cycle" and cfg.policy.max_lr != "auto"


def test_the_optuna_search_samples_three_settings_with_tpe_in_the_objectives_direction():
    sweeper = compose_run("+sweep=optuna_search", return_hydra=True).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert set(sweeper.params) == {"policy.max_lr", "optimizer.weight_decay", "loss.label_smoothing"}
    assert sweeper.direction == "maximize"  # best_val_acc
    minimizing = compose_run("+sweep=optuna_search", "tracking.objective=val_loss", return_hydra=True)
    assert minimizing.hydra.sweeper.direction == "minimize"


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
        ("clr_vs_fixed", 7, []),
        ("one_cycle_grid", 12, []),
        ("reg_balance", 2, ["optimizer.weight_decay=1e-4", "loss.label_smoothing=0,0.1"]),
    ],
)
def test_every_shipped_sweep_runs(tmp_path, store, sweep, jobs, extra):
    """The remaining sweeps in sweeps/, at one epoch a job (wd_range_test has its own test above)."""
    uri, client = store
    sweep_dir = _sweep(tmp_path, f"+sweep={sweep}", *extra, "range_test.num_iter=30")
    parent, children = sweep_family(client, sweep_dir)
    assert len(children) == jobs and all(child.info.status == "FINISHED" for child in children)
    assert len(_summary(sweep_dir)) == jobs and parent.info.status == "FINISHED"
    if sweep in ("clr_vs_fixed", "one_cycle_grid"):  # bounds from the range test, linked from every child
        assert all("clrx.range_test_run_id" in child.data.tags for child in children)
    if sweep == "reg_balance":  # one schedule; the regularizers differ
        assert {c.data.params["loss.label_smoothing"] for c in children} == {"0.0", "0.1"}
        assert len({c.data.params["policy.max_lr"] for c in children}) == 1
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
        assert (params["cosine"]["bounds.base_lr"], params["cosine"]["bounds.max_lr"]) == (
            params["triangular"]["bounds.base_lr"],
            params["one_cycle"]["bounds.max_lr"],
        )


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
    parent, children = sweep_family(client, sweep_dir)
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
