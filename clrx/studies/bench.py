"""Speed benchmark: clrx's training step against a hand-written PyTorch loop, side by side.

    python -m clrx.studies.bench                                   # test_resnet on digits (make bench)
    python -m clrx.studies.bench model.name=resnet18 dataset=fake trainer.batch_size=128 trainer.precision=bf16

The reference is ``clrx.studies.hand_loop``: the same model, data, augmentation, optimizer and
one-cycle schedule written in plain PyTorch, with no clrx code on its path. Per step, blocks of
steps of each are timed in turn in one process, so drifts of the machine hit both alike; the same
with a model that computes next to nothing gives clrx's host overhead per step; whole runs of each
(all epochs, evaluation, defaults) are timed from command to exit. Ratios are medians of pairs with
95% bootstrap intervals. Prints a table and writes ``bench.json`` (``--out`` to change). Figures, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric
from omegaconf import DictConfig

from clrx.config.build import build_policy
from clrx.config.schema import compose_run
from clrx.errors import user_errors
from clrx.studies.hand_loop import hand_loop
from clrx.tracking.service import StoreProcess
from clrx.tracking.store import METRICS_PER_BATCH, check_experiment, open_store
from clrx.training.recorder import Recorder
from clrx.training.session import prepare


def device_for(cfg: DictConfig) -> torch.device:
    """The device clrx's loop would train on for ``trainer.device``."""
    return torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")


def autocast_dtype(cfg: DictConfig) -> torch.dtype | None:
    """The autocast type of ``trainer.precision``; None for full precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.trainer.precision)


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer reads what was done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tiny_model(num_classes: int, in_chans: int, **_: Any) -> torch.nn.Module:
    """A model whose compute is negligible: what is left of a step is the loop's own host time."""
    nn = torch.nn
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_chans, num_classes))


def _timed(run: Callable[[int], None], steps: int) -> float:
    synchronize()
    start = time.perf_counter()
    run(steps)
    synchronize()
    return (time.perf_counter() - start) / steps * 1000


def median_interval(values: list[float], resamples: int = 2000) -> list[float]:
    """A 95% bootstrap interval for the median: how far the measured ratio can be trusted."""
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


@contextmanager
def _run_in_store_process(uri: str, name: str) -> Iterator[Any]:
    """A run written by a store process, as ``python -m clrx`` writes one; the process is up before the
    run starts, as a run's is by its first step."""
    store = StoreProcess(uri, 20, prepare_model=False)
    try:
        store.ask(check_experiment, "bench")
        with store.run("bench", name, {}) as tracker:
            yield tracker
    finally:
        store.close()


def _logging_cost(uri: str, steps: int) -> dict[str, float]:
    """Microseconds a step of recording lr, momentum and loss, in a loop that does nothing else.

    The training thread's wall time and CPU time for recording and handing the points to a store
    process, as ``python -m clrx`` does; then the store's own time to write a step's points, which
    the store process spends off the training process.
    """
    client = open_store(uri)
    with _run_in_store_process(uri, "logging cost") as tracker:
        recorder, loss = Recorder(tracker, "momentum", every=10), torch.tensor(0.5)
        wall, cpu = time.perf_counter(), time.thread_time()
        for step in range(steps):
            recorder.record(step, 0.1, 0.9, loss)
        recorder.drain()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        points = [Metric(key, 0.5, 0, step) for step in range(steps // 10) for key in ("lr", "momentum", "loss")]
        start = time.perf_counter()
        for first in range(0, len(points), METRICS_PER_BATCH):
            client.log_batch(tracker.run_id, metrics=points[first : first + METRICS_PER_BATCH])
        written = (time.perf_counter() - start) / (steps // 10)
    return {
        "logging_us_per_step": wall / steps * 1e6,
        "logging_cpu_us_per_step": cpu / steps * 1e6,
        "store_write_us_per_step": written * 1e6,
    }


def _per_step(cfg: DictConfig, uri: str, block: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds a step of the hand-written loop and of clrx's (MLflow logging on, to a store process as in
    ``python -m clrx``), blocks timed in turn."""
    total = block * (repeats + 1) + 1
    session = prepare(cfg)
    policy = build_policy(cfg.policy, session.steps_per_epoch, total)
    reference = hand_loop(cfg, total_steps=total)
    with _run_in_store_process(uri, "clrx loop") as tracker:
        recorder, stream, step = Recorder(tracker, session.momentum, cfg.trainer.log_every), session.batches(), 0

        def clrx_loop(steps: int) -> None:
            nonlocal step
            for _ in range(steps):
                session.policy_step(policy, step, next(stream), recorder)
                step += 1

        def hand(steps: int) -> None:
            for _ in range(steps):
                reference.step()

        loops = [("reference", hand), ("clrx", clrx_loop)]
        for _, loop in loops:  # warm-up
            _timed(loop, block)
        times: dict[str, list[float]] = {name: [] for name, _ in loops}
        for repeat in range(repeats):
            for name, loop in loops[repeat % 2 :] + loops[: repeat % 2]:  # neither always goes first
                times[name].append(_timed(loop, block))
        recorder.drain()
    return times


def paired_ratios(times: dict[str, list[float]], prefix: str) -> dict[str, Any]:
    pairs = [c / r for c, r in zip(times["clrx"], times["reference"], strict=True)]
    return {
        f"{prefix}reference_ms": statistics.median(times["reference"]),
        f"{prefix}clrx_ms": statistics.median(times["clrx"]),
        f"{prefix}ratio": statistics.median(pairs),
        f"{prefix}ratio_95ci": median_interval(pairs),
    }


def _end_to_end(base: list[str], uri: str, workdir: Path, runs: int) -> dict[str, Any]:
    """Whole runs, command to exit: ``python -m clrx`` against the hand-written run, in turn.

    Also ``python -c "import torch, timm"``, the floor of any such command's start-up (command to
    first step, which each run reports as ``startup_seconds``).
    """
    env = {**os.environ, "CI": "true"}
    client = open_store(uri)
    walls: dict[str, list[float]] = {"clrx": [], "reference": [], "import": [], "no_model": []}
    reported: dict[str, dict[str, list[float]]] = {"clrx": {}, "reference": {}}
    commands = {
        "clrx": [sys.executable, "-m", "clrx", *base],
        "reference": [sys.executable, "-m", "clrx.studies.hand_loop", *base],
        "import": [sys.executable, "-c", "import torch, timm"],
        "no_model": [sys.executable, "-m", "clrx", *base, "tracking.log_model=false"],  # what the logged model costs
    }
    for run in range(runs):
        for name in list(commands)[run % 2 :] + list(commands)[: run % 2]:
            folder = workdir / f"{name}-{run}"
            folder.mkdir()
            extra = [f"hydra.run.dir={folder}"] if name in ("clrx", "no_model") else []
            start = time.perf_counter()
            done = subprocess.run(
                [*commands[name], *extra], cwd=folder, env=env, check=True, capture_output=True, text=True
            )
            walls[name].append(time.perf_counter() - start)
            if name == "reference":
                figures = json.loads(done.stdout.splitlines()[-1])
            elif name == "clrx":
                [latest] = client.search_runs(
                    [client.get_experiment_by_name("clrx").experiment_id],
                    max_results=1,
                    order_by=["attributes.start_time DESC"],
                )
                figures = latest.data.metrics
            if name in reported:
                for key in ("train_seconds", "startup_seconds"):
                    reported[name].setdefault(key, []).append(figures[key])
    ms = {name: {key: [1000 * v for v in values] for key, values in got.items()} for name, got in reported.items()}
    return {
        **paired_ratios({name: [w * 1000 for w in walls[name]] for name in reported}, "end_to_end_"),
        **paired_ratios(
            {"clrx": [w * 1000 for w in walls["no_model"]], "reference": [w * 1000 for w in walls["reference"]]},
            "end_to_end_no_logged_model_",
        ),
        **paired_ratios({name: ms[name]["train_seconds"] for name in reported}, "train_and_eval_"),
        **paired_ratios({name: ms[name]["startup_seconds"] for name in reported}, "startup_"),
        "import_torch_timm_seconds": statistics.median(walls["import"]),
        "startup_over_import": statistics.median(
            s / i for s, i in zip(reported["clrx"]["startup_seconds"], walls["import"], strict=True)
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clrx.studies.bench", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m clrx")
    parser.add_argument("--block", type=int, default=20, help="steps timed at a time")
    parser.add_argument("--repeats", type=int, default=9, help="blocks of each loop")
    parser.add_argument("--runs", type=int, default=3, help="whole runs of each, end to end")
    parser.add_argument("--log-steps", type=int, default=20000, help="steps of the loop that only records")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args(argv)
    with user_errors("clrx.studies.bench"):
        bench(args)


def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="clrx-bench-") as workdir:  # its runs, store and data: not kept
        results = _measure(args, Path(workdir))
    args.out.write_text(json.dumps(results, indent=2))
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        if isinstance(value, list) and all(isinstance(v, float) for v in value):
            shown = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
        print(f"{key:<{width}}  {shown}")
    print(f"written to {args.out}")


def _measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    base = ["trainer.progress=false", f"tracking.uri={uri}", *args.overrides, "policy=one_cycle"]
    per_step = _per_step(compose_run(*base), uri, args.block, args.repeats)
    # The same loops around a model that computes next to nothing: the difference is clrx's host time.
    tiny = compose_run(*base, f"model._target_={__name__}.tiny_model")
    overhead = _per_step(tiny, uri, 10 * args.block, args.repeats)
    extra_us = [1000 * (c - r) for c, r in zip(overhead["clrx"], overhead["reference"], strict=True)]
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
        "overrides": base,
        "block_steps": args.block,
        "repeats": args.repeats,
        **paired_ratios(per_step, "step_"),
        "spread_ms": {name: [min(v), max(v)] for name, v in per_step.items()},
        "host_overhead_us_per_step": statistics.median(extra_us),
        "host_overhead_95ci": median_interval(extra_us),
        "tiny_model_reference_us_per_step": 1000 * statistics.median(overhead["reference"]),
        **_end_to_end(base, uri, workdir, args.runs),
        **_logging_cost(uri, args.log_steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


if __name__ == "__main__":
    main()
