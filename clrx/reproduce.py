"""The papers' claims at small scale, with clrx itself: one MLflow parent run, a child per training.

    python -m clrx.reproduce                          # digits, 3 seeds (make reproduce)
    python -m clrx.reproduce --seeds 5 dataset=fake   # more seeds, other data: any override

Three studies, every number a mean and standard deviation over seeds:
1. Table 1 of arXiv 1506.01186: fixed LR vs triangular2 vs exp_range vs one_cycle at the full and
   at half the budget; final accuracy, and the optimizer steps each needs to first reach the
   fixed policy's mean final accuracy (full budget), averaged over the seeds that reach it.
2. The range test's bounds vs a grid of hand-picked ones, for one-cycle.
3. Weight decay (1e-3, 1e-4, 1e-5, 0) with one-cycle and automatic bounds (arXiv 1803.09820).
Writes ``reproduce.md`` and ``reproduce.png`` to ``--out`` and attaches them to the parent run.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from clrx.config import compose_run
from clrx.report import markdown
from clrx.tracking import default_uri, experiment_id, open_store
from clrx.train import train

AUTO = ["policy.base_lr=auto", "policy.max_lr=auto"]
POLICIES = {
    "fixed": ["policy=fixed", "policy.lr=auto.max_lr"],
    "triangular2": ["policy=triangular2", *AUTO],
    "exp_range": ["policy=exp_range", *AUTO],
    "one_cycle": ["policy=one_cycle", *AUTO],
}
HAND_PICKED = (0.1, 0.3, 1.0, 3.0)  # one-cycle max_lr, base_lr a tenth of it
WEIGHT_DECAYS = ("1e-3", "1e-4", "1e-5", "0")


class Study:
    """Runs trainings as children of one parent run and keeps their results by name and seed."""

    def __init__(self, client: MlflowClient, parent: str, base: list[str], seeds: int, out: Path) -> None:
        self.client, self.parent, self.base, self.seeds, self.out = client, parent, base, seeds, out
        self.jobs = 0

    def run(self, name: str, overrides: Iterable[str]) -> list[dict[str, object]]:
        results = []
        for seed in range(self.seeds):
            job_overrides = [*self.base, *overrides, f"trainer.seed={seed}"]
            cfg = compose_run(*job_overrides)
            tags = {
                "mlflow.parentRunId": self.parent,
                "mlflow.runName": f"{name} seed {seed}",
                "clrx.job": str(self.jobs),
                "clrx.overrides": " ".join(job_overrides),
            }
            self.jobs += 1
            result = train(cfg, self.out / "runs" / f"{self.jobs:03d}", tags)
            history = self.client.get_metric_history(result.run_id, "val_acc")
            results.append({"acc": result.val_acc, "curve": sorted((m.step, m.value) for m in history)})
        return results


def _mean_sd(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def _steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value >= target), None)


def table_one(study: Study, epochs: int) -> tuple[list[dict[str, object]], dict[str, list[dict[str, object]]]]:
    runs = {
        (name, budget): study.run(f"{name} {budget} epochs", [*overrides, f"trainer.epochs={budget}"])
        for budget in (epochs, max(1, epochs // 2))
        for name, overrides in POLICIES.items()
    }
    target = statistics.mean(r["acc"] for r in runs[("fixed", epochs)])
    rows = []
    for (name, budget), results in runs.items():
        reached = [steps for r in results if (steps := _steps_to_reach(r["curve"], target)) is not None]
        mean_steps = f"{statistics.mean(reached):.0f} " if reached else ""
        rows.append(
            {
                "policy": name,
                "epochs": budget,
                "val_acc (mean ± sd)": _mean_sd([r["acc"] for r in results]),
                "steps to fixed's final acc": f"{mean_steps}({len(reached)}/{len(results)} seeds reached it)",
            }
        )
    return rows, {name: runs[(name, epochs)] for name in POLICIES}


def hand_picked(study: Study, epochs: int) -> list[dict[str, object]]:
    rows = []
    for label, overrides in [("range test (auto)", AUTO)] + [
        (f"hand-picked {top:g}", [f"policy.max_lr={top}", f"policy.base_lr={top / 10}"]) for top in HAND_PICKED
    ]:
        results = study.run(f"one_cycle {label}", ["policy=one_cycle", *overrides, f"trainer.epochs={epochs}"])
        rows.append({"one_cycle bounds": label, "val_acc (mean ± sd)": _mean_sd([r["acc"] for r in results])})
    return rows


def weight_decay(study: Study, epochs: int) -> list[dict[str, object]]:
    rows = []
    for decay in WEIGHT_DECAYS:
        results = study.run(
            f"one_cycle wd {decay}",
            ["policy=one_cycle", *AUTO, f"optimizer.weight_decay={decay}", f"trainer.epochs={epochs}"],
        )
        rows.append({"weight decay": decay, "val_acc (mean ± sd)": _mean_sd([r["acc"] for r in results])})
    return rows


def curves_figure(curves: dict[str, list[dict[str, object]]]) -> Figure:
    """Validation accuracy against the step for each policy, seed 0, full budget."""
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.subplots()
    for name, results in curves.items():
        steps, values = zip(*results[0]["curve"], strict=True)
        ax.plot(steps, values, marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clrx.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, as for python -m clrx")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="the full budget; the reduced one is half")
    parser.add_argument("--out", type=Path, default=Path("reproduce"))
    args = parser.parse_args(argv)
    base = ["trainer.progress=false", "trainer.save_model=false", *args.overrides]
    cfg = compose_run(*base)
    client = open_store(cfg.tracking.uri or default_uri())
    parent = client.create_run(
        experiment_id(client, cfg.tracking.experiment), run_name="reproduce", tags={"clrx.overrides": " ".join(base)}
    ).info.run_id
    study = Study(client, parent, base, args.seeds, args.out)
    try:
        table, curves = table_one(study, args.epochs)
        sections = [
            ("Fixed vs cyclical policies (arXiv 1506.01186, Table 1)", table),
            ("Range-test bounds vs hand-picked bounds, one-cycle", hand_picked(study, args.epochs)),
            ("Weight decay with one-cycle (arXiv 1803.09820)", weight_decay(study, args.epochs)),
        ]
    except BaseException as error:
        client.set_tag(parent, "clrx.failure", f"{type(error).__name__}: {error}")
        client.set_terminated(parent, "FAILED")
        raise
    args.out.mkdir(parents=True, exist_ok=True)
    text = f"# Reproduction: {args.seeds} seeds, {args.epochs} epochs, overrides {' '.join(base)}\n"
    text += "".join(f"\n## {title}\n\n{markdown(rows)}" for title, rows in sections)
    (args.out / "reproduce.md").write_text(text)
    curves_figure(curves).savefig(args.out / "reproduce.png")
    for name in ("reproduce.md", "reproduce.png"):
        client.log_artifact(parent, str(args.out / name))
    client.set_terminated(parent, "FINISHED")
    print(text)
    print(f"written to {args.out}; MLflow parent run {parent}")


if __name__ == "__main__":
    main()
