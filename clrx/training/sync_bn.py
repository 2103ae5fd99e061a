"""Batch norm over the global batch of a multi-process run (``trainer.sync_bn``), on GPUs and on the CPU.

torch's SyncBatchNorm has GPU kernels only; on the CPU (gloo) the same statistics come from two
autograd-aware all-reduces: the sum and count of the global batch, then the sum of squared deviations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or dist.group.WORLD
        if input.device.type != "cpu" or not (self.training and dist.is_initialized()):
            return super().forward(input)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        dims = [0, *range(2, input.dim())]
        count = input.new_tensor([input.numel() / input.size(1)])  # values per channel here
        totals = all_reduce(torch.cat([input.sum(dims), count]), group=group)
        count = totals[-1]
        mean = totals[:-1] / count
        centred = input - mean.view(shape)
        var = all_reduce(centred.square().sum(dims), group=group) / count
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            with torch.no_grad():  # as torch's kernels keep them: the variance unbiased
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1), factor)
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        return output * self.weight.view(shape) + self.bias.view(shape) if self.affine else output

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: object = None) -> torch.nn.Module:
        """torch's conversion of every BatchNorm*D layer, to this class (same weights, buffers and settings)."""
        module = super().convert_sync_batchnorm(module, process_group)
        for layer in module.modules():
            if type(layer) is torch.nn.SyncBatchNorm:
                layer.__class__ = cls
        return module
