"""The stages of the disciplined approach under one MLflow parent run, each training a child run.

Every child is composed from the user's overrides plus what the stages decided, exactly as
``python -m clrx`` would compose it, so the last run's overrides are the command that repeats it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from clrx.config.schema import compose_run
from clrx.data.splits import build_data
from clrx.disciplined.rules import (
    Budget,
    NoCandidate,
    bisection,
    choose_by_val_loss,
    choose_weight_decay,
    read_curve,
)
from clrx.errors import ClrxError, ConfigError, one_line
from clrx.range_test.suggest import Suggestion, bounds
from clrx.tracking.opening import LocalStore
from clrx.training.auto import cached_suggestions, range_test_key
from clrx.training.run import train
from clrx.training.session import prepare

if TYPE_CHECKING:
    from mlflow import MlflowClient

STAGES = ("batch", "weight_decay", "bisect", "bounds", "train")
# The setting a user fixes to skip a stage: its value is then taken as given.
FIXED = {"batch": "trainer.batch_size", "weight_decay": "optimizer.weight_decay", "bounds": "policy.max_lr"}
FIXED["bisect"] = FIXED["weight_decay"]
log = logging.getLogger("clrx")


@dataclass
class StageReport:
    """What a stage did, for the report: its outcome, the rule that decided, a table and an overlay figure."""

    title: str
    outcome: str = ""
    rule: str = ""
    rows: list[dict[str, object]] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)  # the runs its overlay figure draws


@dataclass(frozen=True)
class RangeTest:
    """A finished range test at one weight decay, run now or reused from the store."""

    run_id: str
    reused: bool
    suggestions: dict[str, Suggestion]
    no_suggestion: dict[str, str]
    lrs: list[float]
    smoothed: list[float]


def given_keys(overrides: Iterable[str]) -> dict[str, str]:
    """The user's overrides by key (``+`` and ``~`` kept in the key), in the order given."""
    return dict(override.partition("=")[::2] for override in overrides)


def _number(value: float) -> str:
    """A value as the command line gets it: 4 significant digits, the same string the run was composed from."""
    return f"{value:.4g}"


class Procedure:
    """The stages, in order; each fills ``self.reports`` and the values later stages take."""

    def __init__(self, cfg: DictConfig, overrides: list[str], client: MlflowClient, parent: str, out: Path) -> None:
        self.cfg, self.settings, self.client, self.parent, self.out = cfg, cfg.disciplined, client, parent, out
        self.user = {k: v for k, v in given_keys(overrides).items() if not k.lstrip("+~").startswith("disciplined")}
        self.given = {key.lstrip("+~") for key in self.user}
        # The batch is decided here: a search the user asked for (trainer.find_batch_size=true) is not repeated.
        self.decided = {"trainer.find_batch_size": "false"} if "trainer.find_batch_size" in self.given else {}
        self.tests: dict[float, RangeTest | str] = {}
        self.reports: list[StageReport] = []
        self.children = 0
        self.range_test_steps = self.short_epochs = self.steps_per_epoch = self.final_steps = 0

    # --- composing and running children -------------------------------------------------------
    def args(self, decided: dict[str, str], range_test: bool = False) -> list[str]:
        """The user's overrides under ``decided``; a range test takes ``range_test.*`` as its policy's settings."""
        user = dict(self.user)
        if range_test:
            user = {k: v for k, v in user.items() if k.lstrip("+~").split(".")[0] != "policy"}
            user |= {f"policy.{k.partition('.')[2]}": v for k, v in self.user.items() if k.startswith("range_test.")}
        return [f"{k}={v}" for k, v in decided.items()] + [f"{k}={v}" for k, v in user.items() if k not in decided]

    def child(self, stage: str, name: str, args: list[str], tags: dict[str, str] | None = None) -> tuple[Any, str]:
        """Train one child run of the parent; (its result, or the failure in one line; its run id or '')."""
        self.children += 1
        cfg = compose_run(*args)
        tags = {
            "mlflow.parentRunId": self.parent,
            "mlflow.runName": name,
            "clrx.job": str(self.children),
            "clrx.overrides": " ".join(args),
            "clrx.disciplined.stage": stage,
            "clrx.policy": self.policy(),
            **(tags or {}),
        }
        print(f"  {name}: training", flush=True)
        try:
            result = train(cfg, self.out / "runs" / f"{self.children:02d}", tags)
        except Exception as error:
            reason = one_line(error) if isinstance(error, ClrxError) else f"{type(error).__name__}: {error}"
            if "policy=range_test" in args and reason.startswith("policy."):  # range_test.* became its policy.*
                reason = "range_test." + reason.removeprefix("policy.")
            print(f"  {name}: failed: {reason}")
            return reason, getattr(error, "run_id", None) or ""
        return result, result.run_id

    def range_test(self, wd: float, stage: str) -> RangeTest | str:
        """The range test at weight decay ``wd``: from the store if the same inputs were tested, else a child run."""
        if wd in self.tests:
            return self.tests[wd]
        steps = str(self.range_test_steps)
        decided = {**self.decided, "optimizer.weight_decay": _number(wd), "policy": "range_test"}
        decided |= {"policy.num_iter": steps, "range_test.num_iter": steps}
        if "range_test.mode" not in self.given:
            mode = self.cfg.disciplined.weight_decay.range_test_mode
            decided |= {"policy.mode": mode, "range_test.mode": mode}
        args = self.args(decided, range_test=True)
        key = range_test_key(compose_run(*args), self.range_test_steps)
        cached = cached_suggestions(LocalStore.of(self.client), self.cfg.tracking.experiment, key)
        if cached is not None:
            run_id, suggestions, no_suggestion = cached
            print(f"  range test wd {wd:g}: reusing run {run_id} (same inputs, key {key})")
            reused = True
        else:
            result, run_id = self.child(
                stage, f"range test wd {wd:g}", args, {"clrx.range_test_key": key, "clrx.policy": "range_test"}
            )
            if isinstance(result, str):
                self.tests[wd] = result
                return result
            suggestions, no_suggestion, reused = result.suggestions, result.no_suggestion, False
        history = {
            key: [m.value for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in ("lr", "smoothed_loss")
        }
        found = RangeTest(run_id, reused, suggestions, no_suggestion, history["lr"], history["smoothed_loss"])
        self.tests[wd] = found
        return found

    # --- the stages ---------------------------------------------------------------------------
    def skipped(self, stage: str) -> str | None:
        """Why ``stage`` does not run (its input given, or left out of disciplined.stages), or None."""
        if FIXED.get(stage) in self.given:
            key = FIXED[stage]
            return f"skipped: {key}={self.user.get(key, self.user.get('+' + key))} given"
        if stage not in self.settings.stages:
            return "skipped: not in disciplined.stages; the config's value is used"
        return None

    def batch(self) -> None:
        report = StageReport("1. Batch size: the largest that trains a step")
        cfg = compose_run(*self.args(self.decided))
        why = self.skipped("batch")
        if why is None:
            images = len(build_data(cfg.dataset).train)
            cap = min(cfg.trainer.max_batch_size, images // self.settings.batch.min_steps_per_epoch)
            cfg.trainer.find_batch_size, cfg.trainer.max_batch_size = True, max(cap, 2)
            report.rule = (
                "doubling then bisection until a step runs out of memory (clrx.training.batch_size), capped at "
                f"min(trainer.max_batch_size, {images} training images / "
                f"disciplined.batch.min_steps_per_epoch {self.settings.batch.min_steps_per_epoch}) = {cap}"
            )
        session = prepare(cfg, search_batch=why is None)
        self.decided["trainer.batch_size"] = str(cfg.trainer.batch_size)
        self.steps_per_epoch, self.final_steps = session.steps_per_epoch, session.total_steps
        del session
        gc.collect()
        report.outcome = why or f"batch {cfg.trainer.batch_size}"
        report.rows = [
            {"batch": cfg.trainer.batch_size, "steps per epoch": self.steps_per_epoch, "final steps": self.final_steps}
        ]
        self.reports.append(report)

    def budget(self) -> Budget:
        """The steps each stage may take, at most, from the settings and the batch."""
        settings, epochs = self.settings, self.cfg.trainer.epochs
        share = round(settings.weight_decay.range_test_share * self.final_steps)
        given = self.cfg.range_test.num_iter if "range_test.num_iter" in self.given else None  # the user's length wins
        self.range_test_steps = given or max(settings.weight_decay.min_range_test_steps, share)
        self.short_epochs = max(1, round(settings.bisect.share * epochs))
        search, bisect = self.skipped("weight_decay") is None, self.skipped("bisect") is None
        bounded = self.skipped("bounds") is None
        tests = (
            len(settings.weight_decay.grid)
            if search
            else int(bounded or (bisect and "policy.max_lr" not in self.given))
        )
        return Budget(
            range_tests=tests,
            range_test_steps=self.range_test_steps,
            short_runs=len(settings.bisect.factors) if bisect else 0,
            short_steps=self.short_epochs * self.steps_per_epoch,
            final_steps=self.final_steps,
            extra_range_test=bisect and bounded,  # the bisection may move the weight decay off what was tested
            trains=self.skipped("train") is None,
        )

    def weight_decay(self) -> float:
        """Range tests over the grid, read by the rule: the weight decay at the centre of the bisection."""
        report = StageReport("2. Weight decay: one LR range test per candidate")
        self.reports.append(report)
        configured = float(self.cfg.optimizer.weight_decay)
        why = self.skipped("weight_decay")
        if why is not None:
            report.outcome = f"{why}: weight decay {configured:g}"
            return configured
        settings = self.settings.weight_decay
        readings = {}
        for wd in map(float, settings.grid):
            found = self.range_test(wd, "weight_decay")
            if isinstance(found, RangeTest):
                report.run_ids.append(found.run_id)
                try:
                    readings[wd] = read_curve(
                        found.lrs, found.smoothed, settings.stable_factor, self.cfg.range_test.skip_start
                    )
                except ValueError as error:
                    readings[wd] = f"unreadable curve: {error}"
            else:
                readings[wd] = found
        decision = choose_weight_decay(readings, settings.tolerance, settings.stable_factor)
        report.rule, report.outcome = decision.rule, f"weight decay {decision.chosen:g}"
        for wd in readings:
            test = self.tests[wd]
            run = test.run_id + (" (reused)" if test.reused else "") if isinstance(test, RangeTest) else ""
            report.rows.append({"weight decay": f"{wd:g}", "range test run": run, "reading": decision.why[wd]})
        return decision.chosen

    def center_bounds(self, wd: float, stage: str) -> dict[str, str]:
        """``policy.base_lr`` and ``max_lr`` by range_test.rule off the range test at ``wd``, as ``auto`` reads them."""
        found = self.range_test(wd, stage)
        if isinstance(found, str):
            raise NoCandidate(f"the range test at weight decay {wd:g} failed: {found}")
        rule, node = self.cfg.range_test.rule, self.cfg.range_test
        if rule not in found.suggestions:
            why = found.no_suggestion.get(rule, "no reason recorded")
            raise ConfigError(
                "range_test.rule", f"{rule!r} gave no suggestion ({why}); choose one of: {', '.join(found.suggestions)}"
            )
        base_lr, max_lr = bounds(found.suggestions, rule, node.div, node.scale)
        return {"policy.base_lr": _number(base_lr), "policy.max_lr": _number(max_lr)}

    def bisect(self, center: float) -> float:
        """Short one-cycle runs at 3x, 1x and 1/3x ``center`` (bounds of its range test); the lowest val_loss wins."""
        report = StageReport("3. Weight decay: bisection with short one-cycle runs")
        self.reports.append(report)
        why = self.skipped("bisect") or (
            "skipped: nothing to bisect around a weight decay of 0" if center == 0 else None
        )
        if why is not None:
            report.outcome = f"{why}: weight decay {center:g}"
            return center
        lrs = {} if "policy.max_lr" in self.given else self.center_bounds(center, "bisect")
        momentum = self.momentum()
        losses: dict[float, float | str] = {}
        for wd in bisection(center, self.settings.bisect.factors):
            decided = {
                **self.decided,
                "policy": self.policy(),
                "optimizer.weight_decay": _number(wd),
                **lrs,
                **momentum,
            }
            decided["trainer.epochs"] = str(self.short_epochs)
            result, run_id = self.child("bisect", f"short run wd {wd:g}", self.args(decided))
            if run_id:
                report.run_ids.append(run_id)
            losses[wd] = (
                result
                if isinstance(result, str)
                else (result.val_loss if result.val_loss is not None else "no val_loss")
            )
        decision = choose_by_val_loss(losses)
        said = ", ".join(f"{k}={v}" for k, v in lrs.items()) or "policy.* as given"
        report.rule = f"{decision.rule} ({self.short_epochs} epochs each, {said})"
        report.outcome = f"weight decay {decision.chosen:g}"
        report.rows = [{"weight decay": f"{wd:g}", "reading": decision.why[wd]} for wd in losses]
        return decision.chosen

    def momentum(self) -> dict[str, str]:
        wanted = {
            "policy.base_momentum": self.settings.momentum.base,
            "policy.max_momentum": self.settings.momentum.max,
        }
        return {key: str(value) for key, value in wanted.items() if key not in self.given}

    def policy(self) -> str:
        return self.user.get("policy", "one_cycle")

    def bounds(self, wd: float) -> dict[str, str]:
        report = StageReport("4. LR bounds at the chosen weight decay")
        self.reports.append(report)
        why = self.skipped("bounds")
        if why is not None:
            report.outcome = why
            return {}
        found = self.center_bounds(wd, "bounds")
        test = self.tests[wd]
        node = self.cfg.range_test
        report.rule = (
            f"range_test.rule {node.rule} (base_lr: the rule's, else max_lr / range_test.div {node.div:g}; "
            f"both times range_test.scale {node.scale:g})"
        )
        report.outcome = ", ".join(f"{k}={v}" for k, v in found.items())
        report.run_ids.append(test.run_id)
        report.rows = [
            {"rule": rule, "max_lr": s.max_lr, "base_lr": s.base_lr, "why": s.why}
            for rule, s in test.suggestions.items()
        ]
        return found

    def train(self, wd: float, lrs: dict[str, str]) -> tuple[list[str], Any]:
        """The full one-cycle training with everything chosen; (its overrides, its result or failure)."""
        report = StageReport("5. Full one-cycle training")
        self.reports.append(report)
        decided = {"policy": self.policy(), **self.decided, **lrs, **self.momentum()}
        if "optimizer.weight_decay" not in self.given:
            decided["optimizer.weight_decay"] = _number(wd)
        args = self.args(decided)
        why = self.skipped("train")
        if why is not None:
            report.outcome = why
            return args, None
        result, run_id = self.child("train", "final one-cycle", args)
        if run_id:
            report.run_ids.append(run_id)
        if isinstance(result, str):
            report.outcome = f"failed: {result}"
        else:
            report.outcome = f"val_acc {result.val_acc:.4f}, val_loss {result.val_loss:.4f}, {result.steps} steps"
            report.rows = [
                {
                    "run": run_id,
                    "val_acc": result.val_acc,
                    "best_val_acc": result.best_val_acc,
                    "val_loss": result.val_loss,
                    "steps": result.steps,
                }
            ]
        return args, result
