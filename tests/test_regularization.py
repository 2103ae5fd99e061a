"""Regularizers trained alongside the learning rate: label smoothing, mixup/CutMix, gradient clipping, EMA weights.

Each is checked against a reference written here (timm's draws replayed, hand formulas), and its
settings are refused out of range with one line.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clrx.config.schema import compose_run
from clrx.errors import ConfigError
from clrx.schedules.policies import Fixed
from clrx.tracking.store import Silent
from clrx.training.loss import training_loss
from clrx.training.recorder import Recorder
from clrx.training.run import train
from clrx.training.session import prepare

CPU = ("trainer.device=cpu", "trainer.progress=false")


def _loss_node(**settings):
    return compose_run(*(f"loss.{key}={value}" for key, value in settings.items())).loss


def test_label_smoothing_is_cross_entropy_against_the_smoothed_target():
    logits, labels = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 5
    loss = training_loss(_loss_node(label_smoothing=0.2), num_classes=5, micro_batch=8)
    logp = logits.log_softmax(dim=1)
    by_hand = -(0.8 * logp[torch.arange(8), labels] + 0.2 * logp.mean(dim=1)).mean()
    assert float(loss.loss(*loss.targets(logits, labels))) == pytest.approx(float(by_hand), rel=1e-6)
    # The soft-target path (mixing on, but no batch drawn to mix) gives the same loss.
    never_mixed = training_loss(_loss_node(label_smoothing=0.2, mixup_alpha=0.4, mix_prob=0.0), 5, 8)
    images = torch.randn(8, 1, 4, 4)
    kept, targets = never_mixed.targets(images.clone(), labels)
    assert torch.equal(kept, images)
    assert float(never_mixed.loss(logits, targets)) == pytest.approx(float(by_hand), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_mixes_each_batch_with_its_mirror_by_timms_draw(alpha):
    mixing = training_loss(_loss_node(mixup_alpha=alpha, label_smoothing=0.1), num_classes=4, micro_batch=6)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    np.random.seed(7)
    mixed, targets = mixing.targets(images.clone(), labels)
    np.random.seed(7)  # timm draws whether to mix, then the weight, from numpy's global generator
    assert np.random.rand() < 1.0
    lam = float(np.random.beta(alpha, alpha))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    smooth = F.one_hot(labels, 4).float() * 0.9 + 0.1 / 4
    assert torch.allclose(targets, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)


def test_cutmix_pastes_a_box_of_the_mirror_image_and_weights_targets_by_its_area():
    mixing = training_loss(_loss_node(cutmix_alpha=1.0), num_classes=3, micro_batch=4)
    images, labels = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone(), torch.tensor([0, 1, 2, 2])
    np.random.seed(3)
    mixed, targets = mixing.targets(images.clone(), labels)
    pasted = (mixed[0] == images[3]).float().mean()  # image 0 holds a box of image 3 (the mirror)
    assert 0 < pasted < 1 and torch.equal(mixed[1][mixed[1] != images[1]].unique(), torch.tensor([2.0]))
    assert targets[0, 0] == pytest.approx(1 - float(pasted), abs=1e-6)  # the label weight is the area kept
    assert targets[0].sum() == pytest.approx(1.0)


def test_mixing_needs_even_micro_batches_and_names_the_setting():
    cfg = compose_run(*CPU, "loss.mixup_alpha=0.2", "trainer.batch_size=63")
    with pytest.raises(ConfigError, match=r"trainer\.batch_size.*even, got 63"):
        prepare(cfg)


def _stepped(session, steps, seen=None):
    recorder, batches = Recorder(Silent(), session.momentum, every=1), session.batches()
    for step in range(steps):
        session.policy_step(Fixed(lr=0.5), step, next(batches), recorder)
        if seen is not None:
            seen.append({k: v.detach().clone() for k, v in session.plain_model.state_dict().items()})
    return recorder


@pytest.mark.parametrize("setting, bound", [("clip_grad_norm", 0.05), ("clip_grad_value", 0.001)])
def test_clipping_bounds_the_gradients_the_optimizer_applies_and_the_norm_before_it_is_kept(setting, bound):
    session = prepare(compose_run(*CPU, f"trainer.{setting}={bound}", "trainer.batch_size=32"))
    applied, step = [], session.torch_optimizer.step

    def observed_step(*args, **kwargs):
        grads = [p.grad for p in session.plain_model.parameters() if p.grad is not None]
        applied.append((torch.nn.utils.get_total_norm(grads), max(g.abs().max() for g in grads)))
        return step(*args, **kwargs)

    session.torch_optimizer.step = observed_step
    _stepped(session, 3)
    for norm, largest in applied:
        if setting == "clip_grad_norm":
            assert float(norm) <= bound * (1 + 1e-5)
        else:  # engaged: some element sits exactly at the bound (in float32)
            assert largest == torch.tensor(bound)
    before = float(session.grad_norm)
    assert before > float(applied[-1][0])  # the kept norm is the one before clipping


def test_the_average_of_the_weights_follows_the_hand_computed_ema():
    session = prepare(compose_run(*CPU, "trainer.ema=0.8", "trainer.batch_size=32"))
    seen = []
    _stepped(session, 4, seen)
    by_hand = dict(seen[0])  # the first update copies the weights, as in timm's training script
    for weights in seen[1:]:
        by_hand = {
            key: 0.8 * by_hand[key] + 0.2 * value if value.is_floating_point() else value
            for key, value in weights.items()
        }
    ema = session.ema.module.state_dict()
    assert ema.keys() == by_hand.keys()
    for key, value in by_hand.items():
        assert torch.allclose(ema[key].float(), value.float(), atol=1e-6), key
    assert not torch.allclose(ema["fc.weight"], seen[-1]["fc.weight"])


def test_a_run_logs_the_norm_every_step_scores_the_average_each_epoch_and_saves_it(tmp_path, store):
    uri, client = store
    cfg = compose_run(
        *CPU,
        f"tracking.uri={uri}",
        "trainer.epochs=2",
        "trainer.batch_size=128",
        "trainer.clip_grad_norm=2.0",
        "trainer.ema=0.9",
        "loss.label_smoothing=0.1",
        "loss.mixup_alpha=0.2",
    )
    result = train(cfg, tmp_path)
    norms = client.get_metric_history(result.run_id, "grad_norm")
    assert [point.step for point in norms] == list(range(result.steps))
    assert [point.step for point in client.get_metric_history(result.run_id, "val_acc_ema")] == [
        result.steps // 2,
        result.steps,
    ]
    run = client.get_run(result.run_id)
    assert run.data.params["loss.mixup_alpha"] == "0.2" and run.data.params["trainer.ema"] == "0.9"
    saved = torch.load(run.data.tags["clrx.model_ema_path"])
    assert saved.keys() == torch.load(tmp_path / "model.pt").keys()


@pytest.mark.parametrize(
    "override, setting",
    [
        ("trainer.clip_grad_norm=0", "trainer.clip_grad_norm"),
        ("trainer.clip_grad_value=-1", "trainer.clip_grad_value"),
        ("trainer.ema=1.0", "trainer.ema"),
        ("trainer.ema=0", "trainer.ema"),
        ("loss.label_smoothing=1.0", "loss.label_smoothing"),
        ("loss.label_smoothing=-0.1", "loss.label_smoothing"),
        ("loss.mixup_alpha=-1", "loss.mixup_alpha"),
        ("loss.cutmix_alpha=-0.5", "loss.cutmix_alpha"),
        ("loss.mix_prob=1.5", "loss.mix_prob"),
        ("loss.switch_prob=-0.1", "loss.switch_prob"),
    ],
)
def test_out_of_range_settings_are_refused_by_name(override, setting):
    with pytest.raises(ConfigError, match=rf"^{setting.replace('.', '[.]')}: must be"):
        prepare(compose_run(*CPU, override))


def test_clipping_by_norm_and_by_value_together_is_refused():
    with pytest.raises(ConfigError, match=r"trainer\.clip_grad_value: clip by norm or by value, not both"):
        prepare(compose_run(*CPU, "trainer.clip_grad_norm=1", "trainer.clip_grad_value=1"))


def test_a_misspelt_loss_setting_is_refused_with_the_close_name():
    with pytest.raises(ConfigError, match=r"loss\.smothing.*loss\.label_smoothing"):
        compose_run("+loss.smothing=0.1")
