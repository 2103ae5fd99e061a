"""One command's run: resume checks, the dry run, automatic bounds, then the tracked run.

``train(cfg, output_dir)`` is what ``python -m clrx`` calls: it builds the session, decides what
to run (training, the range test, or only a preview of the schedule) and opens the MLflow run the
loop writes into. The loop itself is ``clrx.training.loop``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from clrx.config.schema import check_trainer
from clrx.errors import ConfigError
from clrx.optim import check_policy
from clrx.param_groups import log_table
from clrx.schedules.apply import applied_momentum
from clrx.schedules.policies import Hyper, LRRange, Policy
from clrx.tracking.journal import NAME as JOURNAL
from clrx.tracking.opening import open_in_background
from clrx.tracking.plots import schedule_figure
from clrx.tracking.store import check_experiment, flatten, log_config, main_run, run_name
from clrx.training import ranks
from clrx.training.auto import auto_keys, resolve_auto
from clrx.training.finetune import run_policy
from clrx.training.loop import Result, fit, range_tests
from clrx.training.session import Session, on_cpu, prepare
from clrx.training.stop import STOP

if TYPE_CHECKING:
    from clrx.tracking.opening import LocalStore
    from clrx.tracking.service import StoreProcess

# Settings a resumed run may change: where and how it reports, not what it computes.
RESUMABLE_CHANGES = (
    "tracking.",
    "trainer.resume",
    "trainer.progress",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.checkpoint_epochs",
    "trainer.checkpoint_at_decay",
    "trainer.keep_last",
    "trainer.save_model",
    "trainer.device",
    "trainer.deterministic",
    "trainer.max_batch_size",
)
log = logging.getLogger("clrx")


def _check_policy(session: Session, policy: Policy, group: str) -> None:
    """Refuse a policy the optimizer cannot follow: momentum it lacks, a schedule that fights its own,
    or a checkpoint at a decay the policy does not have."""
    check_policy(session.torch_optimizer, policy, group)
    if session.cfg.trainer.checkpoint_at_decay and not hasattr(policy, "decay_start"):
        raise ConfigError(
            "trainer.checkpoint_at_decay", f"needs policy=wsd (a decay that starts), got {type(policy).__name__}"
        )
    if session.momentum is None and policy(0).momentum is not None:
        raise ConfigError(
            f"{group}.max_momentum",
            f"{type(session.torch_optimizer).__name__} has no momentum or betas "
            f"to cycle; set {group}.base_momentum and "
            f"{group}.max_momentum (or {group}.momentum) to null",
        )


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


def turning_points(values: list[float]) -> list[int]:
    """The steps that outline a schedule: start, end, each peak and trough, and each corner where a
    straight stretch ends or begins without turning back (one-cycle's annihilation start, a decay's
    or a cosine's floor). A stretch is straight over three steps or more: a curve's inflection is not."""
    tiny = 1e-9 * max(map(abs, values), default=1.0)
    slopes = [b - a for a, b in zip(values, values[1:], strict=False)]
    sign = [0 if abs(d) <= tiny else 1 if d > 0 else -1 for d in slopes]
    turns, direction = set(), 0  # direction: of the last stretch that moved
    for k in range(1, len(slopes)):
        if sign[k] and sign[k] != direction:
            if direction:
                turns.add(k)
            direction = sign[k]

    def straight(first: int) -> bool:  # the three slopes from slopes[first] are one
        three = slopes[first : first + 3] if first >= 0 else []
        return len(three) == 3 and max(three) - min(three) <= tiny

    bends = {
        k
        for k in range(1, len(slopes))
        if abs(slopes[k - 1] - slopes[k]) > tiny
        and (straight(k - 3) or straight(k))
        and sign[k] != -sign[k - 1]
        and not {k - 1, k, k + 1} & turns
    }
    corners = {k for k in bends if k - 1 not in bends}  # a bend between two steps marks both: keep the first
    return sorted({0, len(values) - 1} | turns | corners)


def preview(session: Session, policy: Policy, output_dir: Path) -> Path:
    """Print and plot the LR and momentum a run would apply, without training; the plot's path."""
    steps = list(range(session.total_steps))
    kept = applied_momentum(session.optimizer)  # what a step applies where the policy sets no momentum
    hypers = [Hyper(h.lr, kept if h.momentum is None else h.momentum) for h in map(policy, steps)]
    name = session.momentum or "momentum"
    log.info(
        "dry run: %d steps (%d per epoch); the schedule at its turns:", session.total_steps, session.steps_per_epoch
    )
    for step in turning_points([h.lr for h in hypers]):
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


def train(
    cfg: DictConfig,
    output_dir: Path,
    tags: Mapping[str, str] | None = None,
    store: LocalStore | StoreProcess | None = None,
) -> Result | None:
    """Build everything ``cfg`` describes, check it, then train (or range-test) one MLflow run.

    With ``trainer.resume`` a run continues from a checkpoint, in the same MLflow run. With
    ``trainer.dry_run`` only the schedule is shown (and None returned). ``store``: the store
    ``open_in_background(cfg)`` is opening, where the caller started it (and closes it); else it
    opens here, for this run.
    """
    check_trainer(cfg.trainer)
    if store is not None:
        return _train(cfg, output_dir, tags, store)
    store = open_in_background(cfg)
    try:
        return _train(cfg, output_dir, tags, store)
    finally:
        if store is not None:
            store.close()


def _train(
    cfg: DictConfig, output_dir: Path, tags: Mapping[str, str] | None, store: LocalStore | StoreProcess | None
) -> Result | None:
    resumed = ranks.resume_point(cfg.trainer.resume, output_dir, on_cpu(cfg.trainer))
    if resumed is not None:
        path, saved = resumed
        if cfg.trainer.find_batch_size:  # the batch the interrupted run found, not a new search
            cfg.trainer.batch_size = saved["config"]["trainer"]["batch_size"]
        _check_unchanged(cfg, saved["config"], path)
    session = prepare(cfg, search_batch=resumed is None)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.dry_run:
        if auto_keys(cfg.policy):
            raise ConfigError("trainer.dry_run", "auto bounds come from a range test; run policy=range_test first")
        policy = run_policy(cfg.policy, session.steps_per_epoch, session.total_steps, cfg.trainer.freeze_epochs)
        _check_policy(session, policy, "policy")
        log.info("schedule plot: %s", preview(session, policy, output_dir))
        return None
    if store is not None:  # the store open, and the run's experiment usable: or one line, before any training
        store.ask(check_experiment, cfg.tracking.experiment)
    run_tags = {
        "clrx.output_dir": str(output_dir),
        "clrx.device": str(session.accelerator.device),
        **(tags or {}),
    }
    if resumed is not None and OmegaConf.to_container(cfg.policy, resolve=True) == saved["config"]["policy"]:
        node = OmegaConf.create(saved["policy"])  # automatic bounds as the interrupted run found them
    else:
        if auto_keys(cfg.policy):  # before the range test that automatic bounds take
            check_policy(session.torch_optimizer, get_class(cfg.policy._target_))
        node = resolve_auto(session, store, output_dir, run_tags)
    policy = run_policy(node, session.steps_per_epoch, session.total_steps, cfg.trainer.freeze_epochs)
    _check_policy(session, policy, "policy")
    if resumed is not None:
        run_tags["clrx.resumed_from"] = f"{path} (step {saved['step']})"
        log.info("resuming MLflow run %s from %s at step %d", saved["run_id"], path, saved["step"])
    resume_id = None if resumed is None else saved["run_id"]
    # tracking.run_name, else a sweep job's name, else one made up; MLflow refuses a name and a differing tag.
    run_tags["mlflow.runName"] = cfg.tracking.run_name or run_tags.get("mlflow.runName") or run_name(cfg, run_tags)
    journal = output_dir / JOURNAL
    names = cfg.tracking.experiment, run_tags["mlflow.runName"]
    tracking = cfg.tracking.on_failure, cfg.tracking.system_metrics
    with (
        main_run(store, *names, run_tags, resume_id, journal, *tracking) as tracker,
        ranks.watched(tracker, output_dir),
    ):
        if resumed is None:
            log_config(tracker, cfg, session.data, output_dir)
            tracker.params({"threads": str(torch.get_num_threads())})  # CPU results depend on it
            log_table(tracker, session.optimizer, session.plain_model)
        if isinstance(policy, LRRange):
            return range_tests(session, policy, tracker, store, output_dir, "policy", run_tags)
        if node is not cfg.policy:
            tracker.params({f"bounds.{key}": str(node[key]) for key in auto_keys(cfg.policy)})
        with STOP.deferred():  # a signal ends training at a step boundary, with a checkpoint
            return fit(session, policy, tracker, output_dir, node, None if resumed is None else saved)
