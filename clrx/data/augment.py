"""Augmentation and normalization of whole batches on the training device.

Small datasets live in memory as uint8 tensors; per-sample PIL transforms in worker processes
would then be the slowest part of a GPU step. Here a batch is cropped, flipped and normalized
in a few tensor operations wherever it already is. The random crop matches torchvision's
``RandomCrop(size, padding=p)``: zero padding, then an offset drawn uniformly from 0..2p per image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image shifted by its own random offset within ``padding`` pixels, zeros shifted in."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)).permute(0, 2, 3, 1)  # B, H, W, C
    offsets = torch.randint(0, 2 * padding + 1, (2, batch, 1), device=images.device)
    rows = offsets[0] + torch.arange(height, device=images.device)  # B, H
    cols = offsets[1] + torch.arange(width, device=images.device)  # B, W
    index = torch.arange(batch, device=images.device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


@functools.lru_cache(maxsize=16)
def _channel_stats(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


@dataclass(frozen=True)
class Pipeline:
    """What a batch goes through on the device before the model; the default does nothing.

    uint8 images become floats in [0, 1]; training batches are cropped and flipped if asked;
    ``mean`` and ``std`` (per channel, of the [0, 1] images) normalize every batch.
    """

    crop_padding: int = 0
    flip: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if train and self.crop_padding:
            images = random_crop(images, self.crop_padding)
        if train and self.flip:
            images = random_flip(images)
        if self.mean is not None:
            images = (images - _channel_stats(self.mean, images.device)) / _channel_stats(self.std, images.device)
        return images
