"""The host runs ahead of the device: batches are drawn where the data lives, and a steady training
step reads nothing back from the device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clrx.config.build import build_policy
from clrx.config.schema import compose_run
from clrx.data.splits import DeviceBatches, TensorImages
from clrx.tracking.store import Silent
from clrx.training.recorder import Recorder
from clrx.training.session import prepare


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``.item()``, ``float(t)``, ``if t``): each a device sync."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _images(count: int) -> TensorImages:
    return TensorImages(torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1), torch.arange(count))


def test_each_process_takes_its_share_of_the_one_process_order_and_a_resumed_epoch_continues_it():
    data, cpu = _images(100), torch.device("cpu")
    alone = DeviceBatches(data, 20, cpu, seed=7)
    pair = [DeviceBatches(data, 20, cpu, rank=rank, processes=2, seed=7) for rank in (0, 1)]
    for epoch in (0, 3):
        for loader in (alone, *pair):
            loader.set_epoch(epoch)
        whole = [labels for _, labels in alone]
        # the order of a seeded RandomSampler: torch.randperm with seed + epoch
        assert torch.equal(torch.cat(whole), torch.randperm(100, generator=torch.Generator().manual_seed(7 + epoch)))
        shares = zip(*(list(loader) for loader in pair), strict=True)
        assert all(torch.equal(torch.cat([a[1], b[1]]), full) for (a, b), full in zip(shares, whole, strict=True))
        resumed = [labels for _, labels in alone.iterate(start=3)]
        assert len(resumed) == 2 and all(map(torch.equal, resumed, whole[3:]))
    first, again = ([labels for _, labels in alone] for _ in range(2))
    assert all(map(torch.equal, first, again))  # the same epoch, the same order


def test_validation_batches_cover_every_image_once_over_the_processes():
    data, cpu = _images(45), torch.device("cpu")
    shares = [DeviceBatches(data, 20, cpu, rank=rank, processes=2) for rank in (0, 1)]
    assert [len(loader) for loader in shares] == [3, 3]  # the last batch is short
    seen = torch.cat([labels for loader in shares for _, labels in loader])
    assert sorted(seen.tolist()) == list(range(45))


def test_steady_training_steps_and_evaluation_read_no_value_back_from_the_device():
    session = prepare(compose_run("trainer.log_every=4", "trainer.progress=false", "trainer.save_model=false"))
    policy = build_policy(session.cfg.policy, session.steps_per_epoch, session.total_steps)
    recorder = Recorder(Silent(), session.momentum, session.cfg.trainer.log_every)
    steps = session.epoch(0)
    for step in range(3):  # warm-up
        session.policy_step(policy, step, next(steps), recorder)
    with ScalarReads() as reads:
        for step in range(3, 12):  # includes two reads of the pending losses, which are .tolist() calls
            session.policy_step(policy, step, next(steps), recorder)
        steady = reads.count
        scores = session.evaluate()
        evaluation = reads.count - steady
        loss, _ = session.step(next(steps))
        float(loss)  # what a read looks like: the counter sees it
    assert (steady, evaluation, reads.count) == (0, 0, 1)
    assert len(recorder.losses) == 12 and 0 < scores["val_acc"] <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_steady_training_steps_never_synchronize_with_the_gpu():
    session = prepare(compose_run("trainer.log_every=1000", "trainer.progress=false", "trainer.device=cuda"))
    policy = build_policy(session.cfg.policy, session.steps_per_epoch, session.total_steps)
    recorder = Recorder(Silent(), session.momentum, session.cfg.trainer.log_every)
    steps = session.batches()
    for step in range(3):  # warm-up: kernels chosen, constants on the device
        session.policy_step(policy, step, next(steps), recorder)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 3 + 2 * session.steps_per_epoch):  # crosses epoch starts
            session.policy_step(policy, step, next(steps), recorder)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    recorder.drain()
    assert len(recorder.losses) == 3 + 2 * session.steps_per_epoch
