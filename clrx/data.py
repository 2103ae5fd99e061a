"""Datasets that ship with a package or are generated, held in memory as tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from clrx.errors import ConfigError


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


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for TensorImages, whose __getitems__ already returns a stacked batch."""
    return batch


@dataclass(frozen=True)
class Splits:
    """A train/validation pair plus the shape facts the model is built from."""

    name: str
    train: TensorImages
    val: TensorImages
    num_classes: int
    in_chans: int


def _check_positive(setting: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(setting, f"must be a positive whole number, got {value!r}")


def digits(image_size: int = 16, val_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits, resized and standardized.

    The split is stratified and fixed by ``split_seed``; statistics come from the train part.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_positive("image_size", image_size)
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
        _check_positive(setting, value)
    generator = torch.Generator().manual_seed(seed)

    def part(n: int) -> TensorImages:
        images = torch.randn(n, in_chans, image_size, image_size, generator=generator)
        return TensorImages(images, torch.randint(num_classes, (n,), generator=generator))

    return Splits("fake", part(num_train), part(num_val), num_classes, in_chans)
