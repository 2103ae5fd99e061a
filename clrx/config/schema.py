"""Typed schemas for the groups whose shape never changes, registered with Hydra's ConfigStore.

Hydra checks overrides against them while composing (``trainer.epochs=abc`` fails there, with the
key); the value ranges that types cannot express are checked by ``check_trainer``.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from clrx.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"  # absolute: the same for `python -m`, scripts and tests
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("no", "bf16", "fp16")
ON_FAILURE = ("continue", "stop")
# What ``python -m clrx`` returns to a sweeper: a metric every training run logs at its end, and which way is better.
OBJECTIVES = {"best_val_acc": "maximize", "val_acc": "maximize", "val_loss": "minimize", "train_seconds": "minimize"}
MOST_EPOCHS = 1_000_000
SEEDS = 2**32  # numpy's generators take seeds below this
GROUPS = (
    "model",
    "dataset",
    "optimizer",
    "policy",
    "range_test",
    "loss",
    "trainer",
    "tracking",
    "sweep",
)  # +sweep=NAME
URI_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")
# Policy lengths in optimizer steps that may be given in epochs instead: the epochs' key and the fewest steps.
IN_EPOCHS = {
    "stepsize": ("stepsize_epochs", 1),
    "warmup_steps": ("warmup_epochs", 0),
    "cycle_steps": ("cycle_epochs", 1),
}
# A length a preset gives in one form, which a command-line value in the other form replaces.
FORMS = [(steps, epochs) for steps, (epochs, _) in IN_EPOCHS.items()] + [("pct_start", "annihilate_pct")]
FORMS += [("warmup_frac", "warmup_steps"), ("warmup_frac", "warmup_epochs")]
BOTH_WAYS = [way for pair in FORMS for way in (pair, pair[::-1])]
OTHER_FORMS = {one: [other for first, other in BOTH_WAYS if first == one] for one, _ in BOTH_WAYS}
# The smallest value each numeric trainer setting takes.
LEAST = {
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
# What every evaluation logs, which trainer.save_best and trainer.early_stop_metric may watch; a loss
# improves downwards, the rest upwards. val_acc5 is logged for datasets of more than TOP5_ABOVE classes,
# the _ema scores of the averaged weights with trainer.ema.
EVALUATION_METRICS = (
    "val_acc",
    "val_loss",
    "val_acc5",
    "train_loss_epoch",
    "val_acc_ema",
    "val_loss_ema",
    "val_acc5_ema",
)
TOP5_ABOVE = 10


@dataclass
class TrainerConfig:
    epochs: int = 8
    batch_size: int = 64  # global: summed over all processes and accumulated micro batches
    grad_accum: int = 1  # micro batches per optimizer step
    find_batch_size: bool = False  # use the largest batch that trains a step, up to max_batch_size
    max_batch_size: int = 1024
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps between reads of the loss (one device sync each)
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False  # deterministic kernels (GPU: slower); the same command gives the same losses
    precision: str = "no"
    sync_bn: bool = False  # multi-process runs: batch norm statistics over the global batch, not each process's share
    channels_last: bool = False  # NHWC memory format for model and batches (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the model (inductor); pays off on GPUs, slow to start on CPU
    progress: bool = True
    save_model: bool = True
    dry_run: bool = False  # print and plot the schedule, train nothing
    checkpoint_every: int = 0  # optimizer steps between checkpoints within an epoch (and at its end); 0: none
    checkpoint_epochs: bool = False  # a checkpoint at every epoch end (also on with checkpoint_every or resume)
    checkpoint_at_decay: bool = False  # policy=wsd: keep checkpoints/decay.pt, where the decay starts (never pruned)
    keep_last: int = 2  # checkpoints kept in <run dir>/checkpoints; 0: write none
    resume: str | None = None  # auto (newest in the run dir, if any) or a checkpoint file or folder
    resume_changed: bool = False  # resume although the config differs from the checkpoint's
    clip_grad_norm: float | None = None  # scale gradients down to this global norm (fp16: after unscaling)
    clip_grad_value: float | None = None  # clamp every gradient element to [-value, value]
    ema: float | None = None  # decay of an average of the weights, evaluated each epoch (val_acc_ema); None: off
    ema_warmup: bool = False  # timm's warm-up: the average follows the weights closely early in the run
    save_best: str | None = None  # keep checkpoints/best.pt, the weights of the best evaluation by this metric
    early_stop: int = 0  # patience: stop after this many epochs without improvement; 0: train every epoch
    early_stop_metric: str | None = None  # what early_stop watches; null: save_best's metric, else val_acc
    freeze_epochs: int = 0  # fine-tuning: train only the head and norm layers for this many epochs first


@dataclass
class LossConfig:
    label_smoothing: float = 0.0  # this share of the target spread evenly over all classes
    mixup_alpha: float = 0.0  # mix image pairs with weights from Beta(alpha, alpha) (timm's Mixup); 0: off
    cutmix_alpha: float = 0.0  # paste a box of the paired image, its area from Beta(alpha, alpha); 0: off
    mix_prob: float = 1.0  # chance that a batch is mixed at all
    switch_prob: float = 0.5  # with both on: chance of CutMix rather than mixup for a batch


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db
    experiment: str = "clrx"
    run_name: str | None = None
    timeout: int = 20  # seconds one call to an MLflow server may take, retries included
    on_failure: str = "continue"  # a store that stops taking writes: continue (points kept in the journal) or stop
    log_model: bool = True  # the trained model as an MLflow model (mlflow.pytorch), loadable from runs:/<id>/model
    register_as: str | None = None  # also register the logged model under this name in the model registry
    system_metrics: bool = False  # CPU, memory, disk, network and GPU use every 10 s (MLflow's SystemMetricsMonitor)
    objective: str = "best_val_acc"  # the value a sweeper ranks a job by; one of OBJECTIVES
    lr_per_group: bool = False  # also log lr/<group> for every named param group each step


def check_trainer(trainer: TrainerConfig) -> None:
    for key, least in LEAST.items():
        if getattr(trainer, key) < least:
            raise ConfigError(f"trainer.{key}", f"must be at least {least}, got {getattr(trainer, key)}")
    if trainer.epochs > MOST_EPOCHS:
        raise ConfigError("trainer.epochs", f"must be at most {MOST_EPOCHS:,}, got {trainer.epochs}")
    if trainer.freeze_epochs >= trainer.epochs:
        raise ConfigError(
            "trainer.freeze_epochs",
            f"must be below trainer.epochs ({trainer.epochs}): the rest trains all layers, got {trainer.freeze_epochs}",
        )
    if not 0 <= trainer.seed < SEEDS:
        raise ConfigError("trainer.seed", f"must be in [0, 2**32 - 1], got {trainer.seed}")
    for key, allowed in (("device", DEVICES), ("precision", PRECISIONS)):
        if getattr(trainer, key) not in allowed:
            raise ConfigError(f"trainer.{key}", f"must be one of {', '.join(allowed)}, got {getattr(trainer, key)!r}")
    for key in ("clip_grad_norm", "clip_grad_value"):
        if getattr(trainer, key) is not None and not getattr(trainer, key) > 0:
            raise ConfigError(
                f"trainer.{key}", f"must be a positive number or null (no clipping), got {getattr(trainer, key)}"
            )
    if trainer.clip_grad_norm is not None and trainer.clip_grad_value is not None:
        raise ConfigError("trainer.clip_grad_value", "clip by norm or by value, not both; set the other to null")
    if trainer.ema is not None and not 0 < trainer.ema < 1:
        raise ConfigError("trainer.ema", f"must be a decay in (0, 1) such as 0.999, or null (off), got {trainer.ema}")
    for key in ("save_best", "early_stop_metric"):
        metric = getattr(trainer, key)
        if metric not in (None, *EVALUATION_METRICS):
            raise ConfigError(
                f"trainer.{key}", f"must be one of {', '.join(EVALUATION_METRICS)} or null, got {metric!r}"
            )
        if metric is not None and metric.endswith("_ema") and trainer.ema is None:
            raise ConfigError(f"trainer.{key}", f"{metric} is logged only with trainer.ema set (the averaged weights)")
    if trainer.early_stop_metric is not None and not trainer.early_stop:
        raise ConfigError(
            "trainer.early_stop_metric",
            "is read only with trainer.early_stop=N (epochs of patience); set both or neither",
        )


def check_loss(loss: LossConfig) -> None:
    ranges = {
        "label_smoothing": (0, 1, "[0, 1)"),
        "mixup_alpha": (0, float("inf"), "at least 0 (0: off)"),
        "cutmix_alpha": (0, float("inf"), "at least 0 (0: off)"),
        "mix_prob": (0, 1.0000001, "in [0, 1]"),
        "switch_prob": (0, 1.0000001, "in [0, 1]"),
    }
    for key, (low, high, allowed) in ranges.items():
        if not low <= getattr(loss, key) < high:
            raise ConfigError(f"loss.{key}", f"must be {allowed}, got {getattr(loss, key)}")


def check_metrics(trainer: TrainerConfig, num_classes: int) -> None:
    """The metrics a run watches are ones its evaluation logs: top-5 accuracy only beyond TOP5_ABOVE classes."""
    for key in ("save_best", "early_stop_metric"):
        metric = str(getattr(trainer, key))
        if metric.startswith("val_acc5") and num_classes <= TOP5_ABOVE:
            raise ConfigError(
                f"trainer.{key}",
                f"{metric} is logged only for datasets of more than {TOP5_ABOVE} classes, this one has {num_classes}; "
                "use val_acc or val_loss",
            )


def watched_metrics(trainer: TrainerConfig) -> tuple[str | None, str | None]:
    """(the metric trainer.save_best keeps the best checkpoint by, the one early stopping watches), None where off."""
    stop = (trainer.early_stop_metric or trainer.save_best or "val_acc") if trainer.early_stop else None
    return trainer.save_best, stop


def check_tracking(tracking: TrackingConfig) -> None:
    if not tracking.experiment.strip():
        raise ConfigError("tracking.experiment", "must name an experiment, got an empty name")
    if tracking.uri is not None:
        _check_uri(tracking.uri)
    if tracking.timeout < 1:
        raise ConfigError("tracking.timeout", f"must be at least 1 (seconds), got {tracking.timeout}")
    if tracking.on_failure not in ON_FAILURE:
        raise ConfigError("tracking.on_failure", f"must be one of {', '.join(ON_FAILURE)}, got {tracking.on_failure!r}")
    direction(tracking.objective)
    if tracking.register_as is not None and not (tracking.log_model and str(tracking.register_as).strip()):
        problem = "names a registered model: give a name" if tracking.log_model else "needs tracking.log_model=true"
        raise ConfigError("tracking.register_as", f"{problem}, got {tracking.register_as!r}")


def direction(objective: str) -> str:
    """``maximize`` or ``minimize``: which way ``objective`` (a ``tracking.objective``) is better."""
    if objective not in OBJECTIVES:
        allowed = ", ".join(f"{name} ({way})" for name, way in OBJECTIVES.items())
        raise ConfigError("tracking.objective", f"must be one of {allowed}, got {objective!r}")
    return OBJECTIVES[objective]


def worst(objective: str) -> float:
    """What a failed or diverged job scores: past any value a run can reach, so a sweeper ranks it last."""
    return -math.inf if OBJECTIVES.get(objective) == "maximize" else math.inf


def _check_uri(uri: str) -> None:
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.split("+")[0] not in URI_SCHEMES:
        example = (
            f"sqlite:///{Path(uri).expanduser().resolve()}" if uri.endswith(".db") else "sqlite:///abs/path/mlflow.db"
        )
        raise ConfigError("tracking.uri", f"must be a store URI such as {example} or http://host:5000, got {uri!r}")
    if scheme == "sqlite" and (not rest.startswith("///") or rest == "///"):
        what = "an in-memory store forgets the run when clrx exits" if rest in ("", "//") else "no database file"
        raise ConfigError("tracking.uri", f"{what}; give a file: sqlite:///abs/path/mlflow.db, got {uri!r}")


def check_added(overrides: Iterable[str]) -> None:
    """Refuse a ``+key`` no part of clrx reads (a typo), naming close ones.

    Model, dataset, policy and optimizer settings are checked by what they build (timm models
    take extra keys); the top level and the trainer's, tracking's and loss's settings are checked here.
    """
    fields = {
        "trainer": TrainerConfig.__dataclass_fields__,
        "tracking": TrackingConfig.__dataclass_fields__,
        "loss": LossConfig.__dataclass_fields__,
    }
    for override in overrides:
        key = override.split("=", 1)[0]
        if not key.startswith("+") or "/" in key or "@" in key:  # a group choice, such as +sweep=NAME
            continue
        group, _, rest = key.lstrip("+").partition(".")
        if group not in GROUPS:
            _refuse(group, "", GROUPS)
        name = rest.split(".")[0]
        if group in fields and name not in fields[group]:
            _refuse(name, f"{group}.", list(fields[group]))


def _refuse(name: str, prefix: str, names: Sequence[str]) -> NoReturn:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    label = "close names" if close else "settings"
    listed = ", ".join(f"{prefix}{each}" for each in (close or names))
    raise ConfigError(f"{prefix}{name}", f"no part of clrx reads this setting; {label}: {listed}")


def prefer_given(cfg: DictConfig, overrides: Iterable[str]) -> None:
    """A length given on the command line wins over the preset's other form of it (stepsize_epochs, stepsize)."""
    given = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    for key in given:
        group, _, name = key.rpartition(".")
        for other in (f"{group}.{each}" for each in OTHER_FORMS.get(name, []) if group):
            if other not in given and OmegaConf.select(cfg, other) is not None:
                OmegaConf.update(cfg, other, None)


def compose_run(*overrides: str, return_hydra: bool = False) -> DictConfig:
    """The config ``python -m clrx OVERRIDES`` composes, for code that runs clrx without its CLI."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra)
    check_added(overrides)
    prefer_given(cfg, overrides)
    return cfg


def main_process() -> bool:
    """Whether this is the process that logs and reports (rank 0 of a launch, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


_launched: list[datetime] = []  # the start time a multi-process launch agreed on


def check_gpus(processes: int, gpus: int) -> None:
    """Refuse a launch of more processes on a machine than it has GPUs, which NCCL would fail deep inside."""
    if gpus and processes > gpus:
        raise ConfigError(
            "trainer.device",
            f"{processes} processes on this machine but only {gpus} CUDA device{'s' if gpus > 1 else ''}; "
            f"launch at most {gpus} (torchrun --nproc_per_node {gpus}), or run on the CPU with "
            "ACCELERATE_USE_CPU=1 and trainer.device=cpu",
        )


def check_launch(cpu: bool) -> None:
    """``check_gpus`` for this launch: torchrun and Accelerate say how many processes share this machine."""
    import torch

    if not cpu and torch.cuda.is_available():
        check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())


def check_claims(env: Mapping[str, str]) -> None:
    """Refuse a launch whose environment speaks of several processes or machines while this process would
    train alone: Accelerate's launcher with ``--cpu`` (or one process) and ``--num_machines`` or
    ``--num_processes`` exports the master's address but starts no process group, so each machine would
    train its own copy of the run."""
    claims = [name for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK") if name in env]
    if "WORLD_SIZE" in env or not claims:
        return
    torchrun = "torchrun --nnodes N --node_rank R --nproc_per_node P --master_addr ADDR (gloo on CPUs)"
    if "ACCELERATE_MIXED_PRECISION" in env:
        raise ConfigError(
            "accelerate launch --num_machines",
            f"Accelerate set {claims[0]} but started this process alone (it does so with --cpu, or one process "
            f"per machine); launch several processes with {torchrun} or accelerate launch --multi_gpu, "
            "or drop --num_machines and --num_processes for one process",
        )
    raise ConfigError(
        claims[0],
        f"is set but WORLD_SIZE is not, so this process would train alone; launch with {torchrun}, "
        f"or unset {' and '.join(claims)} for one process",
    )


def check_launcher(launcher: Mapping[str, object]) -> None:
    """Refuse submitit_local with several tasks: it starts copies of each job that train alone, not one
    training of several processes."""
    tasks = launcher.get("tasks_per_node", 1)
    if "LocalLauncher" in str(launcher.get("_target_", "")) and isinstance(tasks, int) and tasks > 1:
        raise ConfigError(
            "hydra.launcher.tasks_per_node",
            f"submitit_local would start {tasks} copies of each job, each training alone; set it to 1 "
            f"(several processes: torchrun --nproc_per_node {tasks}, or hydra/launcher=slurm on a cluster)",
        )


def launch_time(pattern: str) -> str:
    """Now, formatted; in a multi-process launch, the main process's now on every process.

    Run directories are named by it, so all processes of one training job share one directory.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return datetime.now().strftime(pattern)
    if not _launched:
        import torch
        from accelerate import PartialState  # starts the process group: only here, when it is needed
        from accelerate.utils import broadcast_object_list, parse_flag_from_env

        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        check_launch(cpu)
        PartialState(cpu=cpu)
        _launched.extend(broadcast_object_list([datetime.now()]))
    return _launched[0].strftime(pattern)


def register() -> None:
    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True)
    store = ConfigStore.instance()
    store.store(group="trainer", name="base_trainer", node=TrainerConfig)
    store.store(group="tracking", name="base_tracking", node=TrackingConfig)
    store.store(group="loss", name="base_loss", node=LossConfig)
