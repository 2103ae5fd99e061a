"""The real command line, end to end, checked through MLflow's own client."""

import importlib

import pytest
from mlflow.entities import ViewType

from clrx.config.build import build_policy
from clrx.config.schema import compose_run
from clrx.schedules.policies import OneCycle
from clrx.training.run import train
from tests.conftest import main_in_process, run_cli

STEPS_PER_EPOCH = 1437 // 64  # digits: 1437 training images, drop_last batches of 64


def _history(client, run_id, key):
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def test_one_cycle_run_logs_every_step_and_the_config(tmp_path, store):
    uri, client = store  # the default store: mlflow.db in the directory the command runs from
    done = run_cli("policy=one_cycle", "trainer.epochs=2", "hydra.run.dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "val_acc" in done.stderr + done.stdout and "mlflow ui --backend-store-uri" in done.stderr + done.stdout

    [run] = client.search_runs(client.get_experiment_by_name("clrx").experiment_id)
    assert run.info.status == "FINISHED"
    steps = 2 * STEPS_PER_EPOCH
    expected = OneCycle(base_lr=0.05, max_lr=0.5, total_steps=steps)
    for key in ("lr", "momentum", "train_loss"):
        assert [m.step for m in _history(client, run.info.run_id, key)] == list(range(steps)), key
    assert [m.value for m in _history(client, run.info.run_id, "lr")] == pytest.approx(
        [expected(k).lr for k in range(steps)], rel=1e-12
    )
    assert [m.value for m in _history(client, run.info.run_id, "momentum")] == pytest.approx(
        [expected(k).momentum for k in range(steps)], rel=1e-12
    )
    val = _history(client, run.info.run_id, "val_acc")
    assert [m.step for m in val] == [STEPS_PER_EPOCH, steps] and val[-1].value > 0.5

    assert run.data.params["policy.max_lr"] == "0.5" and run.data.params["trainer.batch_size"] == "64"
    assert run.data.params["model.name"] == "test_resnet" and run.data.tags["clrx.policy"] == "one_cycle"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config/hydra")}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"config/resolved.yaml", "config/hydra/overrides.yaml", "plots/schedule.png"} <= artifacts
    assert (tmp_path / "run" / "model.pt").stat().st_size > 0


def test_same_command_twice_gives_the_same_losses(tmp_path, store):
    uri, client = store
    cfg = compose_run("trainer.epochs=1", "trainer.progress=false", f"tracking.uri={uri}")
    runs = [train(cfg, tmp_path / str(i)).run_id for i in range(2)]
    first, second = ([m.value for m in _history(client, run, "train_loss")] for run in runs)
    assert len(first) == STEPS_PER_EPOCH and first == second


def test_adam_cycles_beta1(tmp_path, store):
    uri, client = store
    cfg = compose_run(
        "optimizer=adam",
        "policy.base_lr=5e-4",
        "policy.max_lr=5e-3",
        "trainer.epochs=1",
        "trainer.progress=false",
        "trainer.save_model=false",
        f"tracking.uri={uri}",
    )
    run_id = train(cfg, tmp_path).run_id
    beta1 = [m.value for m in _history(client, run_id, "beta1")]
    expected = OneCycle(base_lr=5e-4, max_lr=5e-3, total_steps=STEPS_PER_EPOCH)
    assert beta1 == pytest.approx([expected(k).momentum for k in range(STEPS_PER_EPOCH)])


BAD_INPUT = [
    (["policy.base_lr=0.9"], "policy.base_lr"),
    (["policy=triangular", "policy.stepsize=0", "policy.stepsize_epochs=null"], "policy.stepsize"),
    (["policy=cosine"], "choose one of: decay, exp, exp_range, fixed, hann, multistage, one_cycle, range_test, "),
    (["model.name=resnet1"], "close names: resnet18"),
    (["policy.max_momentum=1.2"], "policy.max_momentum"),
    (["optimizer.momentum=1.5"], "optimizer.momentum"),
    (["trainer.batch_size=5000"], "trainer.batch_size"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["tracking.uri=sqlite:///{blocked}/mlflow.db"], "tracking.uri"),
    (["trainer.grad_accum=0"], "trainer.grad_accum: must be at least 1, got 0"),
    (["trainer.grad_accum=3"], "trainer.batch_size: must be a multiple of processes x trainer.grad_accum = 1 x 3"),
    (["trainer.precision=fp16", "trainer.device=cpu"], "trainer.precision: fp16 needs a CUDA device"),
    (["trainer.precision=fp32"], "trainer.precision: must be one of no, bf16, fp16"),
    (["trainer.resume={blocked}_missing"], "does not exist; give a checkpoint, its folder or auto"),
    (["trainer.resume={blocked}"], "cannot be read"),
    (["optimizer=adagrad"], "policy.max_momentum: Adagrad has no momentum or betas to cycle"),
    (["dataset=cifar10", "dataset.root={blocked}_none"], "dataset.root: CIFAR-10 files"),
    (["dataset=imagefolder"], "dataset.root: has no value; set it on the command line, e.g. dataset.root=..."),
    (["model.pretrained={blocked}_none"], "model.pretrained"),
    (
        ["policy=multistage", "policy.stages=5"],
        "policy.stages: must be a list of stages, each {steps or epochs, policy}",
    ),
    (["policy=multistage", "policy.stages.0.epochs=null"], "policy.stages[0].steps: every stage but the last needs"),
    (["hydra.run.dir=/proc/x"], "hydra.run.dir: cannot create or write /proc/x"),
    (["trainer.seed=-1"], "trainer.seed: must be in [0, 2**32 - 1], got -1"),
    (["trainer.seed=99999999999"], "trainer.seed: must be in [0, 2**32 - 1], got 99999999999"),
    (["trainer.epochs=99999999999999999999999"], "trainer.epochs: must be at most 1,000,000"),
    (["optimizer._target_=torch.optim.adam"], "optimizer._target_: 'torch.optim.adam' is a module, not a class"),
    (["optimizer.nesterov=true", "optimizer.momentum=0"], "optimizer.nesterov: needs optimizer.momentum above 0"),
    (["+model.drop_rate=2"], "model.drop_rate: is a probability: must be in [0, 1), got 2"),
    (["trainer.batch_size=1"], "trainer.batch_size: gives each process micro batches of 1 image"),
    (["trainer.batch_size=2", "trainer.grad_accum=2"], "batch norm layers cannot train on; use at least 4"),
    (["tracking.experiment=''"], "tracking.experiment: must name an experiment"),
    (["tracking.uri=sqlite://"], "tracking.uri: an in-memory store forgets the run when clrx exits"),
    (["tracking.uri={blocked}.db"], "tracking.uri: must be a store URI such as sqlite:///"),
    (["+trainer.epoch=3"], "trainer.epoch: no part of clrx reads this setting; close names: trainer.epochs"),
    (
        ["+tracking.experimnt=x"],
        "tracking.experimnt: no part of clrx reads this setting; close names: tracking.experiment",
    ),
    (["+polcy.max_lr=1"], "polcy: no part of clrx reads this setting; close names: policy"),
]


def _no_runs(client) -> bool:
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=ViewType.ALL) == []


@pytest.mark.parametrize("overrides, expected", BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_is_one_line_before_any_run_starts(tmp_path, store, monkeypatch, capsys, overrides, expected):
    uri, client = store
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    args = [o.format(blocked=blocked) for o in overrides]
    tracking = [] if any(a.startswith("tracking.uri") for a in args) else [f"tracking.uri={uri}"]
    run_dir = [] if any(a.startswith("hydra.run.dir") for a in args) else [f"hydra.run.dir={tmp_path}/run"]
    status, stderr = main_in_process(*args, *tracking, *run_dir, monkeypatch=monkeypatch, capsys=capsys)
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("clrx: error: ") and expected in lines[0]
    assert _no_runs(client)


def test_bad_input_exits_non_zero_from_a_real_process(tmp_path, store):
    uri, client = store
    done = run_cli("policy.base_lr=0.9", f"tracking.uri={uri}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "clrx: error: policy.base_lr: must be below max_lr, got 0.9 >= 0.5"
    ]
    assert _no_runs(client)


def test_a_diverging_run_stops_and_is_marked_failed_with_the_reason(tmp_path, store):
    uri, client = store
    done = run_cli("policy=fixed", "policy.lr=1e6", f"tracking.uri={uri}", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "loss became" in lines[0] and "(policy.lr)" in lines[0], done.stderr
    [run] = client.search_runs(client.get_experiment_by_name("clrx").experiment_id)
    assert run.info.status == "FAILED" and "loss became" in run.data.tags["clrx.failure"]


def test_dry_run_shows_the_schedule_and_trains_nothing(tmp_path, store, monkeypatch, capsys):
    uri, client = store
    status, _ = main_in_process(
        "policy=triangular2",
        "policy.stepsize_epochs=1",
        "trainer.dry_run=true",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path}/run",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 0 and (tmp_path / "run" / "schedule_preview.png").stat().st_size > 0
    log = (tmp_path / "run" / "__main__.log").read_text()
    assert f"dry run: {8 * STEPS_PER_EPOCH} steps ({STEPS_PER_EPOCH} per epoch)" in log
    assert "step     17  epoch   0.77  lr 0.3977  momentum 0.9" in log  # rising to the first peak; SGD keeps 0.9
    assert _no_runs(client) and not (tmp_path / "run" / "model.pt").exists()


SCRIPT_BAD_INPUT = [
    (
        "reproduce",
        ["optimizer=nope"],
        "clrx.studies.reproduce: error: optimizer=nope is not available; choose one of: ada",
    ),
    ("reproduce", ["--epochs", "1"], "--epochs must be at least 2 (the reduced budget is half of it), got 1"),
    ("reproduce", ["--max-lrs", "0.1,high"], "expected comma-separated numbers such as 0.1,0.3,1; got '0.1,high'"),
    ("bench", ["trainer.batch_size=0"], "clrx.studies.bench: error: trainer.batch_size: must be at least 1, got 0"),
    ("throughput", ["model=nope"], "clrx.studies.throughput: error: model=nope is not available; choose one of:"),
]


@pytest.mark.parametrize(
    "script, args, expected", SCRIPT_BAD_INPUT, ids=[f"{s} {' '.join(a)}" for s, a, _ in SCRIPT_BAD_INPUT]
)
def test_the_scripts_bad_input_is_one_line(tmp_path, store, monkeypatch, capsys, script, args, expected):
    uri, client = store
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"clrx.studies.{script}").main
    with pytest.raises(SystemExit) as exited:
        main([*args, f"tracking.uri={uri}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and expected in lines[-1], lines
    assert sum("error:" in line for line in lines) == 1  # after argparse's usage, if any: no traceback
    assert _no_runs(client)


def test_a_length_given_on_the_command_line_wins_over_the_presets_other_form(tmp_path, store, monkeypatch, capsys):
    uri, _ = store
    args = ("policy=triangular", "policy.stepsize=200", "trainer.dry_run=true", f"tracking.uri={uri}")
    status, stderr = main_in_process(*args, f"hydra.run.dir={tmp_path}/run", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, stderr
    cfg = compose_run(*args)
    assert build_policy(cfg.policy, STEPS_PER_EPOCH, 8 * STEPS_PER_EPOCH).stepsize == 200
