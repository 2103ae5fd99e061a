"""Typed schemas for the groups whose shape never changes, registered with Hydra's ConfigStore.

Hydra checks overrides against them while composing (``trainer.epochs=abc`` fails there, with the
key); the value ranges that types cannot express are checked by ``check_trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from clrx.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"  # absolute: the same for `python -m`, scripts and tests
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainerConfig:
    epochs: int = 8
    batch_size: int = 64  # global: summed over all processes
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps between reads of the loss (one device sync each)
    seed: int = 0
    device: str = "auto"
    precision: str = "no"
    progress: bool = True
    save_model: bool = True
    dry_run: bool = False  # print and plot the schedule, train nothing


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db
    experiment: str = "clrx"
    run_name: str | None = None


def check_trainer(trainer: TrainerConfig) -> None:
    for key in ("epochs", "batch_size", "eval_every", "log_every"):
        if getattr(trainer, key) < 1:
            raise ConfigError(f"trainer.{key}", f"must be at least 1, got {getattr(trainer, key)}")
    for key, allowed in (("device", DEVICES), ("precision", PRECISIONS)):
        if getattr(trainer, key) not in allowed:
            raise ConfigError(f"trainer.{key}", f"must be one of {', '.join(allowed)}, got {getattr(trainer, key)!r}")


def compose_run(*overrides: str, return_hydra: bool = False) -> DictConfig:
    """The config ``python -m clrx OVERRIDES`` composes, for code that runs clrx without its CLI."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra)


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="trainer", name="base_trainer", node=TrainerConfig)
    store.store(group="tracking", name="base_tracking", node=TrackingConfig)
