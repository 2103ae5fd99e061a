"""What a run trains on: a train/validation pair (``Splits``), how it is loaded, and the configured one.

The dataset factories live in ``clrx.data.datasets``; each returns ``Splits``. Nothing here knows a
particular dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from clrx.config.build import instantiate, settings_of
from clrx.data.augment import Pipeline
from clrx.errors import ConfigError, check_positive_whole

LIMITS = ("limit_train", "limit_val")  # any dataset: train or validate on a fixed random subset


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a train part and a held-out part with ``fraction`` of each class, both sorted.

    Depends only on the labels and ``seed``: every run and every process holds out the same items.
    (scikit-learn's ``train_test_split`` does this too, at seconds of import time before the first step.)
    """
    generator = torch.Generator().manual_seed(seed)
    held = []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        count = round(fraction * len(members))
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    out = torch.zeros(len(labels), dtype=torch.bool)
    out[torch.cat(held)] = True
    return torch.nonzero(~out).flatten(), torch.nonzero(out).flatten()


def evaluation_parts(
    train: Dataset,
    test: Dataset | None,
    labels: torch.Tensor,
    val_split: float | None,
    split_seed: int,
    evaluation: Dataset | None = None,
) -> dict[str, Dataset | None]:
    """``train``, ``val`` and ``test`` of a dataset that comes as a training and a test set.

    Without ``val_split`` the test set validates, as the papers report it. With it, a stratified
    ``val_split`` of each class of the training set (``labels``), fixed by ``split_seed``,
    validates, and the test set is kept for one evaluation at the end. The held-out images come
    from ``evaluation``, the training images with evaluation transforms where a dataset
    transforms per image; in-memory images are augmented on the device for training only.
    """
    if val_split is None:
        return {"train": train, "val": test, "test": None}
    if not (isinstance(val_split, (int, float)) and not isinstance(val_split, bool) and 0 < val_split < 1):
        problem = "the share of each class held out to validate, or null (the test set validates)"
        raise ConfigError("val_split", f"must be a number in (0, 1), {problem}, got {val_split!r}")
    if not (isinstance(split_seed, int) and not isinstance(split_seed, bool) and 0 <= split_seed < 2**63):
        raise ConfigError("split_seed", f"must be a whole number >= 0, got {split_seed!r}")
    fit, held = stratified_split(labels, val_split, split_seed)
    if not len(held) or not len(fit):
        raise ConfigError(
            "val_split",
            f"holds out {len(held)} of the {len(labels)} training images (rounded per class); "
            "choose a fraction that leaves images on both sides",
        )
    return {"train": _part(train, fit), "val": _part(evaluation or train, held), "test": test}


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


class DeviceBatches:
    """Batches of a ``TensorImages`` drawn by index where the images live, without a DataLoader.

    The images sit on the training device when they fit (else in pinned host memory, each batch
    gathered there and copied without blocking), so a step neither waits for a host-to-device copy
    nor gathers on the host. Shuffled batches follow ``torch.randperm`` seeded with seed + epoch,
    the order of a seeded ``RandomSampler``; every process takes its slice of each global batch,
    so the order is the same on any number of processes, and a resumed epoch starts at any batch.
    """

    def __init__(
        self,
        data: TensorImages,
        batch_size: int,
        device: torch.device,
        rank: int = 0,
        processes: int = 1,
        seed: int | None = None,
    ) -> None:
        self.batch_size, self.device, self.rank, self.processes, self.seed = batch_size, device, rank, processes, seed
        self.shuffled = seed is not None  # training: shuffled, whole batches only
        self.images, self.labels = (_resident(part, device) for part in (data.images, data.labels))
        self.epoch = 0

    def __len__(self) -> int:
        whole, rest = divmod(len(self.labels), self.batch_size)
        return whole + (0 if self.shuffled or not rest else 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's share of each batch of the epoch, from batch number ``start``."""
        count = len(self.labels)
        if self.shuffled:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(count)
        order = _to(order, self.images.device)  # one copy an epoch, not a step
        for first in range(start * self.batch_size, len(self) * self.batch_size, self.batch_size):
            share = order[first : first + self.batch_size].tensor_split(self.processes)[self.rank]
            yield _to(self.images[share], self.device), _to(self.labels[share], self.device)


def _resident(part: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``part`` on ``device`` if it takes at most a quarter of the free memory there, else pinned on the host."""
    if device.type != "cuda":
        return part.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    return part.to(device) if part.nbytes <= free // 4 else part.pin_memory()


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host through pinned memory, so the host does not wait for the copy."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for TensorImages, whose __getitems__ already returns a stacked batch."""
    return batch


@dataclass(frozen=True)
class Splits:
    """A train/validation pair (and a test set, evaluated once at the end, where one is kept apart),
    the shape facts the model is built from, and how batches are made.

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
    test: Dataset | None = None
    source: str | None = None  # the file or folder it was read from; None: made by code (fake)

    @property
    def collate(self) -> Callable[[Any], Any]:
        return keep_batch if isinstance(self.train, TensorImages) else default_collate

    def preprocessing(self) -> dict[str, Any]:
        """How evaluation prepares images for the model, for whoever feeds it later: in-memory datasets
        scale uint8 images to [0, 1] and normalize them by ``mean`` and ``std``; image folders go through
        their evaluation transform. And the class names, where the dataset has them."""
        said: dict[str, Any] = {}
        if self.pipeline.mean is not None:
            said["normalize"] = {"mean": list(self.pipeline.mean), "std": list(self.pipeline.std)}
        transform = getattr(getattr(self.val, "dataset", self.val), "transform", None)  # a split's Subset too
        if transform is not None:
            said["transform"] = str(transform)
        if self.classes:
            said["classes"] = list(self.classes)
        return said

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
            pin_memory=torch.cuda.is_available(),  # non-blocking copies to the GPU
        )

    def contents(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each part's contents as arrays, for a digest: in-memory images and labels, or each file's path
        (relative to the part's folder, so a moved copy stays the same data) and label."""
        return {"training": _arrays(self.train), "validation": _arrays(self.val)}

    def limited(self, limit_train: int | None, limit_val: int | None) -> Splits:
        """The same data cut to a fixed random subset of each part, for quick runs."""
        return replace(
            self, train=_subset(self.train, limit_train, "limit_train"), val=_subset(self.val, limit_val, "limit_val")
        )


def _arrays(part: Dataset) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(part, TensorImages):
        return part.images.cpu().numpy(), part.labels.cpu().numpy()
    folder, indices = (part.dataset, part.indices) if isinstance(part, Subset) else (part, range(len(part)))
    samples = [folder.samples[index] for index in indices]  # torchvision's DatasetFolder: (path, class)
    paths = np.array([str(Path(path).relative_to(folder.root)) for path, _ in samples], dtype=object)
    return paths, np.array([label for _, label in samples], dtype=np.int64)


def _subset(dataset: Dataset, count: int | None, setting: str) -> Dataset:
    if count is None:
        return dataset
    check_positive_whole(setting, count)
    if count >= len(dataset):
        return dataset
    return _part(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count])


def _part(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    return dataset.subset(indices) if isinstance(dataset, TensorImages) else Subset(dataset, indices.tolist())


def build_data(node: DictConfig) -> Splits:
    """The configured dataset, cut to ``limit_train``/``limit_val`` images if set."""
    settings = settings_of(node, "dataset")
    limits = {key: settings.pop(key, None) for key in LIMITS}
    try:
        return instantiate(settings, "dataset").limited(**limits)
    except ConfigError as error:
        raise (error if error.setting.startswith("dataset.") else error.within("dataset")) from None
