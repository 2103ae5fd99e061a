"""Every config file composes, and every group option builds into a working object."""

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader

from clrx.config.build import build_optimizer, build_policy, instantiate
from clrx.config.schema import CONF, LEAST, TrainerConfig, check_trainer, compose_run
from clrx.data.splits import build_data
from clrx.errors import ConfigError, one_line
from clrx.schedules.policies import Hyper

# hydra: Hydra's own; disciplined: added by python -m clrx.disciplined alone (composed in its tests)
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "disciplined"))
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


def test_groups_are_the_documented_ones():
    assert GROUPS == ["dataset", "loss", "model", "optimizer", "policy", "tracking", "trainer"]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option, data_root):
    # Datasets read the test's small files; models get 32x32 RGB images, the size their presets are for.
    where = {"dataset": [f"dataset.root={data_root / 'folder' if option == 'imagefolder' else data_root}"]}
    where["model"] = ["dataset=fake"]
    overrides = where.get(group, []) if option not in ("digits", "fake") else []
    cfg = compose_run(f"{group}={option}", *overrides)
    chosen = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    set_here = {"defaults"} | {o.split("=")[0].removeprefix(f"{group}.") for o in overrides}
    composed = OmegaConf.to_container(cfg[group], resolve=False)
    assert {k: composed[k] for k in chosen if k not in set_here} == {
        k: v for k, v in chosen.items() if k not in set_here
    }  # the group holds the option's file
    data = build_data(cfg.dataset)
    images, labels = next(iter(DataLoader(data.train, 2, collate_fn=data.collate)))
    images = data.pipeline(images, train=True)
    assert images.shape[1] == data.in_chans and 0 <= labels.min() and labels.max() < data.num_classes
    model = instantiate(cfg.model, "model", num_classes=data.num_classes, in_chans=data.in_chans)
    assert model(images).shape == (2, data.num_classes)
    policy = build_policy(cfg.policy, steps_per_epoch=22, total_steps=176)
    first = policy(0)
    assert isinstance(first, Hyper) and first.lr > 0
    optimizer = build_optimizer(cfg.optimizer, model, lr=first.lr)
    assert isinstance(optimizer, torch.optim.Optimizer)


def test_stepsize_in_epochs_becomes_optimizer_steps():
    cfg = compose_run("policy=triangular", "policy.stepsize_epochs=2.5")
    assert build_policy(cfg.policy, steps_per_epoch=22, total_steps=176).stepsize == 55
    cfg = compose_run("policy=triangular", "policy.stepsize=7", "policy.stepsize_epochs=null")
    assert build_policy(cfg.policy, steps_per_epoch=22, total_steps=176).stepsize == 7


def test_stages_take_their_lengths_in_epochs_and_the_last_runs_to_the_end():
    cfg = compose_run("policy=multistage")
    policy = build_policy(cfg.policy, steps_per_epoch=22, total_steps=264)
    assert [steps for steps, _ in policy.stages] == [176, 44, 44]
    assert [stage.stepsize for _, stage in policy.stages] == [22, 11, 6]


def test_one_cycle_spans_the_run_unless_told_otherwise():
    cfg = compose_run("policy=one_cycle")
    assert build_policy(cfg.policy, steps_per_epoch=22, total_steps=176).total_steps == 176
    cfg = compose_run("policy=one_cycle", "policy.total_steps=100")
    assert build_policy(cfg.policy, steps_per_epoch=22, total_steps=176).total_steps == 100


def test_cosine_lengths_in_epochs_become_steps_and_a_given_form_wins_over_the_presets():
    policy = build_policy(compose_run("policy=cosine").policy, steps_per_epoch=22, total_steps=176)
    assert (policy.warmup_steps, policy.cycle_steps, policy.first_cycle) == (11, None, 164)
    cfg = compose_run("policy=cosine", "policy.warmup_epochs=0", "policy.cycle_epochs=1.5", "policy.cycle_limit=3")
    policy = build_policy(cfg.policy, steps_per_epoch=22, total_steps=176)
    assert (policy.warmup_steps, policy.cycle_steps, policy.cycle_limit) == (0, 33, 3)
    cfg = compose_run("policy=cosine", "policy.warmup_steps=3", "policy.cycle_steps=40")
    assert build_policy(cfg.policy, steps_per_epoch=22, total_steps=176).warmup_steps == 3


def test_pct_start_given_on_the_command_line_replaces_the_presets_annihilate_pct():
    cfg = compose_run("policy=one_cycle", "policy.pct_start=0.3", "policy.anneal=cos")
    policy = build_policy(cfg.policy, steps_per_epoch=22, total_steps=176)
    assert (policy.annihilate_pct, policy.pct_start, policy.anneal, policy.peak) == (None, 0.3, "cos", 0.3 * 175)
    cfg = compose_run("policy=fit_one_cycle", "policy.annihilate_pct=0.2", "policy.three_phase=true")
    assert build_policy(cfg.policy, steps_per_epoch=22, total_steps=176).peak == 0.4 * 175


@pytest.mark.parametrize(
    "overrides, setting",
    [
        (["policy=triangular", "policy.stepsize=5", "policy.stepsize_epochs=2"], "policy.stepsize"),  # both given
        (["policy=cosine", "policy.warmup_steps=5", "policy.warmup_epochs=1"], "policy.warmup_steps"),
        (["policy=cosine", "policy.warmup_epochs=-1"], "policy.warmup_epochs"),
        (["policy=cosine", "policy.cycle_epochs=0"], "policy.cycle_epochs"),
        (["policy=cosine", "policy.cycle_mul=0.5"], "policy.cycle_mul"),
        (["policy=cosine", "policy.warmup_epochs=8"], "policy.warmup_steps"),  # nothing left for the cosine
        (["policy=one_cycle", "policy.three_phase=false"], "policy.annihilate_pct"),
        (["policy=one_cycle", "policy.anneal=cosine"], "policy.anneal"),
        (["policy=triangular", "policy.stepsize_epochs=0"], "policy.stepsize_epochs"),
        (["+policy.warmup=3"], "policy.warmup"),
        (["policy._target_=clrx.schedules.policies.Nope"], "policy._target_"),
        (["policy.max_lr=0.01"], "policy.base_lr"),
        (["policy=multistage", "+policy.stages.0.length=3"], "policy.stages[0].length"),
        (["policy=multistage", "policy.stages.1.policy.base_lr=1.0"], "policy.stages[1].policy.base_lr"),
        (["policy=range_test", "policy.skip_start=1.0"], "policy.skip_start"),
        (["policy=range_test", "policy.metric=val_acc"], "policy.metric"),
        (["policy=range_test", "policy.repeats=0"], "policy.repeats"),
        (["policy=range_test", "policy.val_every=5", "policy.val_batches=0"], "policy.val_batches"),
    ],
)
def test_bad_policy_settings_fail_with_the_full_key(overrides, setting):
    cfg = compose_run(*overrides)
    with pytest.raises(ConfigError) as raised:
        build_policy(cfg.policy, steps_per_epoch=22, total_steps=176)
    assert raised.value.setting == setting


@pytest.mark.parametrize(
    "overrides, setting",
    [
        (["optimizer.momentum=1.0"], "optimizer.momentum"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay"),
        (["optimizer=adam", "optimizer.betas=[0.9,1.5]"], "optimizer.betas[1]"),
        (["+optimizer.lr=0.1"], "optimizer.lr"),
        (["+optimizer.momentun=0.1"], "optimizer.momentun"),
    ],
)
def test_bad_optimizer_settings_fail_with_the_full_key(overrides, setting):
    cfg = compose_run(*overrides)
    with pytest.raises(ConfigError) as raised:
        build_optimizer(cfg.optimizer, torch.nn.Linear(2, 2), lr=0.1)
    assert raised.value.setting == setting


def test_unknown_model_suggests_close_timm_names():
    cfg = compose_run("model.name=resnet1")
    with pytest.raises(ConfigError, match="close names: .*resnet18") as raised:
        instantiate(cfg.model, "model", num_classes=10, in_chans=1)
    assert raised.value.setting == "model.name"


def test_an_error_raised_while_the_config_resolves_is_its_own_line():
    """The launch check runs inside a resolver (the run folder's time stamp); its line must survive OmegaConf."""

    def refuse(_):
        raise ConfigError("trainer.device", "2 processes on this machine but only 1 CUDA device")

    config = OmegaConf.create({"dir": "${refuse:x}"})
    OmegaConf.register_new_resolver("refuse", refuse)
    try:
        with pytest.raises(OmegaConfBaseException) as raised:
            OmegaConf.to_container(config, resolve=True)
    finally:
        OmegaConf.clear_resolver("refuse")
    assert one_line(raised.value) == "trainer.device: 2 processes on this machine but only 1 CUDA device"


@pytest.mark.parametrize("key, least", list(LEAST.items()))
def test_each_trainer_count_refuses_one_below_its_least_and_takes_its_least(key, least):
    trainer = TrainerConfig()
    setattr(trainer, key, least - 1)
    with pytest.raises(ConfigError) as raised:
        check_trainer(trainer)
    assert str(raised.value) == f"trainer.{key}: must be at least {least}, got {least - 1}"
    setattr(trainer, key, least)
    check_trainer(trainer)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("device", "tpu", "trainer.device: must be one of auto, cpu, cuda, got 'tpu'"),
        ("precision", "fp8", "trainer.precision: must be one of no, bf16, fp16, got 'fp8'"),
    ],
)
def test_trainer_device_and_precision_are_one_of_the_allowed(key, value, message):
    trainer = TrainerConfig()
    setattr(trainer, key, value)
    with pytest.raises(ConfigError) as raised:
        check_trainer(trainer)
    assert str(raised.value) == message


def test_the_trainer_counts_least_values():
    assert LEAST == {
        "epochs": 1,
        "batch_size": 1,
        "grad_accum": 1,
        "max_batch_size": 1,
        "eval_every": 1,
        "log_every": 1,
        "checkpoint_every": 0,
        "keep_last": 0,
        "early_stop": 0,
        "freeze_epochs": 0,
    }
