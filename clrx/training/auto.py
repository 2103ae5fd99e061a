"""Automatic LR bounds: ``policy.max_lr=auto`` and friends, read off a range test of the same inputs.

A range test's suggestions are kept in the store, keyed by everything that shapes its curve, so a
second run with the same model, data, optimizer and range-test settings reuses them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from clrx.config.build import build_policy
from clrx.errors import ConfigError
from clrx.range_test.suggest import Suggestion, bounds, suggestions_from_tags
from clrx.tracking.journal import NAME as JOURNAL
from clrx.tracking.store import log_config, main_run, newest_finished_run, run_name
from clrx.training import checkpoint
from clrx.training.loop import range_tests
from clrx.training.session import Session

if TYPE_CHECKING:
    from clrx.tracking.opening import LocalStore
    from clrx.tracking.service import StoreProcess

AUTO = "auto"
BOUNDS = ("base_lr", "max_lr")
# The settings that decide a range test's outcome: equal keys, equal curves.
RANGE_TEST_INPUTS = ("model", "dataset", "optimizer", "range_test")
RANGE_TEST_TRAINER_INPUTS = ("batch_size", "seed", "precision")
RANGE_TEST_READINGS = ("rule", "div", "scale")  # how bounds are read off the curve, not what shapes it
# Not for the range-test run an automatic bound starts: it belongs to no sweep job of its own.
JOB_TAGS = ("mlflow.parentRunId", "mlflow.runName", "clrx.job")
log = logging.getLogger("clrx")


def auto_keys(node: DictConfig) -> dict[str, str]:
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


def range_test_key(cfg: DictConfig, num_iter: int) -> str:
    inputs = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in RANGE_TEST_INPUTS}
    for reading in RANGE_TEST_READINGS:
        inputs["range_test"].pop(reading, None)
    inputs["range_test"]["num_iter"] = num_iter  # null means the run's length: key the length itself
    inputs["trainer"] = {name: cfg.trainer[name] for name in RANGE_TEST_TRAINER_INPUTS}
    if cfg.trainer.freeze_epochs:  # the test measures the frozen model
        inputs["trainer"]["frozen"] = True
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cached_suggestions(
    store: LocalStore | StoreProcess, experiment: str, key: str
) -> tuple[str, dict[str, Suggestion], dict[str, str]] | None:
    """(run id, suggestions, why other rules gave none) of the newest finished range test keyed ``key``."""
    found = store.ask(newest_finished_run, experiment, "clrx.range_test_key", key)
    if found is None:
        return None
    run_id, tags, started = found
    log.info("reusing range test %s from %s", run_id, started.strftime("%Y-%m-%d %H:%M:%S"))
    return run_id, *suggestions_from_tags(tags)


def auto_bounds(
    session: Session, store: LocalStore | StoreProcess | None, output_dir: Path, run_tags: Mapping[str, str]
) -> tuple[dict[str, float], str, str]:
    """Bounds for the ``auto`` keys from a range test (cached in the store by its inputs).

    Returns (bounds, rule, range-test run id). Weights, optimizer state and random generators are
    put back (the data order depends on the epoch only), so training starts exactly as it would
    with typed-in bounds.
    """
    cfg = session.cfg
    policy = build_policy(cfg.range_test, session.steps_per_epoch, session.total_steps, "range_test")
    key = range_test_key(cfg, policy.num_iter)
    cached = cached_suggestions(store, cfg.tracking.experiment, key) if store is not None else None
    [cached] = broadcast_object_list([cached])  # the main process looked; all take its answer
    if cached is None:
        saved = copy.deepcopy(session.state()), checkpoint.rng_state()
        tags = {k: v for k, v in run_tags.items() if k not in JOB_TAGS}
        tags.update({"clrx.range_test_key": key, "clrx.policy": "range_test"})
        journal = output_dir / "range_test" / JOURNAL
        with main_run(store, cfg.tracking.experiment, run_name(cfg, tags), tags, None, journal) as tracker:
            log_config(tracker, cfg, session.data, output_dir)
            result = range_tests(session, policy, tracker, store, output_dir / "range_test", "range_test", tags)
        session.load_state(saved[0])
        checkpoint.set_rng_state(saved[1])
        log.info("range test %s ended: %s", result.run_id, result.stop_reason)
        cached = result.run_id, result.suggestions, result.no_suggestion
    run_id, suggestions, no_suggestion = cached
    if policy.rule not in suggestions:
        why = no_suggestion.get(policy.rule, "no reason recorded")
        other = f"; choose one of: {', '.join(suggestions)}" if suggestions else ""
        raise ConfigError("range_test.rule", f"{policy.rule!r} gave no suggestion here ({why}){other}")
    base_lr, max_lr = bounds(suggestions, policy.rule, policy.div, policy.scale)
    return {"base_lr": base_lr, "max_lr": max_lr}, policy.rule, run_id


def resolve_auto(
    session: Session, store: LocalStore | StoreProcess | None, output_dir: Path, tags: dict[str, str]
) -> DictConfig:
    """The policy node with automatic LRs filled in; checks the rest of it before any range test."""
    node = session.cfg.policy
    auto = auto_keys(node)
    if not auto:
        return node
    placeholders = {"base_lr": 1.0, "max_lr": 2.0}
    trial = OmegaConf.merge(node, {key: placeholders.get(key, 1.0) for key in auto})
    build_policy(trial, session.steps_per_epoch, session.total_steps)  # fail now on anything else
    found, rule, run_id = auto_bounds(session, store, output_dir, tags)
    resolved = OmegaConf.merge(node, {key: found[bound] for key, bound in auto.items()})
    tags.update({"clrx.range_test_run_id": run_id, "clrx.bounds_rule": rule})
    tags.update({f"clrx.auto.{key}": f"{resolved[key]:.6g}" for key in auto})
    log.info("LRs by range test (rule %s): %s", rule, ", ".join(f"{k}={resolved[k]:.4g}" for k in auto))
    return resolved
