"""A whole training run written by hand, as a user would: the reference ``clrx.studies.bench`` times clrx against.

    python -m clrx.studies.hand_loop [overrides]    # the overrides of python -m clrx; prints one JSON line

Only the setup reads clrx: the config's values, the dataset's tensors and the model (and the clock
of its start-up figure is clrx's, as a run's is). The run itself is plain PyTorch: the tensors on
the device, each epoch's batches drawn there by a permutation, the augmentation written inline,
torch's SGD and ``OneCycleLR`` (momentum cycled), autocast and channels_last as configured,
evaluation every epoch with one read of its sums, the weights saved at the end, no tracking.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from clrx.config.build import instantiate
from clrx.config.schema import compose_run
from clrx.data.splits import build_data
from clrx.lifetime import process_age


@dataclass
class HandLoop:
    """The steps of a hand-written run, and its evaluation."""

    steps_per_epoch: int
    step: Callable[[], None]  # one optimizer step on the next batch
    evaluate: Callable[[], float]  # validation accuracy
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def hand_loop(cfg: DictConfig, total_steps: int | None = None) -> HandLoop:
    """The model, data and optimizer of ``cfg`` in a loop with no clrx code on its path.

    ``total_steps`` sets the length of the one-cycle schedule (the configured epochs if None).
    """
    torch.manual_seed(cfg.trainer.seed)
    data = build_data(cfg.dataset)
    use_cuda = torch.cuda.is_available() and cfg.trainer.device != "cpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    layout = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.trainer.precision)
    model = instantiate(cfg.model, "model", num_classes=data.num_classes, in_chans=data.in_chans)
    model = model.to(device, memory_format=layout)
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    val_images, val_labels = data.val.images.to(device), data.val.labels.to(device)
    pad, flip, mean, std = data.pipeline.crop_padding, data.pipeline.flip, data.pipeline.mean, data.pipeline.std
    if mean is not None:
        mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    batch = cfg.trainer.batch_size
    steps_per_epoch = len(labels) // batch
    total_steps = total_steps or cfg.trainer.epochs * steps_per_epoch
    policy, settings = cfg.policy, cfg.optimizer
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=policy.base_lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=policy.max_lr,
        total_steps=total_steps,
        pct_start=policy.pct_start or (1 - policy.annihilate_pct) / 2,
        anneal_strategy=policy.anneal,
        div_factor=policy.max_lr / policy.base_lr,
        final_div_factor=policy.final_div,
        three_phase=policy.three_phase,
        base_momentum=policy.base_momentum,
        max_momentum=policy.max_momentum,
    )

    def prepared(x: torch.Tensor, train: bool) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        if train and pad:  # random crop: zero-pad, then each image its own offset
            n, c, h, w = x.shape
            x = F.pad(x, (pad, pad, pad, pad))
            dy, dx = torch.randint(0, 2 * pad + 1, (2, n), device=device)
            rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
            each, channels = torch.arange(n, device=device), torch.arange(c, device=device)
            x = x[each[:, None, None, None], channels[:, None, None], rows, cols]
        if train and flip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        if mean is not None:
            x = (x - mean) / std
        return x.contiguous(memory_format=layout)

    def batches():
        while True:
            order = torch.randperm(len(labels), device=device)
            for i in range(steps_per_epoch):
                index = order[i * batch : (i + 1) * batch]
                yield images[index], labels[index]

    stream = batches()

    def step() -> None:
        x, y = next(stream)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(prepared(x, train=True)), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        correct = torch.zeros((), device=device, dtype=torch.long)
        for first in range(0, len(val_labels), batch):
            x, y = val_images[first : first + batch], val_labels[first : first + batch]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                correct += (model(prepared(x, train=False)).argmax(1) == y).sum()
        model.train()
        return correct.item() / len(val_labels)

    model.train()
    return HandLoop(steps_per_epoch, step, evaluate, model, optimizer)


def main(argv: list[str] | None = None) -> None:
    cfg = compose_run(*(sys.argv[1:] if argv is None else argv))
    loop = hand_loop(cfg)
    begin = time.perf_counter()
    startup = process_age()
    for _ in range(cfg.trainer.epochs):
        for _ in range(loop.steps_per_epoch):
            loop.step()
        accuracy = loop.evaluate()
    torch.save(loop.model.state_dict(), Path("model.pt"))
    seconds = time.perf_counter() - begin
    print(json.dumps({"val_acc": accuracy, "train_seconds": seconds, "startup_seconds": startup}))


if __name__ == "__main__":
    main()
