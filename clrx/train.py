"""The training loop: before every optimizer step, the policy's values go into the optimizer.

The policy is never handed to ``accelerator.prepare`` (its wrapper would step a scheduler once per
process); the step counter counts optimizer steps. Only the main process talks to MLflow and
writes checkpoints. The same loop serves training and the LR range test, which also supplies
``auto`` bounds.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from clrx import checkpoint
from clrx.config.build import build_policy
from clrx.config.schema import check_trainer
from clrx.errors import ConfigError
from clrx.schedules.apply import applied_momentum
from clrx.tracking.plots import schedule_figure
from clrx.schedules.policies import Hyper, LRRange, Policy
from clrx.range_test.curve import Curve
from clrx.range_test.figure import range_figure
from clrx.range_test.run import batch_accuracy, run_range_test
from clrx.range_test.suggest import Suggestion, bounds, suggest
from clrx.recorder import Recorder
from clrx.session import Batch, Session, prepare
from clrx.tracking.store import Silent, Tracker, default_uri, flatten, open_store, tracked_run

AUTO = "auto"
BOUNDS = ("base_lr", "max_lr")
# The settings that decide a range test's outcome: equal keys, equal curves.
RANGE_TEST_INPUTS = ("model", "dataset", "optimizer", "range_test")
RANGE_TEST_TRAINER_INPUTS = ("batch_size", "seed", "precision")
RANGE_TEST_READINGS = ("rule", "div", "scale")  # how bounds are read off the curve, not what shapes it
# Not for the range-test run an automatic bound starts: it belongs to no sweep job of its own.
JOB_TAGS = ("mlflow.parentRunId", "mlflow.runName", "clrx.job")
# Settings a resumed run may change: where and how it reports, not what it computes.
RESUMABLE_CHANGES = (
    "tracking.",
    "trainer.resume",
    "trainer.progress",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_last",
    "trainer.save_model",
    "trainer.device",
    "trainer.max_batch_size",
)
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


def _check_momentum(session: Session, policy: Policy, group: str) -> None:
    if session.momentum is None and policy(0).momentum is not None:
        raise ConfigError(
            f"{group}.max_momentum",
            f"{type(session.torch_optimizer).__name__} has no momentum or betas "
            f"to cycle; set {group}.base_momentum and "
            f"{group}.max_momentum (or {group}.momentum) to null",
        )


def _progress_bar(session: Session, total: int) -> tqdm:
    quiet = not session.cfg.trainer.progress or os.environ.get("CI", "").lower() in ("1", "true", "yes")
    quiet = quiet or not session.accelerator.is_main_process
    return tqdm(total=total, unit="step", disable=quiet, dynamic_ncols=True)


def _log_config(tracker: Tracker, session: Session, output_dir: Path) -> None:
    """The config as run, plus what the data turned out to be (sizes, classes)."""
    cfg, data = session.cfg, session.data
    sizes = {"train_images": len(data.train), "val_images": len(data.val), "num_classes": data.num_classes}
    tracker.params({**flatten(cfg), **flatten(sizes, "data.")})
    tracker.text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
    if data.classes:
        tracker.text("\n".join(data.classes) + "\n", "data/classes.txt")
    if (output_dir / ".hydra").is_dir():
        tracker.artifacts(output_dir / ".hydra", "config/hydra")


@dataclass
class Progress:
    """Where a training run stands: all a checkpoint needs besides weights and generators."""

    step: int = 0
    best: float = 0.0
    scores: dict[str, float] | None = None
    skipped: int = 0  # optimizer steps the fp16 loss scaler skipped
    seconds: float = 0.0


def _write_checkpoint(
    session: Session, progress: Progress, recorder: Recorder, tracker: Tracker, output_dir: Path, node: DictConfig
) -> None:
    """Everything to continue this run exactly, once its metrics so far are safely in the store."""
    keep = session.cfg.trainer.keep_last
    if not keep:
        return
    recorder.drain()
    tracker.sync()  # a resumed run continues right after the last point the store holds
    generators = gather_object([checkpoint.rng_state()])  # every process's own
    if session.accelerator.is_main_process:
        payload = {
            **session.state(),
            **progress.__dict__,
            "rng": generators,
            "record": recorder.state(),
            "run_id": tracker.run_id,
            "config": OmegaConf.to_container(session.cfg, resolve=True),
            "policy": OmegaConf.to_container(node, resolve=True),
        }
        checkpoint.save(payload, checkpoint.path_for(output_dir / checkpoint.DIRECTORY, progress.step), keep)


def fit(
    session: Session,
    policy: Policy,
    tracker: Tracker,
    output_dir: Path,
    node: DictConfig,
    resumed: Mapping[str, Any] | None = None,
) -> Result:
    """Train for ``trainer.epochs`` (from a checkpoint's position, if given), logging every step."""
    cfg, trainer, accelerator = session.cfg, session.cfg.trainer, session.accelerator
    per_epoch = session.steps_per_epoch
    progress = Progress()
    bar = _progress_bar(session, session.total_steps)
    recorder = Recorder(
        tracker,
        session.momentum,
        trainer.log_every,
        reduce=session.reduce_mean,
        on_drain=lambda n, lr, loss: (bar.update(n), bar.set_postfix(lr=f"{lr:.3g}", loss=f"{loss:.4f}")),
    )
    if resumed is not None:
        progress = Progress(**{key: resumed[key] for key in Progress.__dataclass_fields__})
        session.load_state(resumed)
        checkpoint.set_rng_state(resumed["rng"][accelerator.process_index % len(resumed["rng"])])
        recorder.load(resumed["record"])
        bar.update(progress.step)

    def save() -> None:
        progress.seconds = time.perf_counter() - start
        _write_checkpoint(session, progress, recorder, tracker, output_dir, node)

    start = time.perf_counter() - progress.seconds
    session.model.train()
    for epoch in range(progress.step // per_epoch, trainer.epochs):
        for micro in session.epoch(epoch, skip=progress.step - epoch * per_epoch):
            session.policy_step(policy, progress.step, micro, recorder)
            progress.step += 1
            # A skipped fp16 step still counts: the schedule follows iterations, as in the papers.
            if accelerator.scaler is not None and accelerator.optimizer_step_was_skipped:
                progress.skipped += 1
                tracker.metric("amp/skipped_step", 1.0, progress.step - 1)
            if trainer.checkpoint_every and progress.step % trainer.checkpoint_every == 0 and progress.step % per_epoch:
                save()
        recorder.drain()
        if (epoch + 1) % trainer.eval_every == 0 or epoch + 1 == trainer.epochs:
            progress.scores = session.evaluate()
            progress.best = max(progress.best, progress.scores["val_acc"])
            epoch_loss = recorder.epoch_loss(per_epoch)
            tracker.metrics({"epoch": epoch + 1, "train_loss_epoch": epoch_loss, **progress.scores}, progress.step)
        if accelerator.scaler is not None:
            amp = {"amp/loss_scale": accelerator.scaler.get_scale(), "amp/skipped_steps": progress.skipped}
            tracker.metrics(amp, progress.step)
        save()
    bar.close()
    progress.seconds = time.perf_counter() - start
    totals = {"best_val_acc": progress.best, "train_seconds": progress.seconds, "steps": progress.step}
    tracker.metrics(totals, progress.step)
    figure = schedule_figure(recorder.steps, recorder.lrs, recorder.momenta, recorder.losses, session.momentum)
    tracker.figure(figure, "plots/schedule.png")
    if trainer.save_model and accelerator.is_main_process:
        checkpoint.write_atomically(session.plain_model.state_dict(), output_dir / "model.pt")
        tracker.tags({"clrx.model_path": str(output_dir / "model.pt")})
    return Result(
        run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        experiment=cfg.tracking.experiment,
        steps=progress.step,
        seconds=progress.seconds,
        val_loss=progress.scores["val_loss"],
        val_acc=progress.scores["val_acc"],
        best_val_acc=progress.best,
    )


def find_range(session: Session, policy: LRRange, tracker: Tracker, output_dir: Path, group: str) -> Result:
    """The LR range test as a tracked run: per-step curve, suggestions, plot and CSV."""
    bar = _progress_bar(session, policy.num_iter)

    def train_step(micro: list[Batch]) -> tuple[float, float | None]:
        loss, outputs = session.step(micro)
        logits, labels = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        # Every process decides on the same numbers: the loss and accuracy averaged over ranks.
        accuracy = torch.tensor(batch_accuracy(logits, labels), device=loss.device)
        loss, accuracy = session.reduce_mean(torch.stack([loss.float(), accuracy])).tolist()
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


@contextlib.contextmanager
def _run(
    session: Session, client: MlflowClient | None, name: str | None, tags: Mapping[str, str], resume: str | None = None
) -> Iterator[Tracker | Silent]:
    """The MLflow run of the main process; every other process records into nothing."""
    if not session.accelerator.is_main_process:
        yield Silent()
        return
    with tracked_run(client, session.cfg.tracking.experiment, name, tags, resume) as tracker:
        yield tracker


def auto_bounds(
    session: Session, client: MlflowClient | None, output_dir: Path, run_tags: Mapping[str, str]
) -> tuple[dict[str, float], str, str]:
    """Bounds for the ``auto`` keys from a range test (cached in the store by its inputs).

    Returns (bounds, rule, range-test run id). Weights, optimizer state and random generators are
    put back (the data order depends on the epoch only), so training starts exactly as it would
    with typed-in bounds.
    """
    cfg = session.cfg
    policy = build_policy(cfg.range_test, session.steps_per_epoch, session.total_steps, "range_test")
    key = _range_test_key(cfg, policy.num_iter)
    cached = _cached_suggestions(client, cfg.tracking.experiment, key) if client is not None else None
    [cached] = broadcast_object_list([cached])  # the main process looked; all take its answer
    if cached is None:
        saved = copy.deepcopy(session.state()), checkpoint.rng_state()
        tags = {k: v for k, v in run_tags.items() if k not in JOB_TAGS}
        tags.update({"clrx.range_test_key": key, "clrx.policy": "range_test"})
        with _run(session, client, "range test", tags) as tracker:
            _log_config(tracker, session, output_dir)
            result = find_range(session, policy, tracker, output_dir / "range_test", "range_test")
        session.load_state(saved[0])
        checkpoint.set_rng_state(saved[1])
        cached = result.run_id, result.suggestions
    run_id, suggestions = cached
    if policy.rule not in suggestions:
        raise ConfigError(
            "range_test.rule", f"{policy.rule!r} gave no suggestion here; choose one of: {', '.join(suggestions)}"
        )
    base_lr, max_lr = bounds(suggestions, policy.rule, policy.div, policy.scale)
    return {"base_lr": base_lr, "max_lr": max_lr}, policy.rule, run_id


def _resolve_auto(session: Session, client: MlflowClient | None, output_dir: Path, tags: dict[str, str]) -> DictConfig:
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


def _check_unchanged(cfg: DictConfig, saved: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume under a config that would compute something else than the checkpoint's run."""
    now, then = flatten(cfg), flatten(saved)
    differ = {key for key in now.keys() | then.keys() if now.get(key) != then.get(key)}
    changed = sorted(key for key in differ if not key.startswith(RESUMABLE_CHANGES))
    if changed and not cfg.trainer.resume_changed:
        differences = ", ".join(f"{key} ({then.get(key, '-')} -> {now.get(key, '-')})" for key in changed)
        raise ConfigError(
            "trainer.resume",
            f"the config differs from checkpoint {path}'s in {differences}; "
            "use the same values, or add trainer.resume_changed=true to resume anyway",
        )


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

    With ``trainer.resume`` a run continues from a checkpoint, in the same MLflow run. With
    ``trainer.dry_run`` only the schedule is shown (and None returned).
    """
    check_trainer(cfg.trainer)
    resumed = checkpoint.find(cfg.trainer.resume, output_dir)
    if resumed is not None:
        path, saved = resumed
        if cfg.trainer.find_batch_size:  # the batch the interrupted run found, not a new search
            cfg.trainer.batch_size = saved["config"]["trainer"]["batch_size"]
        _check_unchanged(cfg, saved["config"], path)
    session = prepare(cfg, search_batch=resumed is None)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.dry_run:
        if _auto_keys(cfg.policy):
            raise ConfigError("trainer.dry_run", "auto bounds come from a range test; run policy=range_test first")
        policy = build_policy(cfg.policy, session.steps_per_epoch, session.total_steps)
        _check_momentum(session, policy, "policy")
        log.info("schedule plot: %s", preview(session, policy, output_dir))
        return None
    main = session.accelerator.is_main_process
    client = open_store(cfg.tracking.uri or default_uri()) if main else None
    run_tags = {"mlflow.source.name": "clrx", "clrx.output_dir": str(output_dir), **(tags or {})}
    if resumed is not None and OmegaConf.to_container(cfg.policy, resolve=True) == saved["config"]["policy"]:
        node = OmegaConf.create(saved["policy"])  # automatic bounds as the interrupted run found them
    else:
        node = _resolve_auto(session, client, output_dir, run_tags)
    policy = build_policy(node, session.steps_per_epoch, session.total_steps)
    _check_momentum(session, policy, "policy")
    if resumed is not None:
        run_tags["clrx.resumed_from"] = f"{path} (step {saved['step']})"
        log.info("resuming MLflow run %s from %s at step %d", saved["run_id"], path, saved["step"])
    resume_id = None if resumed is None else saved["run_id"]
    with _run(session, client, cfg.tracking.run_name, run_tags, resume_id) as tracker:
        if resumed is None:
            _log_config(tracker, session, output_dir)
        if isinstance(policy, LRRange):
            return find_range(session, policy, tracker, output_dir, "policy")
        if node is not cfg.policy:
            tracker.params({f"bounds.{key}": str(node[key]) for key in _auto_keys(cfg.policy)})
        return fit(session, policy, tracker, output_dir, node, None if resumed is None else saved)
