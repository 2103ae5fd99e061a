"""The loops a run takes: training (``fit``) and the tracked LR range test (``find_range``).

Before every optimizer step the policy's values go into the optimizer; the step counter counts
optimizer steps, so a schedule is the same on any number of processes and with any accumulation.
Per-step values go through the recorder to the tracker; checkpoints hold everything needed to
continue exactly. What to run, resuming and automatic bounds are decided above, in ``run``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import gather_object
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from clrx.config.schema import watched_metrics
from clrx.errors import ConfigError, Stopped
from clrx.lifetime import process_age
from clrx.param_groups import scales
from clrx.range_test.curve import Curve
from clrx.range_test.figure import range_figure
from clrx.range_test.run import batch_accuracy, run_range_test
from clrx.range_test.suggest import Suggestion, median_of, read, suggestion_tags
from clrx.schedules.apply import applied_momentum
from clrx.schedules.policies import Hyper, LRRange, Policy
from clrx.tracking.journal import NAME as JOURNAL
from clrx.tracking.plots import schedule_figure
from clrx.tracking.store import Silent, Tracker, log_config, main_run
from clrx.training import checkpoint
from clrx.training.recorder import Recorder
from clrx.training.session import Batch, Session, prepare
from clrx.training.stop import STOP

if TYPE_CHECKING:
    from clrx.tracking.opening import LocalStore
    from clrx.tracking.service import StoreProcess

log = logging.getLogger("clrx")
# A repeat's run is a child of the repeats' run: it takes none of its job's or cache's identity.
NOT_INHERITED = ("mlflow.parentRunId", "mlflow.runName", "clrx.job", "clrx.range_test_key")


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
    test: dict[str, float] | None = None  # the test set's scores, where one is kept apart (dataset.val_split)
    early_stop: str | None = None  # why training stopped before trainer.epochs
    final: dict[str, float] | None = None  # training: every metric logged at the end, by name (the objectives)
    suggestions: dict[str, Suggestion] | None = None
    no_suggestion: dict[str, str] | None = None  # range test: why a rule gave nothing
    stop_reason: str | None = None  # range test: why it ended


def progress_bar(session: Session, total: int) -> tqdm:
    quiet = not session.cfg.trainer.progress or os.environ.get("CI", "").lower() in ("1", "true", "yes")
    quiet = quiet or not session.accelerator.is_main_process
    return tqdm(total=total, unit="step", disable=quiet, dynamic_ncols=True)


def improves(metric: str, value: float, best: Mapping[str, Any] | None) -> bool:
    """Whether ``value`` beats the best so far: a loss (``val_loss``, ``train_loss_epoch``...) by being lower,
    anything else by being higher."""
    if not math.isfinite(value):
        return False
    return best is None or (value < best["value"] if "loss" in metric else value > best["value"])


@dataclass
class Progress:
    """Where a training run stands: all a checkpoint needs besides weights and generators."""

    step: int = 0
    bests: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric: its best value, step and epoch
    scores: dict[str, float] | None = None
    skipped: int = 0  # optimizer steps the fp16 loss scaler skipped
    seconds: float = 0.0
    stopped: str | None = None  # why training ended before trainer.epochs (trainer.early_stop)

    def watch(self, scores: Mapping[str, float], metrics: list[str], epoch: int) -> set[str]:
        """Keep each of ``metrics``' best evaluation so far; the metrics this evaluation improved."""
        improved = {metric for metric in metrics if improves(metric, scores[metric], self.bests.get(metric))}
        for metric in improved:
            self.bests[metric] = {"metric": metric, "value": scores[metric], "step": self.step, "epoch": epoch}
        return improved

    def out_of_patience(self, metric: str, patience: int, epoch: int, epochs: int) -> str | None:
        """Why training stops after ``epoch`` of ``epochs``: ``metric`` has not improved for ``patience`` epochs."""
        best = self.bests.get(metric)
        stale = epoch - (0 if best is None else best["epoch"])
        if stale < patience or epoch >= epochs:
            return None
        since = "" if best is None else f" (best {best['value']:.6g} at epoch {best['epoch']})"
        unit = "epoch" if stale == 1 else "epochs"
        return f"{metric} did not improve for {stale} {unit}{since}; stopped after epoch {epoch} of {epochs}"


def _write_checkpoint(
    session: Session,
    progress: Progress,
    recorder: Recorder,
    tracker: Tracker,
    output_dir: Path,
    node: DictConfig,
    always: bool = False,
    name: str | None = None,
) -> None:
    """Everything to continue this run exactly, once its metrics so far are safely in the journal.

    Written where the run asks for checkpoints, and ``always`` (a run stopped by a signal) unless
    ``trainer.keep_last=0`` turns them off. A ``name`` (``decay.pt``) is always written, and never pruned.
    """
    trainer = session.cfg.trainer
    if name is None and not (checkpoint.asked_for(trainer) or (always and trainer.keep_last > 0)):
        return
    recorder.drain()
    store = tracker.persist()  # every point so far is in the journal; the store may lag or have failed
    generators = gather_object([checkpoint.rng_state()])  # every process's own
    if session.accelerator.is_main_process:
        payload = {
            **session.state(),
            **progress.__dict__,
            "rng": generators,
            "record": recorder.state(),
            "run_id": tracker.run_id,
            "store": store,
            "config": OmegaConf.to_container(session.cfg, resolve=True),
            "policy": OmegaConf.to_container(node, resolve=True),
        }
        directory = output_dir / checkpoint.DIRECTORY
        path = checkpoint.path_for(directory, progress.step) if name is None else directory / name
        checkpoint.save(payload, path, session.cfg.trainer.keep_last)


def scored(session: Session, part: str) -> dict[str, float]:
    """``part``'s scores of the model and, with trainer.ema, of the averaged weights (``val_acc_ema``...)."""
    scores = session.evaluate(part)
    if session.ema is not None:
        scores |= {f"{key}_ema": value for key, value in session.evaluate(part, session.ema.module).items()}
    return scores


def tested(session: Session, tracker: Tracker, output_dir: Path, best: Mapping[str, Any] | None) -> dict[str, float]:
    """The test set's scores, once, after training: of ``best``'s weights (``checkpoints/best.pt``) where
    ``trainer.save_best`` kept them, as Lightning's ``trainer.test`` takes the best checkpoint; else of the
    final weights (and the averaged ones). The run's model keeps its final weights."""
    if best is None:
        tracker.tags({"clrx.test.weights": "final"})
        return scored(session, "test")
    path = output_dir / checkpoint.DIRECTORY / checkpoint.BEST
    model = session.plain_model
    final = {key: value.clone() for key, value in model.state_dict().items()}
    model.load_state_dict(torch.load(path, map_location=session.accelerator.device, weights_only=True)["model"])
    try:
        scores = session.evaluate("test")
    finally:
        model.load_state_dict(final)
    tracker.tags({"clrx.test.weights": f"best ({best['metric']} {best['value']:.6g} at epoch {best['epoch']})"})
    return scores


def _save_best(session: Session, tracker: Tracker, output_dir: Path, best: Mapping[str, Any]) -> None:
    """``checkpoints/best.pt``: the weights that scored ``best`` (the averaged ones for an ``_ema`` metric),
    which the MLflow run's tags describe."""
    path = output_dir / checkpoint.DIRECTORY / checkpoint.BEST
    model = session.ema.module if best["metric"].endswith("_ema") else session.plain_model
    if session.accelerator.is_main_process:
        checkpoint.save_best(model.state_dict(), path, dict(best))
    tags = {f"clrx.best.{key}": str(value) for key, value in best.items()}
    tracker.tags({**tags, "clrx.best.path": str(path)})


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
    bar = progress_bar(session, session.total_steps)
    recorder = Recorder(
        tracker,
        session.momentum,
        trainer.log_every,
        reduce=session.reduce_mean,
        on_drain=lambda n, lr, loss: (bar.update(n), bar.set_postfix(lr=f"{lr:.3g}", loss=f"{loss:.4f}")),
        lr_setting=next((f"policy.{key}" for key in ("max_lr", "lr") if key in node), "the policy's learning rates"),
        group_scales=scales(session.optimizer) if cfg.tracking.lr_per_group else None,
    )
    if resumed is not None:
        progress = Progress(**{key: resumed[key] for key in Progress.__dataclass_fields__ if key in resumed})
        session.load_state(resumed)
        checkpoint.set_rng_state(resumed["rng"][accelerator.process_index % len(resumed["rng"])])
        recorder.load(resumed["record"])
        bar.update(progress.step)

    def save(always: bool = False, name: str | None = None) -> None:
        progress.seconds = time.perf_counter() - start
        with session.averaged():  # a schedule-free optimizer is saved at its average, as it is evaluated
            _write_checkpoint(session, progress, recorder, tracker, output_dir, node, always, name)

    # trainer.checkpoint_at_decay: the step count at which a WSD decay starts (after its epoch's evaluation).
    decay_at = getattr(policy, "decay_start", None) if trainer.checkpoint_at_decay else None

    def stop(saved: bool) -> None:
        """A signal came: keep everything so far (a checkpoint, every point) and end here."""
        if not (saved and checkpoint.asked_for(trainer)):
            save(always=True)
        recorder.drain()
        signum = STOP.signum or signal.SIGTERM  # another process of the launch got it
        raise Stopped(signum, progress.step, output_dir if trainer.keep_last else None)

    def stopping(at_checkpoint: bool) -> bool:
        """Whether a signal came; several processes agree on it where they meet anyway, at checkpoints."""
        if accelerator.num_processes == 1:
            return STOP.signum is not None
        if not at_checkpoint:
            return False
        flag = torch.tensor([float(STOP.signum is not None)], device=accelerator.device)
        return session.reduce_mean(flag).item() > 0

    save_best, early = watched_metrics(trainer)
    watched = list(dict.fromkeys(metric for metric in ("val_acc", save_best, early) if metric))

    def evaluate(epoch: int) -> None:
        """Score the model, keep the best so far (and its weights, with trainer.save_best), decide on stopping."""
        progress.scores = scored(session, "val")
        scores = {"epoch": epoch, "train_loss_epoch": recorder.epoch_loss(per_epoch), **progress.scores}
        tracker.metrics(scores, progress.step)
        if save_best in progress.watch(scores, watched, epoch):
            _save_best(session, tracker, output_dir, progress.bests[save_best])
        if early:
            progress.stopped = progress.out_of_patience(early, trainer.early_stop, epoch, trainer.epochs)

    start = time.perf_counter() - progress.seconds
    # Command to first step: the process's age now, imports and start-up included.
    tracker.metric("startup_seconds", process_age(), progress.step)
    session.model.train()
    try:  # closed also when the run stops early: a message must not land on the bar's line
        last = trainer.epochs if progress.stopped is None else progress.step // per_epoch
        every = trainer.checkpoint_every  # read once: a config lookup a step would wait for
        for epoch in range(progress.step // per_epoch, last):
            session.freeze(epoch < trainer.freeze_epochs)
            for micro in session.epoch(epoch, skip=progress.step - epoch * per_epoch):
                session.policy_step(policy, progress.step, micro, recorder)
                progress.step += 1
                # A skipped fp16 step still counts: the schedule follows iterations, as in the papers.
                if accelerator.scaler is not None and accelerator.optimizer_step_was_skipped:
                    progress.skipped += 1
                    tracker.metric("amp/skipped_step", 1.0, progress.step - 1)
                mid_epoch = progress.step % per_epoch
                saved = bool(every and progress.step % every == 0 and mid_epoch)
                if saved:
                    save()
                if progress.step == decay_at and mid_epoch:
                    save(name=checkpoint.DECAY)
                if mid_epoch and stopping(saved):  # at an epoch's end, its evaluation comes first
                    stop(saved)
            recorder.drain()
            due = (epoch + 1) % trainer.eval_every == 0 or epoch + 1 == trainer.epochs
            with session.averaged(norms=due):  # evaluated and saved at the same weights
                if due:
                    evaluate(epoch + 1)
                if accelerator.scaler is not None:
                    amp = {"amp/loss_scale": accelerator.scaler.get_scale(), "amp/skipped_steps": progress.skipped}
                    tracker.metrics(amp, progress.step)
                save()
                if progress.step == decay_at:
                    save(name=checkpoint.DECAY)
            if progress.stopped is not None:
                break
            if epoch + 1 < trainer.epochs and stopping(at_checkpoint=True):
                stop(saved=True)
    finally:
        bar.close()
    progress.seconds = time.perf_counter() - start
    session.use_averaged()  # the weights a schedule-free optimizer evaluates are the ones tested and kept
    if progress.stopped is not None:
        log.info("early stop: %s", progress.stopped)
        tracker.tags({"clrx.early_stop": progress.stopped})
    test = None if session.test_loader is None else tested(session, tracker, output_dir, progress.bests.get(save_best))
    if test is not None:  # once, after training: nothing above reads the test set
        tracker.metrics(test, progress.step)
    totals = {f"best_{metric}": best["value"] for metric, best in progress.bests.items()}
    tracker.metrics({**totals, "train_seconds": progress.seconds, "steps": progress.step}, progress.step)
    drawn = recorder.steps, recorder.lrs, recorder.momenta, recorder.losses, session.momentum
    tracker.plot("plots/schedule.png", schedule_figure, *drawn)
    if trainer.save_model and accelerator.is_main_process:
        checkpoint.write_atomically(session.plain_model.state_dict(), output_dir / "model.pt")
        tracker.tags({"clrx.model_path": str(output_dir / "model.pt")})
        if session.ema is not None:
            checkpoint.write_atomically(session.ema.module.state_dict(), output_dir / "model_ema.pt")
            tracker.tags({"clrx.model_ema_path": str(output_dir / "model_ema.pt")})
    exported = session.exported() if cfg.tracking.log_model and accelerator.is_main_process else None
    if exported is not None:
        metadata = {
            "timm_model": cfg.model.name,
            "model_config": OmegaConf.to_container(cfg.model, resolve=True),
            "num_classes": session.data.num_classes,
            "in_chans": session.data.in_chans,
            **session.data.preprocessing(),
        }
        tracker.model(exported, metadata, progress.step, cfg.tracking.register_as)
    return Result(
        run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        experiment=cfg.tracking.experiment,
        steps=progress.step,
        seconds=progress.seconds,
        val_loss=progress.scores["val_loss"],
        val_acc=progress.scores["val_acc"],
        best_val_acc=progress.bests.get("val_acc", {}).get("value"),
        test=test,
        early_stop=progress.stopped,
        final={**progress.scores, **totals},
    )


def find_range(session: Session, policy: LRRange, tracker: Tracker, output_dir: Path, group: str) -> Result:
    """The LR range test as a tracked run: per-step curve, suggestions, plot and CSV."""
    bar = progress_bar(session, policy.num_iter)

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
            values["val_acc"], values["val_loss"] = curve.val_accuracy[step], curve.val_loss[step]
        tracker.metrics({k: v for k, v in values.items() if np.isfinite(v)}, step)
        bar.update(1)

    session.freeze(session.cfg.trainer.freeze_epochs > 0)  # a fine-tuning run's range test measures its frozen phase
    start = time.perf_counter()
    try:
        curve = run_range_test(
            policy,
            session.optimizer,
            session.batches(),
            train_step,
            evaluate=lambda: session.evaluate(batches=policy.val_batches),
            on_step=on_step,
        )
    except ConfigError as error:
        raise error.within(group) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    suggestions, no_suggestion = read(curve, f"{group}.", policy.skip_start, policy.metric)
    output_dir.mkdir(parents=True, exist_ok=True)
    curve.write_csv(output_dir / "range_test.csv")
    tracker.artifact(output_dir / "range_test.csv")
    tracker.plot("plots/range_test.png", range_figure, curve, suggestions, policy.metric)
    stop_reason = curve.stop_reason or f"completed {policy.num_iter} steps"
    tracker.tags({"clrx.range_test.stop": stop_reason, **suggestion_tags(suggestions, no_suggestion)})
    return Result(
        tracker.run_id,
        tracker.uri,
        session.cfg.tracking.experiment,
        len(curve.lrs),
        seconds,
        suggestions=suggestions,
        no_suggestion=no_suggestion,
        stop_reason=stop_reason,
    )


def range_tests(
    session: Session,
    policy: LRRange,
    tracker: Tracker | Silent,
    store: LocalStore | StoreProcess | None,
    output_dir: Path,
    group: str,
    tags: Mapping[str, str],
) -> Result:
    """The range test; with ``policy.repeats`` > 1, that many (seeds ``trainer.seed`` on), each a child run of
    ``tracker``'s, which holds each rule's median suggestion and its spread.

    Seeds vary the weights' initialization and the batches' order: the spread says how far one test's
    suggestion can be trusted.
    """
    if policy.repeats == 1:
        return find_range(session, policy, tracker, output_dir, group)
    inherited = {key: value for key, value in tags.items() if key not in NOT_INHERITED}
    results = []
    for repeat in range(policy.repeats):
        cfg = session.cfg.copy()
        cfg.trainer.seed = session.cfg.trainer.seed + repeat
        each = session if repeat == 0 else prepare(cfg, search_batch=False)
        child = {**inherited, "mlflow.parentRunId": tracker.run_id, "clrx.seed": str(cfg.trainer.seed)}
        name = f"{tags.get('mlflow.runName', 'range test')} seed {cfg.trainer.seed}"
        where = output_dir / f"seed_{cfg.trainer.seed}"
        with main_run(store, cfg.tracking.experiment, name, child, None, where / JOURNAL) as run:
            log_config(run, cfg, each.data, where)
            results.append(find_range(each, policy, run, where, group))
        log.info("range test seed %d ended: %s", cfg.trainer.seed, results[-1].stop_reason)
    suggestions, no_suggestion = median_of([(r.suggestions, r.no_suggestion) for r in results])
    stop_reason = f"{policy.repeats} repeats, seeds {session.cfg.trainer.seed} on; read as medians"
    tracker.tags({"clrx.range_test.stop": stop_reason, **suggestion_tags(suggestions, no_suggestion)})
    return Result(
        tracker.run_id,
        tracker.uri,
        session.cfg.tracking.experiment,
        sum(r.steps for r in results),
        sum(r.seconds for r in results),
        suggestions=suggestions,
        no_suggestion=no_suggestion,
        stop_reason=stop_reason,
    )
