"""What a run trains on: a train/validation pair, and the datasets that need no files.

Datasets read from files live in ``clrx.datasets``; all of them arrive here as ``Splits``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from clrx.augment import Pipeline
from clrx.build import instantiate, settings_of
from clrx.errors import ConfigError, check_positive_whole

LIMITS = ("limit_train", "limit_val")  # any dataset: train or validate on a fixed random subset


class TensorImages(Dataset):
    """Images and labels in memory; DataLoader fetches a whole batch with one indexing op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]

    def subset(self, indices: torch.Tensor) -> TensorImages:
        return TensorImages(self.images[indices], self.labels[indices])


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for TensorImages, whose __getitems__ already returns a stacked batch."""
    return batch


@dataclass(frozen=True)
class Splits:
    """A train/validation pair, the shape facts the model is built from, and how batches are made.

    In-memory datasets hand out whole batches and are augmented on the device by ``pipeline``;
    folder datasets decode and augment per image in ``num_workers`` DataLoader processes.
    """

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    pipeline: Pipeline = field(default_factory=Pipeline)
    classes: tuple[str, ...] = ()
    num_workers: int = 0

    @property
    def collate(self) -> Callable[[Any], Any]:
        return keep_batch if isinstance(self.train, TensorImages) else default_collate

    def loader(self, part: Dataset, batch_size: int, train: bool, order: torch.Generator | None = None) -> DataLoader:
        """Batches of ``part``: shuffled whole batches for training; worker processes if the dataset needs them."""
        return DataLoader(
            part,
            batch_size,
            shuffle=train,
            drop_last=train,
            generator=order,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.num_workers > 0 and torch.cuda.is_available(),
        )

    def limited(self, limit_train: int | None, limit_val: int | None) -> Splits:
        """The same data cut to a fixed random subset of each part, for quick runs."""
        return replace(
            self, train=_subset(self.train, limit_train, "limit_train"), val=_subset(self.val, limit_val, "limit_val")
        )


def _subset(dataset: Dataset, count: int | None, setting: str) -> Dataset:
    if count is None:
        return dataset
    check_positive_whole(setting, count)
    if count >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count]
    return dataset.subset(keep) if isinstance(dataset, TensorImages) else Subset(dataset, keep.tolist())


def build_data(node: DictConfig) -> Splits:
    """The configured dataset, cut to ``limit_train``/``limit_val`` images if set."""
    settings = settings_of(node, "dataset")
    limits = {key: settings.pop(key, None) for key in LIMITS}
    try:
        return instantiate(settings, "dataset").limited(**limits)
    except ConfigError as error:
        raise (error if error.setting.startswith("dataset.") else error.within("dataset")) from None


def digits(image_size: int = 16, val_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits, resized and standardized.

    The split is stratified and fixed by ``split_seed``; statistics come from the train part.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_positive_whole("image_size", image_size)
    if not (isinstance(val_fraction, float) and 0 < val_fraction < 1):
        raise ConfigError("val_fraction", f"must be a number in (0, 1), got {val_fraction!r}")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=val_fraction,
        random_state=split_seed,
        stratify=labels.numpy(),
    )
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
    )


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
