"""The range test's steps: the LR rises by the ``LRRange`` policy until it ends or the loss diverges.

``run_range_test`` takes any step function (clrx's training session uses it); ``lr_range_test`` is
the library API for a plain model, loader and optimizer.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from clrx.errors import ConfigError
from clrx.range_test.curve import Curve
from clrx.range_test.suggest import Suggestion, suggest
from clrx.schedules.apply import apply_hyper
from clrx.schedules.policies import Hyper, LRRange


def run_range_test(
    policy: LRRange,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Any],
    train_step: Callable[[Any], tuple[float, float | None]],
    evaluate: Callable[[], Mapping[str, float]] | None = None,
    on_step: Callable[[int, Hyper, Curve], None] | None = None,
) -> Curve:
    """Step through ``policy`` until it ends or the loss diverges; the curve it leaves.

    ``train_step(batch)`` does one optimizer step and returns (loss, batch accuracy or None).
    ``evaluate()`` returns ``val_acc`` and ``val_loss``, asked every ``policy.val_every`` steps.
    """
    curve = Curve(policy.mode, policy.beta, policy.stop_factor)
    for step in range(policy.num_iter):
        hyper = policy(step)
        apply_hyper(optimizer, hyper)
        loss, accuracy = train_step(next(batches))
        stop = curve.add(hyper.lr, loss, accuracy)
        if evaluate is not None and policy.val_every and (step + 1) % policy.val_every == 0 and not stop:
            scores = evaluate()
            curve.val_accuracy[step], curve.val_loss[step] = scores["val_acc"], scores["val_loss"]
        if on_step is not None:
            on_step(step, hyper, curve)
        if stop:
            break
    if len(curve.lrs) < max(5, policy.num_iter // 20):
        raise ConfigError(
            "min_lr",
            f"the loss diverged within the first {len(curve.lrs)} steps ({curve.stop_reason}); lower min_lr",
        )
    return curve


def lr_range_test(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    policy: LRRange,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy,
    restore: bool = True,
) -> tuple[Curve, dict[str, Suggestion]]:
    """The range test on your own model, loader and optimizer; weights and optimizer state restored.

    The loader yields (inputs, targets) on the model's device; it is cycled as often as needed.
    Batch accuracy is recorded when the outputs are class scores for integer targets.
    """
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())) if restore else None
    model.train()

    def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float | None]:
        inputs, targets = batch
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item(), batch_accuracy(outputs, targets)

    try:
        curve = run_range_test(policy, optimizer, itertools.cycle(loader), train_step)
    finally:
        if saved is not None:
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
    return curve, suggest(curve, policy.skip_start)


def batch_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Top-1 accuracy for class scores and integer labels; None for anything else (regression)."""
    if outputs.ndim != 2 or targets.ndim != 1 or targets.is_floating_point():
        return None
    return (outputs.argmax(dim=1) == targets).float().mean().item()
