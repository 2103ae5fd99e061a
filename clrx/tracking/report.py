"""A sweep's summary from MLflow: a table (seed repeats pooled) and overlay plots on the parent run.

Written at a sweep's end; ``python -m clrx.report`` rebuilds it at any time.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

from matplotlib.figure import Figure
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from clrx.config.schema import OBJECTIVES, TrackingConfig

RULES = ("paper", "steepest", "minimum/10", "valley")
SEED = re.compile(r"(^|\s)\+?trainer\.seed=\S+")  # an override choosing the seed


def children(client: MlflowClient, parent: str) -> list[Run]:
    """The sweep's job runs, in job order."""
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent}'", run_view_type=ViewType.ALL, max_results=10000
    )
    return sorted(runs, key=lambda run: int(run.data.tags.get("clrx.job", 0)))


def varying(runs: list[Run]) -> dict[str, str]:
    """Each run's overrides less those every job shares: what the sweep changed."""
    tokens = {run.info.run_id: run.data.tags.get("clrx.overrides", "").split() for run in runs}
    shared = set.intersection(*(set(t) for t in tokens.values())) if len(runs) > 1 else set()
    return {run_id: " ".join(t for t in words if t not in shared) for run_id, words in tokens.items()}


def _last(run: Run, key: str) -> float | None:
    return run.data.metrics.get(key)


def objective(runs: list[Run]) -> str:
    """The metric the sweep ranks its jobs by: their ``tracking.objective``."""
    given = (run.data.params.get("tracking.objective") for run in runs)
    return next((name for name in given if name in OBJECTIVES), TrackingConfig.objective)


def rows(runs: list[Run]) -> list[dict[str, object]]:
    """One row a job: what it swept, how it ended, and its results (best first by the objective) or suggested bounds;
    jobs that differ only by seed share one row (``pooled``)."""
    table, labels, goal = [], varying(runs), objective(runs)
    for run in runs:
        tags = run.data.tags
        row: dict[str, object] = {
            "job": int(tags.get("clrx.job", 0)),
            "swept": labels[run.info.run_id],
            "status": run.info.status,
            "policy": tags.get("clrx.policy", ""),
        }
        suggestions = {
            rule: json.loads(tags[f"clrx.suggest.{rule}"]) for rule in RULES if f"clrx.suggest.{rule}" in tags
        }
        if suggestions:
            for rule, found in suggestions.items():
                row[f"{rule} max_lr"] = found["max_lr"]
            row["paper base_lr"] = suggestions.get("paper", {}).get("base_lr")
        else:
            row.update(
                val_acc=_last(run, "val_acc"),
                best_val_acc=_last(run, "best_val_acc"),
                steps=_last(run, "steps"),
                seconds=_last(run, "train_seconds"),
            )
            row.setdefault(goal, _last(run, goal))
        if run.info.status != "FINISHED":
            row["failure"] = tags.get("clrx.failure", "")
        table.append(row)
    table = pooled(table, [run.data.params.get("trainer.seed", "") for run in runs])
    trained = [row for row in table if "best_val_acc" in row]
    if len(trained) == len(table):  # training results: best first, unfinished last
        sign = -1 if OBJECTIVES[goal] == "maximize" else 1
        table.sort(key=lambda row: (row["status"] != "FINISHED", row[goal] is None, sign * (row[goal] or 0.0)))
    return table


def pooled(table: list[dict[str, object]], seeds: list[str]) -> list[dict[str, object]]:
    """Jobs that differ only by ``trainer.seed`` as one row: each number the mean over the finished ones, with
    its sd beside it; the jobs, seeds and how many finished. Every other job keeps its row (a sweeper's repeated
    trial at the same seed too); a table without seed repeats comes back as it was."""
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(table):
        groups.setdefault(SEED.sub("", str(row["swept"])).strip(), []).append(index)

    def repeats(members: list[int]) -> bool:  # the same job at different seeds (not a sweeper's repeated trial)
        return len(members) > 1 and len({seeds[i] for i in members}) == len(members)

    if not any(map(repeats, groups.values())):
        return table
    merged = []
    for swept, members in groups.items():
        rows = [table[i] for i in members]
        if not repeats(members):  # each job keeps its own row and status
            merged.extend({**row, "seeds": seeds[i]} for i, row in zip(members, rows, strict=True))
            continue
        finished = [row for row in rows if row["status"] == "FINISHED"]
        row: dict[str, object] = {
            "job": ",".join(str(r["job"]) for r in rows),
            "swept": swept,
            "seeds": ",".join(seeds[i] for i in members),
            "status": "FINISHED" if len(finished) == len(rows) else f"{len(finished)}/{len(rows)} FINISHED",
        }
        for column in _columns(rows):
            if column in row:
                continue
            numbers = [r[column] for r in finished if isinstance(r.get(column), int | float)]
            if numbers:
                row[column] = statistics.mean(numbers)
                row[f"{column} sd"] = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
            else:
                said = dict.fromkeys(str(r[column]) for r in rows if r.get(column) not in (None, ""))
                row[column] = "; ".join(said) or None
        merged.append(row)
    return merged


def best_line(runs: list[Run], table: list[dict[str, object]]) -> str | None:
    """``best by best_val_acc (maximize): job 2, policy.max_lr=0.3 ...: 0.9861``; None where no job scored."""
    goal = objective(runs)
    scored = [row for row in table if row["status"] == "FINISHED" and row.get(goal) is not None]
    if not scored:
        return None
    best = (max if OBJECTIVES[goal] == "maximize" else min)(scored, key=lambda row: row[goal])
    swept = f", {best['swept']}" if best["swept"] else ""
    return f"best by {goal} ({OBJECTIVES[goal]}): job {best['job']}{swept}: {_cell(best[goal])}"


def _columns(table: list[dict[str, object]]) -> list[str]:
    return list(dict.fromkeys(key for row in table for key in row))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.4g}"
    return str(value)


def markdown(table: list[dict[str, object]]) -> str:
    columns = _columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def overlay(client: MlflowClient, runs: list[Run]) -> Figure:
    """Every job on one figure: loss and accuracy against the LR for range tests, else against the step."""
    range_tests = all("clrx.suggest.minimum/10" in run.data.tags for run in runs if run.info.status == "FINISHED")
    figure = Figure(figsize=(9, 7), layout="constrained")
    loss_ax, acc_ax = figure.subplots(2, 1, sharex=True)
    labels = varying(runs)
    for run in runs:
        label = labels[run.info.run_id] or run.info.run_name
        if range_tests:
            lrs = _history(client, run.info.run_id, "lr")
            for ax, key in ((loss_ax, "smoothed_loss"), (acc_ax, "batch_acc")):
                values = _history(client, run.info.run_id, key)
                steps = sorted(set(values) & set(lrs))
                ax.plot([lrs[s] for s in steps], [values[s] for s in steps], label=label)
        else:
            for ax, key in ((loss_ax, "train_loss"), (acc_ax, "val_acc")):
                values = _history(client, run.info.run_id, key)
                ax.plot(
                    sorted(values),
                    [values[s] for s in sorted(values)],
                    label=label,
                    marker="o" if key == "val_acc" else None,
                )
    loss_ax.set_ylabel("smoothed training loss" if range_tests else "training loss")
    acc_ax.set_ylabel("batch accuracy" if range_tests else "validation accuracy")
    acc_ax.set_xlabel("learning rate" if range_tests else "optimizer step")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    return figure


def report(
    client: MlflowClient, parent: str, out_dir: Path, close: bool = False
) -> tuple[list[dict[str, object]], str | None]:
    """Write the summary to ``out_dir`` and attach it to the parent run (closing it if asked).

    Returns the table and the line naming the best job (None for range tests, or where none finished).
    """
    runs = children(client, parent)
    table = rows(runs)
    best = best_line(runs, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    if table:
        with (out_dir / "summary.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=_columns(table))
            writer.writeheader()
            writer.writerows(table)
        (out_dir / "summary.md").write_text((f"{best}\n\n" if best else "") + markdown(table))
        overlay(client, runs).savefig(out_dir / "summary.png")
        for name in ("summary.csv", "summary.md", "summary.png"):
            client.log_artifact(parent, str(out_dir / name), "summary")
    if close:
        finished = any(run.info.status == "FINISHED" for run in runs)
        client.set_terminated(parent, "FINISHED" if finished else "FAILED")
    return table, best
