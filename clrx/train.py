"""The training loop: before every optimizer step, the policy's values go into the optimizer.

Accelerate places the model and batches and handles mixed precision; the policy is never handed
to ``accelerator.prepare`` (its wrapper would step a scheduler once per process). The same loop
serves training and the LR range test (``policy=range_test``, or ``policy.max_lr=auto``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clrx.build import build_optimizer, build_policy, instantiate
from clrx.config import check_trainer
from clrx.data import Splits, keep_batch
from clrx.errors import ConfigError
from clrx.optim import applied_momentum, apply_hyper, momentum_name
from clrx.plots import schedule_figure
from clrx.policies import Hyper, LRRange, Policy
from clrx.range_test import Curve, Suggestion, batch_accuracy, bounds, range_figure, run_range_test, suggest
from clrx.recorder import Recorder
from clrx.tracking import Tracker, default_uri, flatten, open_store, tracked_run

AUTO = "auto"
BOUNDS = ("base_lr", "max_lr")
# The settings that decide a range test's outcome: equal keys, equal curves.
RANGE_TEST_INPUTS = ("model", "dataset", "optimizer", "range_test")
RANGE_TEST_TRAINER_INPUTS = ("batch_size", "seed", "precision")
RANGE_TEST_READINGS = ("rule", "div", "scale")  # how bounds are read off the curve, not what shapes it
# Not for the range-test run an automatic bound starts: it belongs to no sweep job of its own.
JOB_TAGS = ("mlflow.parentRunId", "mlflow.runName", "clrx.job")
log = logging.getLogger("clrx")


@dataclass(frozen=True)
class Result:
    run_id: str
    tracking_uri: str
    experiment: str
    steps: int
    seconds: float
    val_loss: float | None = None
    val_acc: float | None = None
    best_val_acc: float | None = None
    suggestions: dict[str, Suggestion] | None = None


@dataclass
class Session:
    """Everything a run is built from, ready on the accelerator."""

    cfg: DictConfig
    accelerator: Accelerator
    data: Splits
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    momentum: str | None

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; (loss, logits), both still on the device."""
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    def policy_step(
        self, policy: Policy, step: int, images: torch.Tensor, labels: torch.Tensor, recorder: Recorder
    ) -> None:
        """Optimizer step number ``step``: the policy's values applied, the step taken and recorded."""
        hyper = policy(step)
        apply_hyper(self.optimizer, hyper)
        loss, _ = self.step(images, labels)
        recorder.record(step, hyper.lr, applied_momentum(self.optimizer), loss)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for as many epochs as asked for."""
        for epoch in itertools.count():
            self.train_loader.set_epoch(epoch)
            yield from self.train_loader

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and top-1 accuracy over the whole set (each sample counted once)."""
        self.model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for images, labels in self.val_loader:
            logits, labels = self.accelerator.gather_for_metrics((self.model(images), labels))
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            count += len(labels)
        self.model.train()
        return {"val_loss": loss_sum / count, "val_acc": correct / count}


def _loaders(data: Splits, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    if batch_size > len(data.train):
        raise ConfigError(
            "trainer.batch_size",
            f"must not exceed the {len(data.train)} training images of dataset {data.name}, got {batch_size}",
        )
    order = torch.Generator().manual_seed(seed)
    train = DataLoader(data.train, batch_size, shuffle=True, drop_last=True, collate_fn=keep_batch, generator=order)
    return train, DataLoader(data.val, batch_size, collate_fn=keep_batch)


def prepare(cfg: DictConfig) -> Session:
    """Build and check everything except the policy; nothing is trained or tracked yet."""
    trainer = cfg.trainer
    check_trainer(trainer)
    set_seed(trainer.seed)
    if trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda was requested but no CUDA device is available; use auto or cpu")
    accelerator = Accelerator(mixed_precision=trainer.precision, cpu=trainer.device == "cpu")
    data = instantiate(cfg.dataset, "dataset")
    train_loader, val_loader = _loaders(data, trainer.batch_size, trainer.seed)
    model = instantiate(cfg.model, "model", num_classes=data.num_classes, in_chans=data.in_chans)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=1e-3)  # the policy sets lr every step
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = len(train_loader)
    return Session(
        cfg=cfg,
        accelerator=accelerator,
        data=data,
        model=model,
        optimizer=optimizer,
        train_loader=train_loader,
        val_loader=val_loader,
        steps_per_epoch=steps_per_epoch,
        total_steps=trainer.epochs * steps_per_epoch,
        momentum=momentum_name(optimizer),
    )


def _check_momentum(session: Session, policy: Policy, group: str) -> None:
    if session.momentum is None and policy(0).momentum is not None:
        raise ConfigError(
            f"{group}.max_momentum",
            f"{type(session.optimizer).__name__} has no momentum or betas to cycle; set {group}.base_momentum and "
            f"{group}.max_momentum (or {group}.momentum) to null",
        )


def _progress_bar(cfg: DictConfig, total: int) -> tqdm:
    quiet = not cfg.trainer.progress or os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, unit="step", disable=quiet, dynamic_ncols=True)


def _save(model: torch.nn.Module, path: Path) -> None:
    """Write atomically: a crash leaves the previous file or none, never a torn one."""
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)


def _log_config(tracker: Tracker, cfg: DictConfig, output_dir: Path) -> None:
    tracker.params(flatten(cfg))
    tracker.text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
    if (output_dir / ".hydra").is_dir():
        tracker.client.log_artifacts(tracker.run_id, str(output_dir / ".hydra"), "config/hydra")


def fit(session: Session, policy: Policy, tracker: Tracker, output_dir: Path) -> Result:
    """Train for ``trainer.epochs``, logging every step and every evaluation."""
    cfg, trainer = session.cfg, session.cfg.trainer
    bar = _progress_bar(cfg, session.total_steps)
    recorder = Recorder(
        tracker,
        session.momentum,
        trainer.log_every,
        on_drain=lambda n, lr, loss: (bar.update(n), bar.set_postfix(lr=f"{lr:.3g}", loss=f"{loss:.4f}")),
    )
    start, step, scores, best = time.perf_counter(), 0, {}, 0.0
    session.model.train()
    for epoch in range(1, trainer.epochs + 1):
        session.train_loader.set_epoch(epoch - 1)
        for images, labels in session.train_loader:
            session.policy_step(policy, step, images, labels, recorder)
            step += 1
        recorder.drain()
        if epoch % trainer.eval_every == 0 or epoch == trainer.epochs:
            scores = session.evaluate()
            best = max(best, scores["val_acc"])
            epoch_loss = recorder.epoch_loss(session.steps_per_epoch)
            tracker.metrics({"epoch": epoch, "train_loss_epoch": epoch_loss, **scores}, step)
    seconds = time.perf_counter() - start
    bar.close()
    tracker.metrics({"best_val_acc": best, "train_seconds": seconds, "steps": step}, step)
    figure = schedule_figure(recorder.steps, recorder.lrs, recorder.momenta, recorder.losses, session.momentum)
    tracker.figure(figure, "plots/schedule.png")
    if trainer.save_model:
        _save(session.accelerator.unwrap_model(session.model), output_dir / "model.pt")
        tracker.tags({"clrx.model_path": str(output_dir / "model.pt")})
    return Result(
        run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        experiment=cfg.tracking.experiment,
        steps=step,
        seconds=seconds,
        val_loss=scores["val_loss"],
        val_acc=scores["val_acc"],
        best_val_acc=best,
    )


def find_range(session: Session, policy: LRRange, tracker: Tracker, output_dir: Path, group: str) -> Result:
    """The LR range test as a tracked run: per-step curve, suggestions, plot and CSV."""
    accelerator = session.accelerator
    bar = _progress_bar(session.cfg, policy.num_iter)

    def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float | None]:
        loss, logits = session.step(*batch)
        # Every process decides on the same numbers: the loss and accuracy averaged over ranks.
        accuracy = torch.tensor(batch_accuracy(logits, batch[1]), device=loss.device)
        loss, accuracy = accelerator.reduce(torch.stack([loss.float(), accuracy]), "mean").tolist()
        return loss, accuracy

    def on_step(step: int, hyper: Hyper, curve: Curve) -> None:
        values = {"lr": hyper.lr, "train_loss": curve.losses[-1], "smoothed_loss": curve.smoothed[-1]}
        if session.momentum is not None:
            values[session.momentum] = applied_momentum(session.optimizer)
        if curve.accuracy[-1] is not None:
            values["batch_acc"] = curve.accuracy[-1]
        if step in curve.val_accuracy:
            values["val_acc"] = curve.val_accuracy[step]
        tracker.metrics({k: v for k, v in values.items() if np.isfinite(v)}, step)
        bar.update(1)

    start = time.perf_counter()
    try:
        curve = run_range_test(
            policy,
            session.optimizer,
            session.batches(),
            train_step,
            evaluate=lambda: session.evaluate()["val_acc"],
            on_step=on_step,
        )
    except ConfigError as error:
        raise error.within(group) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    suggestions = suggest(curve)
    output_dir.mkdir(parents=True, exist_ok=True)
    curve.write_csv(output_dir / "range_test.csv")
    tracker.artifact(output_dir / "range_test.csv")
    tracker.figure(range_figure(curve, suggestions), "plots/range_test.png")
    tags = {"clrx.range_test.stop": curve.stop_reason or f"completed {policy.num_iter} steps"}
    for rule, suggestion in suggestions.items():
        tags[f"clrx.suggest.{rule}"] = json.dumps(
            {"base_lr": suggestion.base_lr, "max_lr": suggestion.max_lr, "why": suggestion.why}
        )
    tracker.tags(tags)
    return Result(
        tracker.run_id, tracker.uri, session.cfg.tracking.experiment, len(curve.lrs), seconds, suggestions=suggestions
    )


def _auto_keys(node: DictConfig) -> dict[str, str]:
    """The LR settings read from a range test, each with the bound it takes.

    ``auto`` takes the bound of the same name (base_lr, max_lr); ``auto.base_lr`` or
    ``auto.max_lr`` names it, so a fixed ``lr`` can sit at either end of the range.
    """
    named = {f"{AUTO}.{bound}": bound for bound in BOUNDS}
    auto = {}
    for key, value in node.items():
        if value == AUTO and key in BOUNDS and all(bound in node for bound in BOUNDS):
            auto[key] = key
        elif value in named:
            auto[key] = named[value]
        elif value == AUTO:
            raise ConfigError(
                f"policy.{key}",
                "auto is for base_lr and max_lr of a policy with both bounds; "
                "elsewhere use auto.base_lr or auto.max_lr",
            )
    return auto


def _range_test_key(cfg: DictConfig, num_iter: int) -> str:
    inputs = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in RANGE_TEST_INPUTS}
    for reading in RANGE_TEST_READINGS:
        inputs["range_test"].pop(reading, None)
    inputs["range_test"]["num_iter"] = num_iter  # null means the run's length: key the length itself
    inputs["trainer"] = {name: cfg.trainer[name] for name in RANGE_TEST_TRAINER_INPUTS}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _cached_suggestions(client: MlflowClient, experiment: str, key: str) -> tuple[str, dict[str, Suggestion]] | None:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.`clrx.range_test_key` = '{key}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        return None
    tags = runs[0].data.tags
    prefix = "clrx.suggest."
    return runs[0].info.run_id, {
        name[len(prefix) :]: Suggestion(name[len(prefix) :], **json.loads(value))
        for name, value in tags.items()
        if name.startswith(prefix)
    }


@dataclass
class _Snapshot:
    """What a range test changes and training must start from: weights, optimizer, RNGs, data order."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    rng: tuple[Any, ...]
    data_order: torch.Tensor

    @classmethod
    def take(cls, session: Session) -> _Snapshot:
        rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        if torch.cuda.is_available():
            rng += (torch.cuda.get_rng_state_all(),)
        return cls(
            copy.deepcopy(session.model.state_dict()),
            copy.deepcopy(session.optimizer.state_dict()),
            rng,
            session.train_loader.base_dataloader.generator.get_state(),
        )

    def restore(self, session: Session) -> None:
        session.model.load_state_dict(self.model)
        session.optimizer.load_state_dict(self.optimizer)
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])
        if len(self.rng) > 3:
            torch.cuda.set_rng_state_all(self.rng[3])
        session.train_loader.base_dataloader.generator.set_state(self.data_order)


def auto_bounds(
    session: Session, client: MlflowClient, output_dir: Path, run_tags: Mapping[str, str]
) -> tuple[dict[str, float], str, str]:
    """Bounds for the ``auto`` keys from a range test (cached in the store by its inputs).

    Returns (bounds, rule, range-test run id). Weights, optimizer state, random generators and
    the data order are put back, so training starts exactly as it would with typed-in bounds.
    """
    cfg = session.cfg
    policy = build_policy(cfg.range_test, session.steps_per_epoch, session.total_steps, "range_test")
    key = _range_test_key(cfg, policy.num_iter)
    cached = _cached_suggestions(client, cfg.tracking.experiment, key)
    if cached is None:
        snapshot = _Snapshot.take(session)
        tags = {k: v for k, v in run_tags.items() if k not in JOB_TAGS}
        tags.update({"clrx.range_test_key": key, "clrx.policy": "range_test"})
        with tracked_run(client, cfg.tracking.experiment, "range test", tags) as tracker:
            _log_config(tracker, cfg, output_dir)
            result = find_range(session, policy, tracker, output_dir / "range_test", "range_test")
        snapshot.restore(session)
        cached = result.run_id, result.suggestions
    run_id, suggestions = cached
    if policy.rule not in suggestions:
        raise ConfigError(
            "range_test.rule", f"{policy.rule!r} gave no suggestion here; choose one of: {', '.join(suggestions)}"
        )
    base_lr, max_lr = bounds(suggestions, policy.rule, policy.div, policy.scale)
    return {"base_lr": base_lr, "max_lr": max_lr}, policy.rule, run_id


def _resolve_auto(session: Session, client: MlflowClient, output_dir: Path, tags: dict[str, str]) -> DictConfig:
    """The policy node with automatic LRs filled in; checks the rest of it before any range test."""
    node = session.cfg.policy
    auto = _auto_keys(node)
    if not auto:
        return node
    placeholders = {"base_lr": 1.0, "max_lr": 2.0}
    trial = OmegaConf.merge(node, {key: placeholders.get(key, 1.0) for key in auto})
    build_policy(trial, session.steps_per_epoch, session.total_steps)  # fail now on anything else
    found, rule, run_id = auto_bounds(session, client, output_dir, tags)
    resolved = OmegaConf.merge(node, {key: found[bound] for key, bound in auto.items()})
    tags.update({"clrx.range_test_run_id": run_id, "clrx.bounds_rule": rule})
    tags.update({f"clrx.auto.{key}": f"{resolved[key]:.6g}" for key in auto})
    log.info("LRs by range test (rule %s): %s", rule, ", ".join(f"{k}={resolved[k]:.4g}" for k in auto))
    return resolved


def preview(session: Session, policy: Policy, output_dir: Path) -> Path:
    """Print and plot the LR and momentum a run would apply, without training; the plot's path."""
    steps = list(range(session.total_steps))
    kept = applied_momentum(session.optimizer)  # what a step applies where the policy sets no momentum
    hypers = [Hyper(h.lr, kept if h.momentum is None else h.momentum) for h in map(policy, steps)]
    name = session.momentum or "momentum"
    log.info("dry run: %d steps (%d per epoch); the schedule:", session.total_steps, session.steps_per_epoch)
    for step in sorted({*range(0, session.total_steps, max(1, session.total_steps // 10)), steps[-1]}):
        momentum = "-" if hypers[step].momentum is None else f"{hypers[step].momentum:.4g}"
        log.info(
            "  step %6d  epoch %6.2f  lr %.4g  %s %s",
            step,
            step / session.steps_per_epoch,
            hypers[step].lr,
            name,
            momentum,
        )
    figure = schedule_figure(steps, [h.lr for h in hypers], [h.momentum for h in hypers], None, session.momentum)
    figure.savefig(output_dir / "schedule_preview.png")
    return output_dir / "schedule_preview.png"


def train(cfg: DictConfig, output_dir: Path, tags: Mapping[str, str] | None = None) -> Result | None:
    """Build everything ``cfg`` describes, check it, then train (or range-test) one MLflow run.

    With ``trainer.dry_run`` only the schedule is shown (and None returned).
    """
    session = prepare(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.dry_run:
        if _auto_keys(cfg.policy):
            raise ConfigError("trainer.dry_run", "auto bounds come from a range test; run policy=range_test first")
        policy = build_policy(cfg.policy, session.steps_per_epoch, session.total_steps)
        _check_momentum(session, policy, "policy")
        log.info("schedule plot: %s", preview(session, policy, output_dir))
        return None
    client = open_store(cfg.tracking.uri or default_uri())
    run_tags = {"mlflow.source.name": "clrx", "clrx.output_dir": str(output_dir), **(tags or {})}
    node = _resolve_auto(session, client, output_dir, run_tags)
    policy = build_policy(node, session.steps_per_epoch, session.total_steps)
    _check_momentum(session, policy, "policy")
    with tracked_run(client, cfg.tracking.experiment, cfg.tracking.run_name, run_tags) as tracker:
        _log_config(tracker, cfg, output_dir)
        if isinstance(policy, LRRange):
            return find_range(session, policy, tracker, output_dir, "policy")
        if node is not cfg.policy:
            tracker.params({f"bounds.{key}": str(node[key]) for key in _auto_keys(cfg.policy)})
        return fit(session, policy, tracker, output_dir)
