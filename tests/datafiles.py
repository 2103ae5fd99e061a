"""Tiny but real dataset files, in each format clrx reads, written by the tests themselves."""

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_SIZES = {"train": 5 * 16, "test": 32}
# folder, training files, test file, label key, meta file, class-names key
CIFAR_LAYOUT = {
    10: (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "labels",
        "batches.meta",
        "label_names",
    ),
    100: ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names"),
}


def _images(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def write_cifar(root: Path, classes: int) -> None:
    """CIFAR's python pickle batches: 5 training batches (CIFAR-10) or one file (CIFAR-100), a test file, meta.

    Labels cycle through the first 20 classes at most, so a stratified split finds several images of each.
    """
    folder, train, test, key, meta, names = CIFAR_LAYOUT[classes]
    used = min(classes, 20)
    base = root / folder
    base.mkdir(parents=True, exist_ok=True)
    per_file = CIFAR_SIZES["train"] // len(train)
    for seed, (name, count) in enumerate([*((n, per_file) for n in train), (test, CIFAR_SIZES["test"])]):
        entry = {"data": _images(count, (3 * 32 * 32,), seed), key: [(seed + i) % used for i in range(count)]}
        with open(base / name, "wb") as file:
            pickle.dump(entry, file)
    with open(base / meta, "wb") as file:
        pickle.dump({names: [f"class{i}" for i in range(classes)]}, file)


def _idx(path: Path, array: np.ndarray) -> None:
    """The idx format of MNIST: magic (0x08 = uint8, then the number of dimensions), sizes, bytes."""
    with open(path, "wb") as file:
        file.write(struct.pack(">I", 0x0800 | array.ndim))
        file.write(struct.pack(f">{array.ndim}I", *array.shape))
        file.write(array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", train: int = 64, test: int = 32) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", train, 0), ("t10k", test, 1)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", _images(count, (28, 28), seed))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(count) % 10).astype(np.uint8))


def write_folder(root: Path, classes: int = 3, train: int = 12, val: int = 4) -> None:
    """``train/<class>/`` and ``val/<class>/`` of PNG and JPEG files of varied sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                size = (int(rng.integers(24, 64)), int(rng.integers(24, 64)))
                image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
                image.save(folder / f"{index}.{'png' if index % 2 else 'jpg'}")


def write_all(root: Path) -> Path:
    write_cifar(root, 10)
    write_cifar(root, 100)
    write_mnist(root, "MNIST")
    write_mnist(root, "FashionMNIST")
    write_folder(root / "folder")
    return root
