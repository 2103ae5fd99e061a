"""Speed benchmark: clrx's training step against a hand-written PyTorch loop, side by side.

    python -m clrx.studies.bench                                   # test_resnet on digits (make bench)
    python -m clrx.studies.bench model.name=resnet18 dataset=fake trainer.batch_size=128 trainer.precision=bf16

Both loops train the same model, data, batch size and threads in one process; blocks of steps of
each are timed in turn, so drifts of the machine hit both alike. A third loop, clrx's with tracking
off, shows what MLflow costs the step. Prints a table and writes ``bench.json`` (``--out`` to
change). Figures, not a test.
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
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from mlflow.entities import Metric

from clrx.config.build import build_optimizer, build_policy, instantiate
from clrx.config.schema import compose_run
from clrx.data.splits import build_data
from clrx.errors import user_errors
from clrx.tracking.store import METRICS_PER_BATCH, Silent, open_store, tracked_run
from clrx.training.recorder import Recorder
from clrx.training.run import train
from clrx.training.session import prepare


def device_for(cfg) -> torch.device:
    """The device clrx's loop would train on for ``trainer.device``."""
    return torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")


def autocast_dtype(cfg) -> torch.dtype | None:
    """The autocast type of ``trainer.precision``; None for full precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.trainer.precision)


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer reads what was done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reference_loop(cfg, total_steps: int) -> Callable[[int], None]:
    """The hand-written loop clrx is measured against: SGD-style optimizer, torch's OneCycleLR, no tracking.

    It takes the same data, device-side augmentation and memory format as clrx's loop.
    """
    set_seed(cfg.trainer.seed)
    data = build_data(cfg.dataset)
    model = instantiate(cfg.model, "model", num_classes=data.num_classes, in_chans=data.in_chans)
    device = device_for(cfg)
    layout = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout).train()
    optimizer = build_optimizer(cfg.optimizer, model, lr=cfg.policy.base_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.policy.max_lr,
        total_steps=total_steps,
        div_factor=cfg.policy.max_lr / cfg.policy.base_lr,
        anneal_strategy="linear",
        three_phase=True,
    )
    loader = data.loader(data.train, cfg.trainer.batch_size, train=True)
    dtype = autocast_dtype(cfg)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from loader

    stream = batches()

    def run(steps: int) -> None:
        for _ in range(steps):
            images, labels = next(stream)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            images = data.pipeline(images, train=True).contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

    return run


def _timed(run: Callable[[int], None], steps: int) -> float:
    synchronize()
    start = time.perf_counter()
    run(steps)
    synchronize()
    return (time.perf_counter() - start) / steps * 1000


def _median_interval(values: list[float], resamples: int = 2000) -> list[float]:
    """A 95% bootstrap interval for the median: how far the measured ratio can be trusted."""
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def _logging_cost(uri: str, steps: int = 20000) -> dict[str, float]:
    """Microseconds a step of recording lr, momentum and loss, in a loop that does nothing else.

    The training thread's wall time (which includes waiting for the interpreter lock while the
    writer thread builds rows) and its CPU time; then the store's own time to write a step's
    points, which the writer thread spends off the training thread.
    """
    client = open_store(uri)
    with tracked_run(client, "bench", "logging cost", {}) as tracker:
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
        store = (time.perf_counter() - start) / (steps // 10)
    return {
        "logging_us_per_step": wall / steps * 1e6,
        "logging_cpu_us_per_step": cpu / steps * 1e6,
        "store_write_us_per_step": store * 1e6,
    }


def _startup_seconds(overrides: list[str], uri: str, workdir: Path) -> float:
    # ``overrides`` name the store at ``uri`` that the run's training time is read back from.
    """Command to first step: the wall time of a one-epoch run less its training time."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "clrx", *overrides, "trainer.epochs=1", "hydra.run.dir=startup"],
        cwd=workdir,
        check=True,
        capture_output=True,
        env={**os.environ, "CI": "true"},
    )
    wall = time.perf_counter() - start
    client = open_store(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("clrx").experiment_id], max_results=1, order_by=["attributes.start_time DESC"]
    )
    return wall - run.data.metrics["train_seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clrx.studies.bench", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m clrx")
    parser.add_argument("--block", type=int, default=20, help="steps timed at a time")
    parser.add_argument("--repeats", type=int, default=9, help="blocks of each loop")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args(argv)
    with user_errors("clrx.studies.bench"):
        bench(args)


def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="clrx-bench-"))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    base = ["trainer.progress=false", f"tracking.uri={uri}", *args.overrides]
    cfg = compose_run(*base, "policy=one_cycle")
    total = args.block * (args.repeats + 1) + 1

    session = prepare(cfg)
    policy = build_policy(cfg.policy, session.steps_per_epoch, 2 * total)
    reference = reference_loop(cfg, total)
    with tracked_run(open_store(uri), "bench", "clrx loop", {}) as tracker:
        stream, step = session.batches(), 0

        def clrx_loop(recorder: Recorder) -> Callable[[int], None]:
            """clrx's steps recorded by ``recorder``; both variants advance one model and one policy."""

            def run(steps: int) -> None:
                nonlocal step
                for _ in range(steps):
                    session.policy_step(policy, step, next(stream), recorder)
                    step += 1

            return run

        loops = [
            ("reference", reference),
            ("clrx", clrx_loop(Recorder(tracker, session.momentum, cfg.trainer.log_every))),
            ("untracked", clrx_loop(Recorder(Silent(), session.momentum, cfg.trainer.log_every))),
        ]
        for _, loop in loops:  # warm-up
            _timed(loop, args.block)
        times: dict[str, list[float]] = {name: [] for name, _ in loops}
        for repeat in range(args.repeats):
            for name, loop in loops[repeat % 3 :] + loops[: repeat % 3]:  # none always goes first
                times[name].append(_timed(loop, args.block))
    medians = {name: statistics.median(values) for name, values in times.items()}
    pairs = [c / r for c, r in zip(times["clrx"], times["reference"], strict=True)]
    tracking = [c / u for c, u in zip(times["clrx"], times["untracked"], strict=True)]
    range_cfg = compose_run(*base, "policy=range_test", "policy.num_iter=100")
    results = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu x{torch.get_num_threads()} threads",
        "overrides": base,
        "block_steps": args.block,
        "repeats": args.repeats,
        "reference_ms_per_step": medians["reference"],
        "clrx_ms_per_step": medians["clrx"],
        "untracked_ms_per_step": medians["untracked"],
        "ratio": medians["clrx"] / medians["reference"],
        "ratio_paired_median": statistics.median(pairs),
        "ratio_paired_95ci": _median_interval(pairs),
        "tracking_ratio_paired_median": statistics.median(tracking),
        "tracking_ratio_paired_95ci": _median_interval(tracking),
        "spread_ms": {name: [min(v), max(v)] for name, v in times.items()},
        **_logging_cost(uri),
        "range_test_seconds_100_steps": train(range_cfg, workdir / "range_test").seconds,
        "startup_seconds": _startup_seconds([*base, "trainer.save_model=false"], uri, workdir),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    args.out.write_text(json.dumps(results, indent=2))
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        if isinstance(value, list) and all(isinstance(v, float) for v in value):
            shown = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
        print(f"{key:<{width}}  {shown}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
