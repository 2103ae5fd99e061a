"""``python -m clrx.disciplined [overrides]``: section 5 of Smith 2018 (arXiv 1803.09820) in one command.

python -m clrx.disciplined                                   # digits, every stage (make disciplined)
python -m clrx.disciplined trainer.epochs=20 disciplined.weight_decay.grid=[1e-3,1e-4]
python -m clrx.disciplined optimizer.weight_decay=1e-4       # a given input skips its stage

The largest batch that fits, LR range tests over a weight-decay grid, the weight decay read off their
curves and bisected with short one-cycle runs, bounds at the chosen weight decay, then the full
one-cycle training: one MLflow parent run, a child per training, and a report on the parent.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from clrx.config.schema import CONF, check_added, prefer_given, register
from clrx.errors import ClrxError, ConfigError, Stopped, exit_with, one_line, user_errors

if TYPE_CHECKING:
    from clrx.training.loop import Result

PROGRAM = "clrx.disciplined"
log = logging.getLogger("clrx")


def compose_root(overrides: list[str]) -> DictConfig:
    """The run's config with the ``disciplined`` group added, as ``python -m clrx`` composes the rest."""
    register()
    check_added(overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+disciplined=default", *overrides])
    prefer_given(cfg, overrides)
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Refuse settings the stages cannot use, naming them, before any work starts."""
    from clrx.disciplined.procedure import STAGES

    settings = cfg.disciplined
    unknown = [stage for stage in settings.stages if stage not in STAGES]
    if unknown:
        raise ConfigError("disciplined.stages", f"{unknown[0]!r} is no stage; choose from {', '.join(STAGES)}")
    if not cfg.policy._target_.endswith(".OneCycle"):
        raise ConfigError("policy", "the disciplined approach trains one cycle: policy=one_cycle (or fit_one_cycle)")
    grid = list(settings.weight_decay.grid)
    if not grid or any(not isinstance(wd, (int, float)) or isinstance(wd, bool) or wd < 0 for wd in grid):
        raise ConfigError("disciplined.weight_decay.grid", f"must be a list of weight decays >= 0, got {grid}")
    positive = {
        "weight_decay.range_test_share": settings.weight_decay.range_test_share,
        "bisect.share": settings.bisect.share,
        "batch.min_steps_per_epoch": settings.batch.min_steps_per_epoch,
        **{f"bisect.factors[{i}]": factor for i, factor in enumerate(settings.bisect.factors)},
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"disciplined.{key}", f"must be positive, got {value}")
    if settings.weight_decay.range_test_mode not in ("linear", "exp"):
        mode = settings.weight_decay.range_test_mode
        raise ConfigError("disciplined.weight_decay.range_test_mode", f"must be linear or exp, got {mode!r}")
    if settings.weight_decay.min_range_test_steps < 5:
        raise ConfigError("disciplined.weight_decay.min_range_test_steps", "must be at least 5 (a curve to read)")
    if settings.weight_decay.tolerance < 0 or settings.weight_decay.stable_factor <= 1:
        raise ConfigError("disciplined.weight_decay", "tolerance must be >= 0 and stable_factor > 1")


class Failed(ClrxError):
    """The procedure could not finish: no candidate was left at a stage, or the final training failed."""


def run(overrides: list[str], parent_tags: dict[str, str] | None = None) -> Result | None:
    """Every stage under one parent run (tagged ``parent_tags`` too); the final training's result (None where
    it is not among the stages). The parent ends FINISHED, or FAILED with the one-line reason, raised as ``Failed``."""
    from clrx.disciplined import report
    from clrx.disciplined.procedure import Procedure
    from clrx.disciplined.rules import NoCandidate
    from clrx.tracking.provenance import context_tags
    from clrx.tracking.store import default_uri, experiment_id, flatten, open_store

    cfg = compose_root(overrides)
    out = Path(cfg.disciplined.out or Path("outputs/disciplined") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S.%f"))
    client = open_store(cfg.tracking.uri or default_uri())
    tags = {"clrx.overrides": " ".join(overrides), "clrx.output_dir": str(out.resolve()), **(parent_tags or {})}
    name = tags.pop("mlflow.runName", "disciplined")
    parent = client.create_run(experiment_id(client, cfg.tracking.experiment), run_name=name, tags=context_tags(tags))
    parent = parent.info.run_id
    print(f"disciplined approach: MLflow parent run {parent} at {client.tracking_uri}; folder {out}", flush=True)
    procedure = Procedure(cfg, overrides, client, parent, out)
    try:
        for key, value in flatten(OmegaConf.to_container(cfg.disciplined, resolve=True), "disciplined.").items():
            client.log_param(parent, key, value)
        procedure.batch()
        _said(procedure)
        budget = procedure.budget()
        lines = budget.lines()
        print("budget estimate, before any training (optimizer steps, at most):\n" + "\n".join(lines), flush=True)
        wd = procedure.weight_decay()
        _said(procedure)
        wd = procedure.bisect(wd)
        _said(procedure)
        lrs = procedure.bounds(wd)
        _said(procedure)
        args, result = procedure.train(wd, lrs)
        _said(procedure)
        last = report.command(args)
        text = report.write(client, parent, procedure.reports, lines, last, out)
        client.set_tag(parent, "clrx.disciplined.command", last)
        if isinstance(result, str):
            raise Failed(f"the final training failed: {result}")
    except (NoCandidate, Failed) as error:
        _fail(client, parent, str(error))
        raise Failed(str(error)) from None
    except (KeyboardInterrupt, Stopped) as stopped:
        _fail(client, parent, str(stopped) or "interrupted", "KILLED")
        raise
    except BaseException as error:
        _fail(client, parent, one_line(error) if isinstance(error, ClrxError) else f"{type(error).__name__}: {error}")
        raise
    client.set_terminated(parent, "FINISHED")
    print("\n" + text)
    print(f"report: {out / report.NAME} (also report/ on MLflow run {parent})")
    return result


def _said(procedure) -> None:
    stage = procedure.reports[-1]
    print(f"{stage.title}: {stage.outcome}", flush=True)


def _fail(client, parent: str, reason: str, status: str = "FAILED") -> None:
    from clrx.tracking.store import PARAM_VALUE_LIMIT

    client.set_tag(parent, "clrx.failure", reason[:PARAM_VALUE_LIMIT])
    client.set_terminated(parent, status)


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(__doc__)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    if not log.handlers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    with user_errors(PROGRAM):  # a config error exits 2; a procedure that ran and failed, 1
        try:
            run(overrides)
        except Failed as failed:
            exit_with(PROGRAM, str(failed), 1)


if __name__ == "__main__":
    main()
