"""The real command line, end to end, checked through MLflow's own client."""

import importlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from mlflow.entities import ViewType
from torch.optim.optimizer import register_optimizer_step_pre_hook

from clrx.config.build import build_policy
from clrx.config.schema import compose_run
from clrx.schedules.policies import Cosine, Cyclic, Decay, OneCycle
from clrx.training.run import train, turning_points
from clrx.training.session import accelerator_for
from tests.conftest import ROOT, main_in_process, run_cli

STEPS_PER_EPOCH = 1438 // 64  # digits: 1438 training images, drop_last batches of 64


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


def _losses_of_two_runs(tmp_path, store, *overrides):
    uri, client = store
    cfg = compose_run("trainer.epochs=1", "trainer.progress=false", f"tracking.uri={uri}", *overrides)
    runs = [train(cfg, tmp_path / str(i)).run_id for i in range(2)]
    return [[m.value for m in _history(client, run, "train_loss")] for run in runs]


def test_same_command_twice_gives_the_same_losses_under_distinct_names(tmp_path, store):
    first, second = _losses_of_two_runs(tmp_path, store, "trainer.device=cpu")
    assert len(first) == STEPS_PER_EPOCH and first == second
    names = [run.info.run_name for run in store[1].search_runs([store[1].get_experiment_by_name("clrx").experiment_id])]
    assert len(set(names)) == 2 and all(re.fullmatch("onecycle-test_resnet-digits-[0-9a-f]{4}", n) for n in names)


def test_a_given_run_name_wins_over_a_sweep_jobs_name(tmp_path, store):
    uri, client = store
    cfg = compose_run("trainer.epochs=1", "trainer.progress=false", "tracking.run_name=mine", f"tracking.uri={uri}")
    result = train(cfg, tmp_path, {"mlflow.runName": "job 0: lr=0.1"})
    assert client.get_run(result.run_id).info.run_name == "mine"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_gives_the_same_losses_on_a_gpu(tmp_path, store):
    first, second = _losses_of_two_runs(tmp_path, store, "trainer.device=cuda", "trainer.deterministic=true")
    assert len(first) == STEPS_PER_EPOCH and first == second


def test_deterministic_switches_torch_to_deterministic_kernels_and_back(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # restored (unset) after the test
    try:
        accelerator_for(compose_run("trainer.device=cpu", "trainer.deterministic=true").trainer)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    finally:
        accelerator_for(compose_run("trainer.device=cpu").trainer)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def _one_cycle(k, steps=STEPS_PER_EPOCH, low=5e-4, high=5e-3):
    """Smith's one-cycle by hand: up over 45% of the 21 intervals, down over 45%, then to low/100."""
    half = 0.45 * (steps - 1)
    if k <= half:
        return low + (high - low) * k / half, 0.95 - 0.10 * k / half
    if k <= 2 * half:
        return high - (high - low) * (k - half) / half, 0.85 + 0.10 * (k - half) / half
    return low - (low - low / 100) * (k - 2 * half) / (steps - 1 - 2 * half), 0.95


def _cosine(k, steps=STEPS_PER_EPOCH, low=0.05, high=0.5, warmup=5):
    """Warm-up then cosine by hand: up over ``warmup`` steps, then half a cosine to 0 at the last step."""
    if k < warmup:
        return low + (high - low) * k / warmup, 0.9
    return high * (1 + math.cos(math.pi * (k - warmup) / (steps - 1 - warmup))) / 2, 0.9


def _triangle(k, low=0.05, high=0.5, stepsize=5):
    """The paper's triangle by hand: up over ``stepsize`` steps, down over as many; momentum left alone."""
    position = k % (2 * stepsize)
    return low + (high - low) * min(position, 2 * stepsize - position) / stepsize, 0.9


@pytest.mark.parametrize(
    "overrides, momentum, formula",
    [
        (["optimizer=adam", "policy.base_lr=5e-4", "policy.max_lr=5e-3"], "beta1", _one_cycle),
        (["policy=triangular", "policy.stepsize=5", "policy.stepsize_epochs=null"], "momentum", _triangle),
        (["policy=cosine", "policy.warmup_steps=5"], "momentum", _cosine),
    ],
    ids=["adam-one_cycle", "sgd-triangular", "sgd-cosine"],
)
def test_logged_lr_and_momentum_are_what_each_optimizer_step_used(tmp_path, store, overrides, momentum, formula):
    uri, client = store
    applied = []

    def seen(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        applied.append((group["lr"], group["betas"][0] if "betas" in group else group["momentum"]))

    cfg = compose_run(*overrides, "trainer.epochs=1", "trainer.progress=false", "trainer.save_model=false")
    cfg.tracking.uri = uri
    hook = register_optimizer_step_pre_hook(seen)
    try:
        run_id = train(cfg, tmp_path).run_id
    finally:
        hook.remove()
    logged = {key: _history(client, run_id, key) for key in ("lr", momentum, "train_loss")}
    for key, points in logged.items():
        assert [m.step for m in points] == list(range(STEPS_PER_EPOCH)), key  # one per step, 0 to the last
    assert len(applied) == STEPS_PER_EPOCH
    assert [(lr.value, m.value) for lr, m in zip(logged["lr"], logged[momentum], strict=True)] == applied
    expected = [formula(k) for k in range(STEPS_PER_EPOCH)]
    assert [lr for lr, _ in applied] == pytest.approx([lr for lr, _ in expected], rel=1e-12)
    assert [m for _, m in applied] == pytest.approx([m for _, m in expected], rel=1e-12)


BAD_INPUT = [
    (["policy.base_lr=0.9"], "policy.base_lr"),
    (["policy=triangular", "policy.stepsize=0", "policy.stepsize_epochs=null"], "policy.stepsize"),
    (
        ["policy=sgdr"],
        "choose one of: cosine, decay, exp, exp_range, fit_one_cycle, fixed, hann, multistage, one_cycle, range_test, ",
    ),
    (["policy=cosine", "policy.cycle_decay=2"], "policy.cycle_decay: must be in (0, 1], got 2"),
    (["policy.anneal=cosine"], "policy.anneal: must be one of linear, cos, got 'cosine'"),
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
    (
        ["trainer.save_best=val_accuracy"],
        "trainer.save_best: must be one of val_acc, val_loss, val_acc5, train_loss_epoch, val_acc_ema, val_loss_ema, "
        "val_acc5_ema or null, got 'val_accuracy'",
    ),
    (["trainer.save_best=test_acc"], "trainer.save_best: must be one of val_acc, val_loss"),  # never the test set
    (["trainer.early_stop=2", "trainer.early_stop_metric=loss"], "trainer.early_stop_metric: must be one of val_acc"),
    (["trainer.early_stop=-1"], "trainer.early_stop: must be at least 0, got -1"),
    (["trainer.early_stop_metric=val_loss"], "trainer.early_stop_metric: is read only with trainer.early_stop=N"),
    (["trainer.save_best=val_acc5"], "trainer.save_best: val_acc5 is logged only for datasets of more than 10 classes"),
    (["trainer.save_best=val_acc_ema"], "trainer.save_best: val_acc_ema is logged only with trainer.ema set"),
    (["+dataset.val_split=0.1"], "dataset.val_split: is not a setting of digits"),  # it has val_fraction
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
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "MLFLOW_TRACKING_URI")}
    command = [sys.executable, "-m", "clrx", "policy=fixed", "policy.lr=1e6", f"tracking.uri={uri}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    *bar, line, end = done.stderr.split("\n")  # the progress bar was drawn, then closed: the reason has its line
    assert "step" in "".join(bar) and line.startswith("clrx: error: ") and end == ""
    assert "loss became" in line and "(policy.lr)" in line, done.stderr
    [run] = client.search_runs(client.get_experiment_by_name("clrx").experiment_id)
    assert run.info.status == "FAILED" and "loss became" in run.data.tags["clrx.failure"]


def test_make_clean_removes_outputs_reports_and_the_store(tmp_path):
    kept = tmp_path / "data"
    made = [tmp_path / name for name in ("outputs", "multirun", "reports", "mlartifacts", "reproduce")]
    for folder in (*made, kept):
        folder.mkdir()
    files = [tmp_path / name for name in ("mlflow.db", "bench.json", "throughput.json")]
    for file in files:
        file.write_text("x")
    done = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in (*made, *files)) and kept.is_dir()


def test_turning_points_are_the_start_peaks_troughs_corners_and_end():
    one_cycle = OneCycle(base_lr=0.05, max_lr=0.5, total_steps=176)
    lrs = [one_cycle(k).lr for k in range(176)]
    peak = lrs.index(max(lrs))
    falling_ends = max(k for k in range(peak, 176) if lrs[k] >= 0.05)  # then annihilation, below base_lr
    assert turning_points(lrs) == [0, peak, falling_ends, 175]
    decay = Decay(base_lr=0.1, max_lr=1.0, stepsize=10)
    assert turning_points([decay(k).lr for k in range(30)]) == [0, 10, 29]  # the floor is reached at step 10
    hann = Cyclic(base_lr=0.1, max_lr=1.0, stepsize=7, window="hann")
    assert turning_points([hann(k).lr for k in range(60)]) == [0, 7, 14, 21, 28, 35, 42, 49, 56, 59]
    assert turning_points([0.1] * 5) == [0, 4]
    sgdr = Cosine(0.05, 0.5, 176, warmup_steps=11, cycle_steps=44, cycle_decay=0.5, cycle_limit=3)
    lrs = [sgdr(k).lr for k in range(176)]  # warm-up peak, each cycle's trough and restart, the floor, not inflections
    assert turning_points(lrs) == [0, 11, 54, 55, 98, 99, 143, 175]


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
    # Start, each peak and trough of the 22-step half cycles, end; SGD keeps its momentum 0.9.
    shown = [line.split() for line in log.splitlines() if "  step " in line]
    assert [int(words[-7]) for words in shown] == [0, 22, 44, 66, 88, 110, 132, 154, 175]
    peaks = [0.05 + 0.45 / 2**cycle for cycle in range(4)]  # triangular2 halves the amplitude each cycle
    expected = [0.05, *sum(([p, 0.05] for p in peaks), [])]
    expected[-1] = 0.05 + (peaks[-1] - 0.05) / 22  # the last step, one short of the fourth trough
    assert [float(words[-3]) for words in shown] == pytest.approx(expected, rel=1e-3)
    assert "step     22  epoch   1.00  lr 0.5  momentum 0.9" in log
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
