"""The largest batch that trains a step: the disciplined approach's advice for the batch size.

Sizes double from the smallest legal batch until one fails or reaches the cap, then bisection
between the last that fitted and the first that did not. A size "fits" when a forward pass,
backward pass and optimizer step of one micro batch run without exhausting device memory.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import default_collate

from clrx.data.splits import Splits
from clrx.errors import ConfigError
from clrx.training.checkpoint import rng_state, set_rng_state

OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")
log = logging.getLogger("clrx")


def largest(fits: Callable[[int], bool], unit: int, cap: int, first: int | None = None) -> int:
    """The largest multiple of ``unit`` up to ``cap`` for which ``fits`` holds, trying ``first`` first."""
    good, bad, size = 0, None, first or unit
    while size <= cap:
        if not fits(size):
            bad = size
            break
        good = size
        size = cap if size < cap < 2 * size else 2 * size
    if good == 0:
        raise ConfigError("trainer.find_batch_size", f"not even a batch of {first or unit} fits in memory")
    if bad is not None:
        low, high = good // unit, bad // unit
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle * unit) else (low, middle)
        good = low * unit
    return good


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY)
    )


def find_batch_size(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Splits,
    grad_accum: int,
    cap: int,
) -> int:
    """The largest global batch (a multiple of processes x grad_accum) that trains on this device.

    Model, optimizer and random generators are put back afterwards: the probe steps leave no trace.
    """
    dataset, unit = data.train, accelerator.num_processes * grad_accum
    cap = min(cap, len(dataset)) // unit * unit
    if cap < 2 * unit:  # batch norm needs two images to normalize over
        raise ConfigError(
            "trainer.max_batch_size",
            f"must allow two images per process and micro batch ({2 * unit}), got {min(cap, len(dataset))}",
        )
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), rng_state()

    def fits(size: int) -> bool:
        micro = size // unit
        images, labels = default_collate([dataset[i] for i in range(micro)])
        try:
            with accelerator.no_sync(model):  # no collective a rank out of memory would leave waiting
                logits = model(data.pipeline(images.to(accelerator.device), train=True))
                loss = F.cross_entropy(logits, labels.to(accelerator.device))
                accelerator.backward(loss)
            optimizer.step()
            ok = True
        except Exception as error:
            if not _out_of_memory(error):
                raise
            ok = False
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # Every process must take the same size: it fits only where it fits on all of them.
        votes = accelerator.reduce(torch.tensor(float(ok), device=accelerator.device), "sum")
        ok = bool(votes == accelerator.num_processes)
        log.info("batch %d %s", size, "fits" if ok else "does not fit")
        return ok

    try:
        return largest(fits, unit, cap, first=2 * unit)
    finally:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        set_rng_state(saved[2])
