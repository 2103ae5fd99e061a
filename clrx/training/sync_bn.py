"""Batch norm over the global batch of a multi-process run (``trainer.sync_bn``), on GPUs and on the CPU.

On GPUs timm converts the model's batch norm layers (its own with activations too) to torch's
SyncBatchNorm. That has GPU kernels only, and DDP refuses it on the CPU: there each of torch's
BatchNorm layers becomes a ``GlobalBatchNorm``, whose statistics come from two autograd-aware
all-reduces (gloo): the sum and count of the global batch, then the sum of squared deviations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from timm.layers import convert_sync_batchnorm
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

from clrx.errors import ConfigError

PLAIN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


class GlobalBatchNorm(_BatchNorm):
    """A BatchNorm layer whose training statistics are the global batch's; in eval mode, torch's own."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(input)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        dims = [0, *range(2, input.dim())]
        count = input.new_tensor([input.numel() / input.size(1)])  # values per channel here
        totals = all_reduce(torch.cat([input.sum(dims), count]))
        count = totals[-1]
        mean = totals[:-1] / count
        centred = input - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            with torch.no_grad():  # as torch's kernels keep them: the variance unbiased
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1), factor)
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        return output * self.weight.view(shape) + self.bias.view(shape) if self.affine else output


def synchronized(model: torch.nn.Module, cpu: bool) -> torch.nn.Module:
    """``model`` with every batch norm layer normalizing over the global batch (weights and buffers kept)."""
    if not cpu:
        return convert_sync_batchnorm(model)
    for layer in model.modules():
        if type(layer) in PLAIN:
            layer.__class__ = GlobalBatchNorm
        elif isinstance(layer, _BatchNorm):
            raise ConfigError(
                "trainer.sync_bn",
                f"on the CPU only torch's BatchNorm layers are synchronized, not {type(layer).__name__}; "
                "train on GPUs or set trainer.sync_bn=false",
            )
    return model
