"""Input-pipeline throughput next to the training step rate: can data loading keep up?

    python -m clrx.studies.throughput                                   # make bench-data
    python -m clrx.studies.throughput model=cifar_resnet18 trainer.batch_size=256 --folder /data/imagenette2-320

Two pipelines, each timed alone and against the configured model's training step at the same
image size: CIFAR-sized images held in memory and augmented in batches on the device, and an
image folder decoded by DataLoader workers (generated JPEGs unless ``--folder`` names a tree).
Prints a table and writes ``throughput.json``. Figures, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clrx.config.build import build_optimizer, instantiate
from clrx.config.schema import compose_run
from clrx.data.augment import Pipeline
from clrx.data.datasets import CIFAR10_MEAN, CIFAR10_STD, imagefolder
from clrx.data.splits import Splits, TensorImages
from clrx.errors import user_errors
from clrx.studies.bench import autocast_dtype, device_for, synchronize


def in_memory(count: int = 50_000, size: int = 32) -> Splits:
    """CIFAR-sized random uint8 images with CIFAR's augmentation and normalization."""
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    part = TensorImages(images, torch.randint(10, (count,)))
    pipeline = Pipeline(4, True, CIFAR10_MEAN, CIFAR10_STD)
    return Splits("in-memory", part, part, 10, 3, pipeline)


def generated_folder(root: Path, classes: int = 4, per_class: int = 128, size: int = 160) -> Path:
    rng = np.random.default_rng(0)
    for split, label in itertools.product(("train", "val"), range(classes)):
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class if split == "train" else 1):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.jpg")
    return root


def loading_rate(data: Splits, batch_size: int, device: torch.device, batches: int) -> float:
    """Images per second delivered to the device, augmented, over ``batches`` batches (after one warm-up)."""
    loader = data.loader(data.train, batch_size, train=True)
    stream = itertools.cycle(loader)
    data.pipeline(next(stream)[0].to(device), train=True)
    synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(stream)
        data.pipeline(images.to(device, non_blocking=True), train=True)
    synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def training_rate(cfg, size: int, batch_size: int, device: torch.device, steps: int) -> float:
    """Images per second the configured model trains on at ``size`` x ``size``, data already on the device."""
    model = instantiate(cfg.model, "model", num_classes=10, in_chans=3).to(device).train()
    optimizer = build_optimizer(cfg.optimizer, model, lr=1e-3)
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(10, (batch_size,), device=device)
    dtype = autocast_dtype(cfg)
    for step in range(steps + 2):
        if step == 2:  # after warm-up
            synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clrx.studies.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m clrx")
    parser.add_argument("--folder", type=Path, help="an image folder tree (train/<class>/...) instead of generated")
    parser.add_argument("--image-size", type=int, default=128, help="crop size for the image folder")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("throughput.json"))
    args = parser.parse_args(argv)
    with user_errors("clrx.studies.throughput"):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    cfg = compose_run("trainer.progress=false", *args.overrides)
    device, batch = device_for(cfg), cfg.trainer.batch_size
    root = args.folder or generated_folder(Path(tempfile.mkdtemp(prefix="clrx-folder-")))
    folder = imagefolder(str(root), image_size=args.image_size)
    rows = []
    for name, data, size in (
        ("in memory, 32x32", in_memory(), 32),
        (f"image folder, {args.image_size}px", folder, args.image_size),
    ):
        loading = loading_rate(data, batch, device, args.batches)
        training = training_rate(cfg, size, batch, device, args.batches)
        rows.append(
            {
                "pipeline": name,
                "workers": data.num_workers,
                "loading_images_per_s": round(loading),
                "training_images_per_s": round(training),
                "keeps_up": loading >= training,
            }
        )
    report = {"device": str(device), "model": cfg.model.name, "batch_size": batch, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"device {device}, model {cfg.model.name}, batch {batch}")
    print(f"{'pipeline':<26}{'workers':>8}{'loading img/s':>15}{'training img/s':>16}  keeps up")
    for row in rows:
        print(
            f"{row['pipeline']:<26}{row['workers']:>8}{row['loading_images_per_s']:>15}"
            f"{row['training_images_per_s']:>16}  {'yes' if row['keeps_up'] else 'NO'}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
