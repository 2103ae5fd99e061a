"""Every dataset a config can name, each a factory returning ``Splits``.

scikit-learn's digits and random ``fake`` images need no files; CIFAR-10/100, MNIST, Fashion-MNIST
and image folders are read from files in their usual formats. Nothing is downloaded unless
``download`` is set. CIFAR and MNIST are small enough to hold in memory as uint8 tensors and are
augmented in batches on the device (``clrx.data.augment``); image folders are decoded and augmented
per image in DataLoader worker processes.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torchvision import datasets
from torchvision.datasets.vision import StandardTransform

from clrx.data.augment import Pipeline
from clrx.data.splits import Splits, TensorImages, evaluation_parts, stratified_split
from clrx.errors import ConfigError, check_positive_whole

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# CIFAR's python version: folder, training files, test file, label key, meta file, names key.
CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", "batches.meta"),
    100: ("cifar-100-python", ["train"], "test", "fine_labels", "meta"),
}
CIFAR_NAMES = {10: "label_names", 100: "fine_label_names"}
MNIST = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
FOLDER_VAL = ("val", "test")


def _pipeline(normalize: bool, mean: Sequence[float], std: Sequence[float], crop_padding: int, flip: bool) -> Pipeline:
    if not isinstance(crop_padding, int) or isinstance(crop_padding, bool) or crop_padding < 0:
        raise ConfigError("crop_padding", f"must be a whole number >= 0 (0: no random crop), got {crop_padding!r}")
    if normalize and (len(mean) != len(std) or not all(s > 0 for s in std)):
        raise ConfigError("std", f"needs one positive value per mean value, got mean {list(mean)}, std {list(std)}")
    stats = (tuple(mean), tuple(std)) if normalize else (None, None)
    return Pipeline(crop_padding, bool(flip), *stats)


def _cifar(
    classes: int,
    root: str,
    download: bool,
    normalize: bool,
    mean,
    std,
    crop_padding: int,
    flip: bool,
    val_split: float | None,
    split_seed: int,
) -> Splits:
    folder, train_files, test_file, label_key, meta_file = CIFAR[classes]
    base = Path(root).expanduser().resolve() / folder
    if download:
        getattr(datasets, f"CIFAR{classes}")(root, train=True, download=True)  # fetches and verifies
    missing = [name for name in [*train_files, test_file, meta_file] if not (base / name).is_file()]
    if missing:
        raise ConfigError(
            "root",
            f"CIFAR-{classes} files {', '.join(missing)} not found in {base}; set dataset.download=true "
            f"(needs the network) or copy the extracted {folder} folder into {base.parent}",
        )

    def read(names: list[str]) -> TensorImages:
        images, labels = [], []
        for name in names:
            with open(base / name, "rb") as file:
                entry = pickle.load(file, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[label_key])
        return TensorImages(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long))

    with open(base / meta_file, "rb") as file:
        names = tuple(pickle.load(file, encoding="latin1")[CIFAR_NAMES[classes]])
    pipeline = _pipeline(normalize, mean, std, crop_padding, flip)
    train = read(train_files)
    parts = evaluation_parts(train, read([test_file]), train.labels, val_split, split_seed)
    return Splits(
        f"cifar{classes}", **parts, num_classes=classes, in_chans=3, pipeline=pipeline, classes=names, source=str(base)
    )


def cifar10(
    root: str = "data",
    download: bool = False,
    normalize: bool = True,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    crop_padding: int = 4,
    flip: bool = True,
    val_split: float | None = None,
    split_seed: int = 0,
) -> Splits:
    """CIFAR-10 from its python pickle batches in ``root/cifar-10-batches-py``.

    The test set validates, or with ``val_split`` a held-out part of the training set does.
    """
    return _cifar(10, root, download, normalize, mean, std, crop_padding, flip, val_split, split_seed)


def cifar100(
    root: str = "data",
    download: bool = False,
    normalize: bool = True,
    mean: Sequence[float] = (0.5071, 0.4865, 0.4409),
    std: Sequence[float] = (0.2673, 0.2564, 0.2762),
    crop_padding: int = 4,
    flip: bool = True,
    val_split: float | None = None,
    split_seed: int = 0,
) -> Splits:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``; validated as CIFAR-10 is."""
    return _cifar(100, root, download, normalize, mean, std, crop_padding, flip, val_split, split_seed)


def _mnist(
    kind: str,
    root: str,
    download: bool,
    normalize: bool,
    mean,
    std,
    crop_padding: int,
    flip: bool,
    val_split: float | None,
    split_seed: int,
) -> Splits:
    reader = MNIST[kind]
    raw = Path(root).expanduser().resolve() / reader.__name__ / "raw"
    try:
        train, test = (reader(root, train=part, download=download) for part in (True, False))
    except RuntimeError:
        files = ", ".join(Path(url).name.removesuffix(".gz") for url, _ in reader.resources)
        raise ConfigError(
            "root",
            f"{reader.__name__} files not found in {raw}; set dataset.download=true (needs the network) or copy "
            f"{files} there",
        ) from None
    pipeline = _pipeline(normalize, mean, std, crop_padding, flip)
    fit, held = (TensorImages(part.data.unsqueeze(1).contiguous(), part.targets.long()) for part in (train, test))
    parts = evaluation_parts(fit, held, fit.labels, val_split, split_seed)
    classes = tuple(train.classes)
    return Splits(
        kind, **parts, num_classes=len(classes), in_chans=1, pipeline=pipeline, classes=classes, source=str(raw)
    )


def mnist(
    root: str = "data",
    download: bool = False,
    normalize: bool = True,
    mean: Sequence[float] = (0.1307,),
    std: Sequence[float] = (0.3081,),
    crop_padding: int = 0,
    flip: bool = False,
    val_split: float | None = None,
    split_seed: int = 0,
) -> Splits:
    """MNIST from its idx files in ``root/MNIST/raw`` (torchvision's layout).

    The test set validates, or with ``val_split`` a held-out part of the training set does.
    """
    return _mnist("mnist", root, download, normalize, mean, std, crop_padding, flip, val_split, split_seed)


def fashion_mnist(
    root: str = "data",
    download: bool = False,
    normalize: bool = True,
    mean: Sequence[float] = (0.2860,),
    std: Sequence[float] = (0.3530,),
    crop_padding: int = 0,
    flip: bool = False,
    val_split: float | None = None,
    split_seed: int = 0,
) -> Splits:
    """Fashion-MNIST from ``root/FashionMNIST/raw``; validated as MNIST is."""
    return _mnist("fashion_mnist", root, download, normalize, mean, std, crop_padding, flip, val_split, split_seed)


def default_workers() -> int:
    """Worker processes for decoding images: the cores this process may use, up to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def imagefolder(
    root: str,
    image_size: int = 224,
    augment: bool = True,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    color_jitter: float | None = 0.4,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    model_name: str | None = None,
    num_workers: int | None = None,
    val_split: float | None = None,
    split_seed: int = 0,
) -> Splits:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test``): ImageNet, Imagenette, exported sets.

    Transforms are timm's ``create_transform``, as timm's training script builds them: for training
    a random resized crop, a flip, color jitter or ``auto_augment`` (``rand-m9-mstd0.5``,
    ``augmix-m5-w4-d2``, ``original``...) and random erasing with probability ``re_prob``
    (``augment=false``: resize and center crop only); for evaluation a resize by ``crop_pct`` and a
    center crop. ``mean``, ``std``, ``interpolation`` and ``crop_pct`` left null are the model's own
    (timm's pretrained config for ``model_name``), else ImageNet's. With ``val_split`` a held-out part
    of ``train`` validates (with the evaluation transforms) and ``val`` (if there is one) is the test set.
    """
    base = Path(root).expanduser().resolve()
    val_dir = next((base / name for name in FOLDER_VAL if (base / name).is_dir()), None)
    if not (base / "train").is_dir() or (val_dir is None and val_split is None):
        raise ConfigError(
            "root",
            f"{base} needs train/<class>/ and val/<class>/ (or test/<class>/) image folders, "
            "or train/<class>/ alone with dataset.val_split set",
        )
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ConfigError("image_size", f"must be a positive whole number, got {image_size!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ConfigError(
            "num_workers", f"must be a whole number >= 0 (null: one per core, up to 8), got {num_workers!r}"
        )
    given = {"mean": mean, "std": std, "interpolation": interpolation, "crop_pct": crop_pct}
    known = timm.models.get_pretrained_cfg(model_name) if model_name else None
    data = resolve_data_config(
        args={"input_size": (3, image_size, image_size), **{k: v for k, v in given.items() if v is not None}},
        pretrained_cfg=None if known is None else known.to_dict(),
    )
    shared = {key: data[key] for key in ("interpolation", "mean", "std", "crop_pct")} | {"normalize": normalize}
    train_steps = create_transform(
        image_size,
        is_training=True,
        no_aug=not augment,
        auto_augment=auto_augment,
        re_prob=re_prob,
        color_jitter=color_jitter,
        **shared,
    )
    evaluate = create_transform(image_size, is_training=False, **shared)
    try:
        train = datasets.ImageFolder(base / "train", train_steps)
        val = None if val_dir is None else datasets.ImageFolder(val_dir, evaluate)
    except (FileNotFoundError, RuntimeError) as error:
        raise ConfigError("root", str(error).splitlines()[0]) from None
    if val is not None and val.classes != train.classes:
        raise ConfigError("root", f"{val_dir} has classes {val.classes}, train has {train.classes}; they must match")
    labels = torch.tensor(train.targets)
    parts = evaluation_parts(train, val, labels, val_split, split_seed, evaluation=_transformed(train, evaluate))
    workers = default_workers() if num_workers is None else num_workers
    classes = tuple(train.classes)
    return Splits(
        base.name, **parts, num_classes=len(classes), in_chans=3, classes=classes, num_workers=workers, source=str(base)
    )


def _transformed(folder: datasets.ImageFolder, transform: Callable) -> datasets.ImageFolder:
    """The same images with another transform, without listing the folder again."""
    view = copy.copy(folder)
    view.transform, view.transforms = transform, StandardTransform(transform, folder.target_transform)
    return view


def digits(image_size: int = 16, val_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits, resized and standardized.

    The split is stratified and fixed by ``split_seed``; statistics come from the train part.
    """
    check_positive_whole("image_size", image_size)
    if not (isinstance(val_fraction, float) and 0 < val_fraction < 1):
        raise ConfigError("val_fraction", f"must be a number in (0, 1), got {val_fraction!r}")
    images, labels = digits_arrays()
    images = images.unsqueeze(1) / 16
    train_idx, val_idx = stratified_split(labels, val_fraction, split_seed)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    train, val = images[train_idx], images[val_idx]
    mean, std = train.mean(), train.std()
    return Splits(
        name="digits",
        train=TensorImages((train - mean) / std, labels[train_idx]),
        val=TensorImages((val - mean) / std, labels[val_idx]),
        num_classes=10,
        in_chans=1,
        source=str(digits_file()),
    )


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits' 8x8 images (values 0-16) and labels, read from the file scikit-learn ships.

    Read directly: importing scikit-learn would take seconds of a run's start-up.
    """
    data = np.loadtxt(digits_file(), delimiter=",")
    return torch.tensor(data[:, :-1], dtype=torch.float32).view(-1, 8, 8), torch.tensor(data[:, -1], dtype=torch.long)


def digits_file() -> Path:
    """The digits file scikit-learn ships, found without importing scikit-learn."""
    return Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "data" / "digits.csv.gz"


def fake(
    num_train: int = 1024,
    num_val: int = 256,
    image_size: int = 32,
    in_chans: int = 3,
    num_classes: int = 10,
    seed: int = 0,
) -> Splits:
    """Random standard-normal images with random labels, for throughput measurements."""
    for setting, value in [
        ("num_train", num_train),
        ("num_val", num_val),
        ("image_size", image_size),
        ("in_chans", in_chans),
        ("num_classes", num_classes),
    ]:
        check_positive_whole(setting, value)
    generator = torch.Generator().manual_seed(seed)

    def part(n: int) -> TensorImages:
        images = torch.randn(n, in_chans, image_size, image_size, generator=generator)
        return TensorImages(images, torch.randint(num_classes, (n,), generator=generator))

    return Splits("fake", part(num_train), part(num_val), num_classes, in_chans)
