"""Schedules side by side at one budget: one MLflow parent run, a child per schedule and seed.

    python -m clrx.studies.compare                                        # digits, 3 seeds (make compare)
    python -m clrx.studies.compare --seeds 5 trainer.epochs=4 dataset=fake # any override, for every run
    python -m clrx.studies.compare --schedules one_cycle,fixed

Every schedule trains the same optimizer steps (``trainer.epochs``) from the same seeds. The numbers
are read back from the store once all have run: mean ± sd over seeds of the final and best validation
accuracy and loss, the validation curves, and for each schedule a verdict against one-cycle by
``clrx.studies.reproduce``'s rule: better or worse where the means differ by more than one sd,
else not resolved at this many seeds. Writes ``compare.md`` and ``compare.png`` to ``--out`` and
attaches them to the parent run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from clrx.errors import user_errors
from clrx.studies.reproduce import (
    UNRESOLVED,
    Trained,
    close_to,
    last_step,
    mean_sd,
    parent_study,
    plot_mean_sd,
    publish,
)
from clrx.tracking.report import children, markdown

# One line per schedule: its overrides, on top of the command's. Each takes its preset's LRs unless the
# command sets them; the LR-free and schedule-free optimizers take their authors' starting LRs.
SCHEDULES = {
    "one_cycle": ["policy=one_cycle"],
    "triangular2": ["policy=triangular2"],
    "cosine_warmup": ["policy=cosine"],  # the preset warms up over half an epoch
    "wsd": ["policy=wsd"],
    "schedule_free": ["optimizer=schedulefree_sgd", "policy=wsd", "policy.decay_frac=0", "policy.max_lr=1.0"],
    "prodigy": ["optimizer=prodigy", "policy=fixed", "policy.lr=1.0"],
    "fixed": ["policy=fixed"],
}
REFERENCE = "one_cycle"
# Each metric compared, whether higher is better, and what a diverged seed scores: accuracy 0, as in
# reproduce (it left no usable model); a loss has no such value, so its mean and sd are over the other seeds.
METRICS = {"val_acc": (True, 0.0), "val_loss": (False, math.nan)}
JUDGED = ("final val_acc", "best val_acc")  # the measures each schedule gets a verdict on
ENTRY = "clrx.study_entry"  # the tag naming a child's schedule


def logged(client: MlflowClient, parent: str) -> dict[str, dict[str, list[Trained]]]:
    """``{"final val_acc": {schedule: [one per seed]}, "best val_acc": ..., ...}``: what the parent's
    children logged, read back from the store; each seed's curve is the metric by step."""
    found: dict[str, dict[str, list[Trained]]] = {}
    for run in children(client, parent):
        diverged = run.info.status != "FINISHED"
        for metric, (higher, failed) in METRICS.items():
            curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
            values = [value for _, value in curve]
            final = failed if diverged or not values else values[-1]
            best = failed if diverged or not values else (max if higher else min)(values)
            for kind, value in (("final", final), ("best", best)):
                entry = found.setdefault(f"{kind} {metric}", {}).setdefault(run.data.tags[ENTRY], [])
                entry.append(Trained(value, curve, diverged=diverged))
    return found


def verdict(results: list[Trained], reference: list[Trained]) -> str:
    """``better``, ``worse``, or not resolved: the means within one sd (the larger) of each other."""
    if not close_to(results, reference):
        return "worse"
    if not close_to(reference, results):
        return "better"
    return f"{UNRESOLVED} at {len(results)} seeds"


def summary(results: list[Trained]) -> str:
    """mean ± sd over the seeds with a value, and how many diverged."""
    finished = [r for r in results if math.isfinite(r.acc)]
    if not finished:
        return f"all {len(results)} diverged"
    lost = len(results) - len(finished)
    return mean_sd(finished) + (f" ({lost} diverged)" if lost else "")


def tables(found: dict[str, dict[str, list[Trained]]]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(each schedule's verdicts against the reference, mean ± sd of every measure by schedule)."""
    schedules = list(found[JUDGED[0]])
    verdicts = []
    for name in schedules:
        if name == REFERENCE:
            continue
        row: dict[str, object] = {"schedule": name}
        for measure in JUDGED:
            ours, reference = found[measure][name], found[measure][REFERENCE]
            row |= {measure: mean_sd(ours), f"{REFERENCE} {measure}": mean_sd(reference)}
            row[f"{measure.split()[0]}: verdict"] = verdict(ours, reference)
        verdicts.append(row)
    table = [
        {"schedule": name, "steps": last_step(found[JUDGED[0]][name])}
        | {measure: summary(by_schedule[name]) for measure, by_schedule in found.items()}
        for name in schedules
    ]
    return verdicts, table


def figure(found: dict[str, dict[str, list[Trained]]]) -> Figure:
    """Validation accuracy and loss by step, mean ± sd over seeds, one line per schedule."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), METRICS, strict=True):
        plot_mean_sd(ax, found[f"final {metric}"])
        scale = "linear" if METRICS[metric][0] else "log"  # a loss spans decades early in a run
        ax.set(xlabel="optimizer step", ylabel=metric, yscale=scale, title=f"{metric} (mean ± sd over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def compare(args: argparse.Namespace) -> None:
    """Every schedule under one parent run, which ends FAILED with the reason if one stops."""
    with parent_study("compare", args.overrides, args.seeds, args.out) as study:
        for name in args.schedules:
            study.run(name, SCHEDULES[name])
        found = logged(study.client, study.parent)
        verdicts, table = tables(found)
        text = f"# Schedules compared: {args.seeds} seeds, overrides {' '.join(study.base)}\n"
        text += f"\n## Against {REFERENCE}\n\n{markdown(verdicts)}\n## Validation, mean ± sd\n\n{markdown(table)}"
        publish(study, "compare", text, figure(found))


def _schedules(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCHEDULES]
    if unknown or REFERENCE not in names:
        problem = f"unknown {', '.join(unknown)}" if unknown else f"needs {REFERENCE}, the reference"
        raise argparse.ArgumentTypeError(f"{problem}; choose from {', '.join(SCHEDULES)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clrx.studies.compare", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, as for python -m clrx")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--schedules", type=_schedules, default=list(SCHEDULES), help="comma separated")
    parser.add_argument("--out", type=Path, default=Path("compare"))
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    with user_errors("clrx.studies.compare"):
        compare(args)


if __name__ == "__main__":
    main()
