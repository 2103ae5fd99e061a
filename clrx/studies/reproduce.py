"""The papers' claims at small scale, with clrx itself: one MLflow parent run, a child per training.

    python -m clrx.studies.reproduce                          # digits, 3 seeds (make reproduce)
    python -m clrx.studies.reproduce --seeds 5 dataset=fake   # more seeds, other data: any override

Four studies, every number a mean and standard deviation over seeds:
1. Table 1 of arXiv 1506.01186: fixed LR vs triangular2 vs exp_range vs one_cycle at the full and
   at half the budget; final accuracy, and the optimizer steps each needs to first reach the
   fixed policy's mean final accuracy (full budget), averaged over the seeds that reach it.
2. The range test's bounds vs a grid of hand-picked ones, for one-cycle.
3. Weight decay (1e-3, 1e-4, 1e-5, 0) with one-cycle and automatic bounds (arXiv 1803.09820).
4. The disciplined procedure (``python -m clrx.disciplined``) against the best cell of a hand grid of
   weight decay x one-cycle max_lr, both training for the same epochs.
Each claim is then checked against the measurements and reported as holding or not at this scale.
Writes ``reproduce.md`` and ``reproduce.png`` to ``--out`` and attaches them to the parent run.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from clrx.config.schema import compose_run
from clrx.disciplined.__main__ import Failed
from clrx.disciplined.__main__ import run as disciplined_run
from clrx.errors import TrainingDiverged, user_errors
from clrx.tracking.report import markdown
from clrx.tracking.store import default_uri, experiment_id, open_store
from clrx.training.run import train

AUTO = ["policy.base_lr=auto", "policy.max_lr=auto"]
POLICIES = {
    "fixed": ["policy=fixed", "policy.lr=auto.max_lr"],
    "triangular2": ["policy=triangular2", *AUTO],
    "exp_range": ["policy=exp_range", *AUTO],
    "one_cycle": ["policy=one_cycle", *AUTO],
}
HAND_PICKED = (0.1, 0.3, 1.0, 3.0)  # one-cycle max_lr, base_lr a tenth of it
WEIGHT_DECAYS = ("1e-3", "1e-4", "1e-5", "0")
STRONG_DECAYS = ("1e-3", "1e-4")  # what the paper expects to win on small data and shallow nets


@dataclass(frozen=True)
class Trained:
    """One seed's training: final accuracy, validation accuracy by step, its top LR (None for fixed).

    A run whose loss stopped being finite counts with accuracy 0: it left no usable model.
    """

    acc: float
    curve: list[tuple[int, float]]
    max_lr: float | None = None
    diverged: bool = False


def mean(results: list[Trained]) -> float:
    return statistics.mean(r.acc for r in results)


def spread(results: list[Trained]) -> float:
    return statistics.stdev(r.acc for r in results) if len(results) > 1 else 0.0


def mean_sd(results: list[Trained]) -> str:
    diverged = sum(r.diverged for r in results)
    return f"{mean(results):.4f} ± {spread(results):.4f}" + (f" ({diverged} diverged)" if diverged else "")


def last_step(results: list[Trained]) -> int | None:
    """The budget in optimizer steps: the last validation of any seed that got that far."""
    return max((r.curve[-1][0] for r in results if r.curve), default=None)


def steps_to_reach(results: list[Trained], target: float) -> list[int]:
    """For each seed that gets to ``target``, the first step where it does."""
    firsts = (next((step for step, value in r.curve if value >= target), None) for r in results)
    return [step for step in firsts if step is not None]


def close_to(results: list[Trained], best: list[Trained]) -> bool:
    """At most one standard deviation (the larger of the two) below ``best``."""
    return mean(results) >= mean(best) - max(spread(results), spread(best))


def top_lr(results: list[Trained]) -> float:
    return statistics.mean(r.max_lr for r in results)


class Study:
    """Runs trainings as children of one parent run and keeps their results by name and seed."""

    def __init__(self, client: MlflowClient, parent: str, base: list[str], seeds: int, out: Path) -> None:
        self.client, self.parent, self.base, self.seeds, self.out = client, parent, base, seeds, out
        self.jobs = 0

    def run(self, name: str, overrides: Iterable[str]) -> list[Trained]:
        results = []
        for seed in range(self.seeds):
            job_overrides = [*self.base, *overrides, f"trainer.seed={seed}"]
            cfg = compose_run(*job_overrides)
            tags = {
                "mlflow.parentRunId": self.parent,
                "mlflow.runName": f"{name} seed {seed}",
                "clrx.study_entry": name,
                "clrx.job": str(self.jobs),
                "clrx.overrides": " ".join(job_overrides),
            }
            self.jobs += 1
            try:
                result = train(cfg, self.out / "runs" / f"{self.jobs:03d}", tags)
                run_id, acc, diverged = result.run_id, result.val_acc, False
            except TrainingDiverged as error:  # a result, not a reason to stop: too high an LR does this
                run_id, acc, diverged = error.run_id, 0.0, True
            history = self.client.get_metric_history(run_id, "val_acc")
            top = self.client.get_run(run_id).data.tags.get("clrx.auto.max_lr", cfg.policy.get("max_lr"))
            curve = sorted((m.step, m.value) for m in history)
            results.append(Trained(acc, curve, None if top is None else float(top), diverged))
        return results

    def disciplined(self, epochs: int) -> list[Trained]:
        """The disciplined procedure once a seed, its parent a child of the study's; its final training's result."""
        results = []
        for seed in range(self.seeds):
            self.jobs += 1
            folder = self.out / "runs" / f"{self.jobs:03d}-disciplined"
            overrides = [*self.base, f"trainer.epochs={epochs}", f"trainer.seed={seed}", f"disciplined.out={folder}"]
            tags = {"mlflow.parentRunId": self.parent, "mlflow.runName": f"disciplined seed {seed}"}
            try:
                result = disciplined_run(overrides, tags | {"clrx.job": str(self.jobs)})
            except Failed:  # no candidate left, or the final training diverged: a result, as for any training
                results.append(Trained(0.0, [], None, diverged=True))
                continue
            history = self.client.get_metric_history(result.run_id, "val_acc")
            top = float(self.client.get_run(result.run_id).data.params["policy.max_lr"])
            results.append(Trained(result.val_acc, sorted((m.step, m.value) for m in history), top))
        return results


def table_one(
    study: Study, epochs: int
) -> tuple[list[dict[str, object]], dict[tuple[str, int], list[Trained]], dict[str, list[Trained]]]:
    runs = {
        (name, budget): study.run(f"{name} {budget} epochs", [*overrides, f"trainer.epochs={budget}"])
        for budget in (epochs, epochs // 2)
        for name, overrides in POLICIES.items()
    }
    target = mean(runs[("fixed", epochs)])
    rows = []
    for (name, budget), results in runs.items():
        reached = steps_to_reach(results, target)
        mean_steps = f"{statistics.mean(reached):.0f} " if reached else ""
        rows.append(
            {
                "policy": name,
                "epochs": budget,
                "steps": last_step(results),
                "val_acc (mean ± sd)": mean_sd(results),
                "steps to fixed's final acc": f"{mean_steps}({len(reached)}/{len(results)} seeds reached it)",
            }
        )
    return rows, runs, {name: runs[(name, epochs)] for name in POLICIES}


def hand_picked(
    study: Study, epochs: int, tops: Iterable[float]
) -> tuple[list[dict[str, object]], dict[str, list[Trained]]]:
    found = {
        label: study.run(f"one_cycle {label}", ["policy=one_cycle", *overrides, f"trainer.epochs={epochs}"])
        for label, overrides in [("range test (auto)", AUTO)]
        + [(f"hand-picked {top:g}", [f"policy.max_lr={top}", f"policy.base_lr={top / 10}"]) for top in tops]
    }
    rows = [
        {
            "one_cycle bounds": label,
            "max_lr (mean)": f"{top_lr(results):.3g}",
            "val_acc (mean ± sd)": mean_sd(results),
        }
        for label, results in found.items()
    ]
    return rows, found


def weight_decay(study: Study, epochs: int) -> tuple[list[dict[str, object]], dict[str, list[Trained]]]:
    found = {
        decay: study.run(
            f"one_cycle wd {decay}",
            ["policy=one_cycle", *AUTO, f"optimizer.weight_decay={decay}", f"trainer.epochs={epochs}"],
        )
        for decay in WEIGHT_DECAYS
    }
    return [{"weight decay": decay, "val_acc (mean ± sd)": mean_sd(r)} for decay, r in found.items()], found


def procedure_vs_grid(
    study: Study, epochs: int, tops: Iterable[float]
) -> tuple[list[dict[str, object]], dict[str, list[Trained]]]:
    """The disciplined procedure, and one-cycle at every weight decay x max_lr (base_lr a tenth), for ``epochs``."""
    found = {"disciplined procedure": study.disciplined(epochs)}
    for decay in WEIGHT_DECAYS:
        for top in tops:
            overrides = ["policy=one_cycle", f"optimizer.weight_decay={decay}", f"trainer.epochs={epochs}"]
            overrides += [f"policy.max_lr={top}", f"policy.base_lr={top / 10}"]
            found[f"wd {decay}, max_lr {top:g}"] = study.run(f"grid wd {decay} max_lr {top:g}", overrides)
    rows = [
        {
            "one_cycle": label,
            "max_lr (mean)": f"{top_lr(r):.3g}" if all(t.max_lr for t in r) else "",
            "val_acc (mean ± sd)": mean_sd(r),
        }
        for label, r in found.items()
    ]
    return rows, found


UNRESOLVED = "not resolved: within one sd"


def _verdict(holds: bool) -> str:
    return "holds" if holds else "does not hold here"


def claims(
    table: dict[tuple[str, int], list[Trained]],
    epochs: int,
    bounds: dict[str, list[Trained]],
    decays: dict[str, list[Trained]],
) -> list[dict[str, object]]:
    """Each paper claim checked against the measurements: what was claimed, what was measured, the verdict."""
    fixed = table[("fixed", epochs)]
    target, budget = mean(fixed), last_step(fixed)
    half = epochs // 2
    rows = []
    for name in POLICIES:
        if name == "fixed":
            continue
        full = table[(name, epochs)]
        reached = steps_to_reach(full, target)
        early = len(reached) == len(full) and statistics.mean(reached) < budget
        first = f"mean step {statistics.mean(reached):.0f} of {budget}" if reached else "never"
        rows.append(
            {
                "claim": f"{name} reaches fixed's final accuracy in fewer steps",
                "measured": f"fixed {target:.4f} reached by {len(reached)}/{len(full)} seeds, {first}",
                "verdict": _verdict(early),
            }
        )
        short = table[(name, half)]
        rows.append(
            {
                "claim": f"{name} at half the budget matches fixed at the full budget",
                "measured": f"{mean_sd(short)} vs {mean_sd(fixed)}",
                "verdict": _verdict(mean(short) >= target),
            }
        )
    auto, *picked = bounds.items()
    best_label, best = max(picked, key=lambda item: mean(item[1]))
    rows.append(
        {
            "claim": "the range test's bounds are as good as the best hand-picked ones (within one sd)",
            "measured": f"auto {mean_sd(auto[1])} vs {best_label} {mean_sd(best)}",
            "verdict": _verdict(close_to(auto[1], best)),
        }
    )
    best_decay = max(decays, key=lambda decay: mean(decays[decay]))
    strong = max(STRONG_DECAYS, key=lambda decay: mean(decays[decay]))
    rows.append(
        {
            "claim": f"on small data more weight decay ({' or '.join(STRONG_DECAYS)}) is best",
            "measured": f"best {best_decay}: {mean_sd(decays[best_decay])}; {strong}: {mean_sd(decays[strong])}",
            "verdict": UNRESOLVED
            if best_decay != strong and close_to(decays[strong], decays[best_decay])
            else _verdict(best_decay == strong),
        }
    )
    return rows


def procedure_claim(found: dict[str, list[Trained]]) -> dict[str, object]:
    """The disciplined procedure against the best cell of the hand grid: as good (holds), worse by more than one sd
    (does not hold), or better by more than one sd than the grid's best (holds, and said)."""
    (label, procedure), *grid = found.items()
    best_label, best = max(grid, key=lambda item: mean(item[1]))
    return {
        "claim": "the disciplined procedure is as good as the best of a hand grid (weight decay x max_lr)",
        "measured": f"procedure {mean_sd(procedure)} vs best of {len(grid)}, {best_label}: {mean_sd(best)}",
        "verdict": _verdict(close_to(procedure, best)),
    }


def plot_mean_sd(ax: Axes, curves: dict[str, list[Trained]]) -> None:
    """Each name's curve by step, the mean over its seeds that finished, a band of one sd around it."""
    for name, results in curves.items():
        finished = [r for r in results if not r.diverged and r.curve]
        if not finished:
            continue
        steps = [step for step, _ in finished[0].curve]
        values = numpy.array([[value for _, value in r.curve] for r in finished])
        means, sds = values.mean(axis=0), values.std(axis=0, ddof=1 if len(finished) > 1 else 0)
        ax.plot(steps, means, marker="o", label=name)
        ax.fill_between(steps, means - sds, means + sds, alpha=0.2)


def figure(
    curves: dict[str, list[Trained]], bounds: dict[str, list[Trained]], decays: dict[str, list[Trained]]
) -> Figure:
    """Three panels: accuracy by step per policy, accuracy against one-cycle's max_lr, against weight decay."""
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    by_step, by_lr, by_decay = fig.subplots(1, 3)
    plot_mean_sd(by_step, curves)
    by_step.set(xlabel="optimizer step", ylabel="validation accuracy", title="policies (mean ± sd over seeds)")
    (auto_label, auto), *picked = bounds.items()
    tops = [top_lr(results) for _, results in picked]
    by_lr.errorbar(tops, [mean(r) for _, r in picked], [spread(r) for _, r in picked], marker="o", label="hand-picked")
    by_lr.errorbar([top_lr(auto)], [mean(auto)], [spread(auto)], marker="*", markersize=14, ls="", label=auto_label)
    by_lr.set(xscale="log", xlabel="one-cycle max_lr", ylabel="validation accuracy", title="bounds")
    labels = list(decays)
    by_decay.errorbar(labels, [mean(r) for r in decays.values()], [spread(r) for r in decays.values()], marker="o")
    by_decay.set(xlabel="weight decay", ylabel="validation accuracy", title="weight decay, one-cycle")
    for ax in (by_step, by_lr, by_decay):
        ax.grid(alpha=0.3)
    by_step.legend()
    by_lr.legend()
    return fig


def _lrs(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,0.3,1; got {text!r}") from None


@contextmanager
def parent_study(name: str, overrides: list[str], seeds: int, out: Path) -> Iterator[Study]:
    """A study whose runs are children of a new parent run ``name``; the parent ends FAILED, the reason
    tagged, if the body raises (``publish`` ends it FINISHED)."""
    base = ["trainer.progress=false", "trainer.save_model=false", *overrides]
    cfg = compose_run(*base)
    client = open_store(cfg.tracking.uri or default_uri())
    parent = client.create_run(
        experiment_id(client, cfg.tracking.experiment), run_name=name, tags={"clrx.overrides": " ".join(base)}
    ).info.run_id
    try:
        yield Study(client, parent, base, seeds, out)
    except BaseException as error:
        client.set_tag(parent, "clrx.failure", f"{type(error).__name__}: {error}")
        client.set_terminated(parent, "FAILED")
        raise


def publish(study: Study, stem: str, text: str, fig: Figure) -> None:
    """``<stem>.md`` and ``<stem>.png`` in the study's folder and on its parent run, which ends FINISHED."""
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / f"{stem}.md").write_text(text)
    fig.savefig(study.out / f"{stem}.png")
    for name in (f"{stem}.md", f"{stem}.png"):
        study.client.log_artifact(study.parent, str(study.out / name))
    study.client.set_terminated(study.parent, "FINISHED")
    print(text)
    print(f"written to {study.out}; MLflow parent run {study.parent}")


def reproduce(args: argparse.Namespace) -> None:
    """Every study under one parent run; the parent ends FAILED with the reason if one stops."""
    with parent_study("reproduce", args.overrides, args.seeds, args.out) as study:
        table, runs, curves = table_one(study, args.epochs)
        bound_rows, bounds = hand_picked(study, args.epochs, args.max_lrs)
        decay_rows, decays = weight_decay(study, args.epochs)
        procedure_rows, procedure = procedure_vs_grid(study, args.epochs, args.max_lrs)
        sections = [
            ("Claims checked at this scale", [*claims(runs, args.epochs, bounds, decays), procedure_claim(procedure)]),
            ("Fixed vs cyclical policies (arXiv 1506.01186, Table 1)", table),
            ("Range-test bounds vs hand-picked bounds, one-cycle", bound_rows),
            ("Weight decay with one-cycle (arXiv 1803.09820)", decay_rows),
            ("The disciplined procedure vs a hand grid of weight decay x max_lr, one-cycle", procedure_rows),
        ]
        text = f"# Reproduction: {args.seeds} seeds, {args.epochs} epochs, overrides {' '.join(study.base)}\n"
        text += "".join(f"\n## {title}\n\n{markdown(rows)}" for title, rows in sections)
        publish(study, "reproduce", text, figure(curves, bounds, decays))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clrx.studies.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, as for python -m clrx")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="the full budget; the reduced one is half")
    parser.add_argument(
        "--max-lrs",
        type=_lrs,
        default=list(HAND_PICKED),
        help="hand-picked one-cycle max_lr values, comma separated (base_lr a tenth of each)",
    )
    parser.add_argument("--out", type=Path, default=Path("reproduce"))
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the reduced budget is half of it), got {args.epochs}")
    with user_errors("clrx.studies.reproduce"):
        reproduce(args)


if __name__ == "__main__":
    main()
