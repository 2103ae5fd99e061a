"""Per-group learning rates (timm's layer decay, multipliers by name) and fine-tuning with frozen epochs."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

from clrx.config.build import build_optimizer, build_policy
from clrx.config.schema import compose_run
from clrx.errors import ConfigError
from clrx.tracking.store import Silent
from clrx.training import checkpoint
from clrx.training.auto import range_test_key
from clrx.training.finetune import run_policy
from clrx.training.loop import find_range
from clrx.training.recorder import Recorder
from clrx.training.run import train
from clrx.training.session import prepare
from tests.conftest import main_in_process

PER_EPOCH = 1438 // 64  # digits: optimizer steps an epoch at the default batch
CPU = ("trainer.device=cpu", "trainer.progress=false")


def _applied(session) -> list[list[tuple[list[str], float]]]:
    """Record, before every optimizer step, each group's parameter names and the lr it steps with."""
    names = {id(param): name for name, param in session.plain_model.named_parameters()}
    steps = []

    def hook(optimizer, args, kwargs):
        steps.append([([names[id(p)] for p in group["params"]], group["lr"]) for group in optimizer.param_groups])

    session.torch_optimizer.register_step_pre_hook(hook)
    return steps


def _timm_scales(layer_decay: float) -> dict[str, float]:
    """Each parameter's scale as timm's own param_groups_layer_decay gives it, on a fresh test_resnet."""
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    names = {id(param): name for name, param in model.named_parameters()}
    groups = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=layer_decay)
    return {names[id(param)]: group["lr_scale"] for group in groups for param in group["params"]}


def test_layer_decay_gives_each_group_the_policy_lr_times_timms_scale():
    cfg = compose_run(*CPU, "optimizer.layer_decay=0.75", "optimizer.decay_bias_and_norm=false")
    session = prepare(cfg)
    policy = build_policy(cfg.policy, session.steps_per_epoch, session.total_steps)
    applied = _applied(session)
    recorder = Recorder(Silent(), session.momentum, 10)
    for step, micro in zip(range(12), session.batches(), strict=False):
        session.policy_step(policy, step, micro, recorder)
    expected = _timm_scales(0.75)
    assert len(set(expected.values())) == 6  # stem, four stages, head
    for step, groups in enumerate(applied):
        assert sorted(name for names, _ in groups for name in names) == sorted(expected)
        for names, lr in groups:
            assert all(lr == policy(step).lr * expected[name] for name in names)
    assert recorder.lrs == [policy(step).lr for step in range(12)]  # the recorded lr: the top group's
    first = session.torch_optimizer.param_groups[0]
    assert first["lr_scale"] == 1.0 and first["name"] == "layer_5"


def test_a_model_without_a_group_matcher_is_refused_in_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    node = {"_target_": "torch.optim.SGD", "layer_decay": 0.75}
    with pytest.raises(ConfigError, match=r"^optimizer\.layer_decay: needs a timm model with group_matcher\(\)"):
        build_optimizer(node, model, lr=0.1)


def _scales_by_name(lr_mult: dict) -> dict[str, float]:
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    optimizer = build_optimizer({"_target_": "torch.optim.SGD", "lr_mult": lr_mult}, model, lr=0.1)
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(param)]: group["lr_scale"] for group in optimizer.param_groups for param in group["params"]}


def test_lr_mult_patterns_take_the_parameters_they_name_and_the_first_match_wins():
    scales = _scales_by_name({"fc": 1.0, "layer4.0.bn1": 1.0, "layer4": 0.5, "layer[12]": 0.1})
    for name, scale in scales.items():
        if name.startswith(("fc.", "layer4.0.bn1.")):
            assert scale == 1.0, name
        elif name.startswith("layer4."):
            assert scale == 0.5, name
        elif name.startswith(("layer1.", "layer2.")):
            assert scale == 0.1, name
        else:  # stem and layer3: no pattern, the policy's LR
            assert scale == 1.0, name
    catch_all = _scales_by_name({"fc": 1.0, "*": 0.1})
    assert {name for name, scale in catch_all.items() if scale == 1.0} == {"fc.weight", "fc.bias"}
    assert len(catch_all) == 47 and set(catch_all.values()) == {1.0, 0.1}


@pytest.mark.parametrize(
    ("lr_mult", "problem"),
    [
        ({"fc": 1.0, "haed": 0.1}, "pattern 'haed' matches no parameter"),
        ({"layer4": 0.5, "layer4.0.bn1": 1.0, "fc": 1.0}, "pattern 'layer4.0.bn1' matches no parameter"),
        ({"*": 0.1}, "the largest group scale must be 1.0"),
        ({"fc": -1}, "must be a positive multiplier"),
    ],
)
def test_bad_lr_mult_is_refused_naming_it(lr_mult, problem):
    with pytest.raises(ConfigError, match="optimizer.lr_mult") as refused:
        _scales_by_name(lr_mult)
    assert problem in str(refused.value) and "\n" not in str(refused.value)


def test_cli_refuses_an_unmatched_pattern_in_one_line_before_any_run(tmp_path, store, monkeypatch, capsys):
    uri, client = store
    args = (*CPU, "optimizer.lr_mult={fc:1.0,haed:0.1}", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}")
    status, stderr = main_in_process(*args, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("clrx: error: optimizer.lr_mult: pattern 'haed' matches no parameter")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_groups_are_logged_as_a_param_an_artifact_and_lr_per_group(tmp_path, store):
    uri, client = store
    cfg = compose_run(*CPU, "trainer.epochs=1", "tracking.lr_per_group=true", f"tracking.uri={uri}")
    cfg.optimizer.lr_mult = {"fc": 1.0, "*": 0.1}  # a glob key, as a YAML file gives it
    result = train(cfg, tmp_path)
    run = client.get_run(result.run_id)
    assert run.data.params["param_groups"] == "fc=1, all=0.1"
    assert run.data.params["optimizer.lr_mult"] == "{'fc': 1.0, '*': 0.1}"
    downloaded = client.download_artifacts(result.run_id, "param_groups.json", str(tmp_path / "artifacts"))
    rows = json.loads(open(downloaded).read())
    assert [(row["group"], row["scale"], row["tensors"]) for row in rows] == [("fc", 1.0, 2), ("all", 0.1, 45)]
    assert rows[0]["examples"] == ["fc.weight", "fc.bias"]
    history = {
        key: sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
        for key in ("lr", "lr/fc", "lr/all")
    }
    assert len(history["lr/all"]) == PER_EPOCH
    for top, head, rest in zip(history["lr"], history["lr/fc"], history["lr/all"], strict=True):
        assert head.value == top.value and rest.value == pytest.approx(0.1 * top.value, rel=1e-12)


FINE_TUNE = (*CPU, "trainer.epochs=3", "trainer.freeze_epochs=1", "optimizer.layer_decay=0.75")


def _is_frozen(model: torch.nn.Module) -> dict[str, bool]:
    """Which parameters the frozen phase should hold still: not the head (fc), not batch norm's."""
    norms = {name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    return {
        name: not (name.startswith("fc.") or name.rpartition(".")[0] in norms) for name, _ in model.named_parameters()
    }


def _weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def _check_frozen_phase(cfg, run_dir) -> None:
    """The frozen parameters of ``cfg``'s run in ``run_dir`` are their initial values until the unfreeze, and
    every parameter moves after it."""
    start = {name: value.clone() for name, value in prepare(cfg).plain_model.state_dict().items()}
    frozen = _is_frozen(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    assert sum(frozen.values()) == 15 and len(frozen) == 47  # the convolutions
    unfrozen_at = _weights(checkpoint.path_for(run_dir / checkpoint.DIRECTORY, PER_EPOCH))
    end = _weights(run_dir / "model.pt")
    for name, held in frozen.items():
        assert torch.equal(unfrozen_at[name], start[name]) == held, name
        assert not torch.equal(end[name], unfrozen_at[name]), name


def test_frozen_parameters_stay_bit_identical_until_the_unfreeze_then_train(tmp_path, store):
    uri, client = store
    cfg = compose_run(*FINE_TUNE, "trainer.checkpoint_epochs=true", "trainer.keep_last=3", f"tracking.uri={uri}")
    result = train(cfg, tmp_path)
    assert result.steps == 3 * PER_EPOCH
    logged = client.get_run(result.run_id).data
    assert logged.params["param_groups"].startswith("layer_5=1, layer_4=0.75, layer_3=0.5625")
    assert not [key for key in logged.metrics if key.startswith("lr/")]  # tracking.lr_per_group is off
    _check_frozen_phase(cfg, tmp_path)


def test_two_processes_hold_the_frozen_parameters_still(tmp_path, store):
    uri, _ = store
    run = (*FINE_TUNE, "trainer.checkpoint_epochs=true", "trainer.keep_last=3", f"tracking.uri={uri}")
    run = (*run, f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true", "ACCELERATE_USE_CPU": "1"}  # gloo
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clrx"]
    done = subprocess.run([*command, *run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_frozen_phase(compose_run(*FINE_TUNE), tmp_path / "run")


def test_freeze_epochs_must_leave_epochs_to_train_all_layers():
    with pytest.raises(ConfigError, match=r"^trainer\.freeze_epochs: must be below trainer\.epochs \(3\)"):
        prepare(compose_run(*CPU, "trainer.epochs=3", "trainer.freeze_epochs=3"))


def test_the_policy_runs_once_over_each_phase():
    cfg = compose_run(*FINE_TUNE)
    policy = run_policy(cfg.policy, PER_EPOCH, 3 * PER_EPOCH, 1)
    frozen = build_policy(cfg.policy, PER_EPOCH, PER_EPOCH)
    rest = build_policy(cfg.policy, PER_EPOCH, 2 * PER_EPOCH)
    assert [policy(step) for step in range(PER_EPOCH)] == [frozen(step) for step in range(PER_EPOCH)]
    assert [policy(PER_EPOCH + step) for step in range(2 * PER_EPOCH)] == [rest(s) for s in range(2 * PER_EPOCH)]


def test_a_run_resumed_from_the_frozen_phase_equals_an_uninterrupted_one(tmp_path, store):
    uri, _ = store
    run = (*FINE_TUNE, "trainer.checkpoint_every=10", "trainer.keep_last=20", f"tracking.uri={uri}")
    reference = train(compose_run(*run), tmp_path / "reference")
    frozen_checkpoint = checkpoint.path_for(tmp_path / "reference" / checkpoint.DIRECTORY, 10)
    resumed = train(compose_run(*run, f"trainer.resume={frozen_checkpoint}"), tmp_path / "resumed")
    assert resumed.steps == reference.steps and resumed.val_loss == reference.val_loss
    ended, expected = _weights(tmp_path / "resumed" / "model.pt"), _weights(tmp_path / "reference" / "model.pt")
    assert ended.keys() == expected.keys() and all(torch.equal(ended[k], expected[k]) for k in expected)


def test_a_fine_tuning_run_keys_its_range_test_apart_by_the_freeze_alone():
    key = range_test_key(compose_run("trainer.epochs=3", "optimizer.layer_decay=0.75"), 66)
    frozen = range_test_key(compose_run(*FINE_TUNE), 66)
    assert frozen != key and range_test_key(compose_run(*FINE_TUNE, "trainer.freeze_epochs=2"), 66) == frozen


def test_the_range_test_sweeps_the_top_lr_with_the_ratios_kept_on_the_frozen_model(tmp_path):
    cfg = compose_run(*FINE_TUNE, "policy=range_test", "policy.num_iter=20", "policy.max_lr=1")
    session = prepare(cfg)
    policy = build_policy(cfg.policy, session.steps_per_epoch, session.total_steps)
    applied = _applied(session)
    frozen = _is_frozen(session.plain_model)
    grads = []
    session.torch_optimizer.register_step_pre_hook(
        lambda *_: grads.append({n: p.grad is None for n, p in session.plain_model.named_parameters()})
    )
    result = find_range(session, policy, Silent(), tmp_path, "policy")
    scales = _timm_scales(0.75)
    assert len(applied) == result.steps == 20
    for step, groups in enumerate(applied):
        for names, lr in groups:
            assert all(lr == policy(step).lr * scales[name] for name in names)
    assert all(held == frozen for held in grads)  # no gradient for the frozen parameters, one for the rest
