"""The per-step record: exactly one point per step and key, from step 0 to the last, and a stop on a bad loss."""

import math

import pytest
import torch

from clrx.errors import TrainingDiverged
from clrx.training.recorder import Recorder


class Points:
    """What a tracker is handed, call by call."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, float, int]]] = []

    def points(self, points):
        self.calls.append(list(points))

    def flat(self):
        return [point for call in self.calls for point in call]


def _record(recorder, losses, momentum=0.9):
    for step, loss in enumerate(losses):
        recorder.record(step, 0.1 * (step + 1), momentum, torch.tensor(loss))


def test_losses_are_read_every_few_steps_and_the_rest_on_a_last_drain():
    tracker, drains = Points(), []
    recorder = Recorder(tracker, "momentum", every=3, on_drain=lambda n, lr, loss: drains.append((n, lr, loss)))
    _record(recorder, [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    assert recorder.losses == [7.0, 6.0, 5.0, 4.0, 3.0, 2.0]  # two full reads; step 6 still on the device
    assert drains == [(3, pytest.approx(0.3), 5.0), (3, pytest.approx(0.6), 2.0)]
    recorder.drain()
    recorder.drain()  # nothing left: no empty call
    assert recorder.losses == [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0] and recorder.steps == list(range(7))
    assert drains[2:] == [(1, pytest.approx(0.7), 1.0)] and len(tracker.calls) == 3
    expected = []
    for step in range(7):
        lr = 0.1 * (step + 1)
        expected += [("lr", lr, step), ("momentum", 0.9, step), ("train_loss", 7.0 - step, step)]
    assert tracker.flat() == expected


def test_no_momentum_points_without_a_momentum_and_the_reduction_applies():
    tracker = Points()
    recorder = Recorder(tracker, None, every=2, reduce=lambda losses: losses * 10)
    _record(recorder, [1.0, 2.0], momentum=None)
    assert tracker.flat() == [("lr", 0.1, 0), ("train_loss", 10.0, 0), ("lr", 0.2, 1), ("train_loss", 20.0, 1)]
    assert recorder.momenta == [None, None] and recorder.losses == [10.0, 20.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_stops_and_what_came_before_reaches_the_tracker(bad):
    tracker = Points()
    recorder = Recorder(tracker, "beta1", every=4)
    _record(recorder, [5.0, 4.0, 3.0, 2.0, 1.0, bad])  # read at step 3; steps 4 and 5 pending
    with pytest.raises(TrainingDiverged) as raised:
        recorder.drain()
    assert str(raised.value) == f"loss became {bad} at step 5 (lr 0.6); lower the learning rate (policy.max_lr)"
    assert recorder.losses == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert [(key, step) for key, _, step in tracker.flat()] == [
        (key, step) for step in range(5) for key in ("lr", "beta1", "train_loss")
    ]


def test_epoch_loss_is_the_mean_of_the_last_steps():
    recorder = Recorder(Points(), None, every=1)
    _record(recorder, [9.0, 4.0, 2.0, 0.0])
    assert recorder.epoch_loss(3) == 2.0 and recorder.epoch_loss(1) == 0.0


def test_state_round_trips_and_numbers_the_steps_from_zero():
    recorder = Recorder(Points(), "momentum", every=2)
    _record(recorder, [3.0, 2.0, 1.0, 0.5])
    state = recorder.state()
    assert state == {
        "lrs": pytest.approx([0.1, 0.2, 0.3, 0.4]),
        "momenta": [0.9] * 4,
        "losses": [3.0, 2.0, 1.0, 0.5],
    }
    resumed = Recorder(Points(), "momentum", every=2)
    resumed.load(state)
    assert resumed.state() == state and resumed.steps == [0, 1, 2, 3]
    state["losses"].append(9.0)
    assert resumed.losses == [3.0, 2.0, 1.0, 0.5]  # a copy, not the checkpoint's list


def test_gradient_norms_are_read_with_the_losses_and_logged_beside_them():
    tracker = Points()
    recorder = Recorder(tracker, None, every=2, reduce=lambda values: values * 2)
    for step in range(3):
        recorder.record(step, 0.1, None, torch.tensor(float(step)), torch.tensor(10.0 + step))
    assert len(tracker.calls) == 1  # steps 0 and 1 read together; step 2 waits
    recorder.drain()
    expected = []
    for step in range(3):
        expected += [("lr", 0.1, step), ("train_loss", 2.0 * step, step), ("grad_norm", 20.0 + 2 * step, step)]
    assert tracker.flat() == expected and recorder.losses == [0.0, 2.0, 4.0]
