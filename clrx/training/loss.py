"""The training loss: cross-entropy with label smoothing, against mixed targets where mixup or CutMix is on.

Mixing is timm's ``Mixup`` on whole batches on the device, after augmentation (as timm's
``train.py`` does); its mixed and smoothed soft targets go to timm's ``SoftTargetCrossEntropy``.
Validation always scores the plain cross-entropy against the labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from clrx.config.schema import check_loss
from clrx.errors import ConfigError


@dataclass
class TrainingLoss:
    """``(images, labels) -> (images, targets)`` before the model, then ``loss(logits, targets)``."""

    mix: Mixup | None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (images, labels) if self.mix is None else self.mix(images, labels)


def training_loss(node: DictConfig, num_classes: int, micro_batch: int) -> TrainingLoss:
    """The loss ``node`` (the ``loss`` group) describes, for micro batches of ``micro_batch`` images a process."""
    check_loss(node)
    if not (node.mixup_alpha or node.cutmix_alpha):
        smoothing = float(node.label_smoothing)  # a plain number: a config lookup every step would cost microseconds
        return TrainingLoss(None, lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=smoothing))
    if micro_batch % 2:  # each image is mixed with its mirror in the batch
        raise ConfigError(
            "trainer.batch_size",
            f"mixup and CutMix pair the images of a batch: each process's micro batch must be even, got {micro_batch}",
        )
    mix = Mixup(
        mixup_alpha=node.mixup_alpha,
        cutmix_alpha=node.cutmix_alpha,
        prob=node.mix_prob,
        switch_prob=node.switch_prob,
        mode="batch",
        label_smoothing=node.label_smoothing,
        num_classes=num_classes,
    )
    return TrainingLoss(mix, SoftTargetCrossEntropy())
