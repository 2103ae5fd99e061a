"""Typed schemas for the groups whose shape never changes, registered with Hydra's ConfigStore.

Hydra checks overrides against them while composing (``trainer.epochs=abc`` fails there, with the
key); the value ranges that types cannot express are checked by ``check_trainer``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from clrx.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"  # absolute: the same for `python -m`, scripts and tests
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("no", "bf16", "fp16")
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
}


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
    channels_last: bool = False  # NHWC memory format for model and batches (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the model (inductor); pays off on GPUs, slow to start on CPU
    progress: bool = True
    save_model: bool = True
    dry_run: bool = False  # print and plot the schedule, train nothing
    checkpoint_every: int = 0  # optimizer steps between checkpoints within an epoch (and at its end); 0: none
    checkpoint_epochs: bool = False  # a checkpoint at every epoch end (also on with checkpoint_every or resume)
    keep_last: int = 2  # checkpoints kept in <run dir>/checkpoints; 0: write none
    resume: str | None = None  # auto (newest in the run dir, if any) or a checkpoint file or folder
    resume_changed: bool = False  # resume although the config differs from the checkpoint's


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db
    experiment: str = "clrx"
    run_name: str | None = None


def check_trainer(trainer: TrainerConfig) -> None:
    for key, least in LEAST.items():
        if getattr(trainer, key) < least:
            raise ConfigError(f"trainer.{key}", f"must be at least {least}, got {getattr(trainer, key)}")
    for key, allowed in (("device", DEVICES), ("precision", PRECISIONS)):
        if getattr(trainer, key) not in allowed:
            raise ConfigError(f"trainer.{key}", f"must be one of {', '.join(allowed)}, got {getattr(trainer, key)!r}")


def compose_run(*overrides: str, return_hydra: bool = False) -> DictConfig:
    """The config ``python -m clrx OVERRIDES`` composes, for code that runs clrx without its CLI."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra)


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
