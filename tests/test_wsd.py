"""Warmup-stable-decay against an independent formula, and the checkpoint kept where its decay starts."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clrx.config.build import build_policy
from clrx.config.schema import compose_run
from clrx.errors import ConfigError
from clrx.schedules.policies import WSD
from clrx.training import checkpoint
from clrx.training.run import train

PER_EPOCH = 640 // 64  # digits limited to 640 training images


def _oracle(base, top, floor, total, warmup, decay_steps, shape, step):
    """The schedule as knots: a straight line up, flat, then down along ``shape``, written from the description."""
    start = total - 1 - decay_steps
    if step <= start:
        return float(np.interp(step, [0, max(warmup, 1e-300), start + 1], [base if warmup else top, top, top]))
    t = (step - start) / decay_steps
    fall = {"linear": t, "cos": (1 - math.cos(math.pi * t)) / 2, "sqrt": math.sqrt(t)}[shape]
    return top - (top - floor) * fall


@settings(deadline=None, max_examples=2 * settings.default.max_examples)  # 300 in the suite
@given(
    lrs=st.tuples(st.floats(1e-6, 1.0), st.floats(1.01, 1e3), st.floats(0.0, 0.99)),
    total=st.one_of(st.integers(2, 300), st.integers(10**4, 10**6)),
    warmup=st.one_of(st.tuples(st.just("steps"), st.integers(0, 300)), st.tuples(st.just("frac"), st.floats(0, 1))),
    decay_frac=st.floats(0.0, 1.0),
    shape=st.sampled_from(["linear", "cos", "sqrt"]),
    data=st.data(),
)
def test_wsd_follows_its_formula_over_random_settings(lrs, total, warmup, decay_frac, shape, data):
    base, top, floor = lrs[0], lrs[0] * lrs[1], lrs[0] * lrs[1] * lrs[2]
    kind, amount = warmup
    warmup_steps = amount if kind == "steps" else round(amount * (total - 1))
    decay_steps = round(decay_frac * (total - 1))
    given = {"warmup_steps": amount} if kind == "steps" else {"warmup_frac": amount}
    make = lambda: WSD(base, top, total, decay_frac=decay_frac, decay=shape, min_lr=floor, **given)  # noqa: E731
    if warmup_steps > total - 1 - decay_steps:
        with pytest.raises(ConfigError, match="overlap"):
            make()
        return
    policy = make()
    edges = {0, warmup_steps - 1, warmup_steps, total - 1 - decay_steps, total - decay_steps, total - 1}
    steps = range(total) if total <= 300 else sorted(edges | set(data.draw(st.lists(st.integers(0, total - 1)))))
    for step in steps:
        if 0 <= step < total:
            expected = _oracle(base, top, floor, total, warmup_steps, decay_steps, shape, step)
            assert math.isclose(policy(step).lr, expected, rel_tol=1e-9, abs_tol=1e-12 * top), (step, expected)
            assert policy(step).momentum is None
    assert policy(total - 1).lr == pytest.approx(floor if decay_steps else top, rel=1e-12, abs=1e-12 * top)


def test_wsd_settings_come_from_the_config_and_bad_ones_name_themselves():
    cfg = compose_run("policy=wsd", "policy.warmup_epochs=1", "policy.decay=sqrt")
    policy = build_policy(cfg.policy, steps_per_epoch=22, total_steps=176)
    assert (policy.warmup, policy.decay_start, policy.decay) == (22, 175 - 35, "sqrt")  # warmup_frac dropped
    cfg = compose_run("policy=wsd", "policy.decay=exp")
    with pytest.raises(ConfigError, match=r"^policy.decay: must be one of linear, cos, sqrt, got 'exp'$"):
        build_policy(cfg.policy, steps_per_epoch=22, total_steps=176)


def assert_same_end(first_dir, again_dir, step):
    """Two runs' checkpoints at ``step``: the same weights, optimizer state and per-step record, losses included."""
    one, two = (checkpoint.load(checkpoint.path_for(d / checkpoint.DIRECTORY, step)) for d in (first_dir, again_dir))
    assert one["record"] == two["record"] and one["scores"] == two["scores"]
    assert all(torch.equal(one["model"][name], two["model"][name]) for name in one["model"])
    for a, b in zip(one["optimizer"]["state"].values(), two["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key] for key in a)
    return one


def test_the_decay_start_checkpoint_is_kept_and_resumes_as_the_run_went_on(tmp_path, store):
    """Resumed from decay.pt, a run ends as it did; a longer one stays at max_lr until its own, later decay."""
    uri, client = store
    run = ("policy=wsd", "policy.decay_frac=0.4", "policy.warmup_steps=3", "trainer.checkpoint_at_decay=true")
    run += ("dataset.limit_train=640", "dataset.limit_val=128")
    run += ("trainer.checkpoint_every=5", "trainer.keep_last=1", "trainer.progress=false", "trainer.save_model=false")
    first = train(compose_run(*run, "trainer.epochs=3", f"tracking.uri={uri}"), tmp_path / "first")
    total = 3 * PER_EPOCH
    start = total - 1 - round(0.4 * (total - 1))  # 17: mid-epoch 2
    kept = tmp_path / "first" / checkpoint.DIRECTORY / checkpoint.DECAY
    saved = checkpoint.load(kept)
    assert saved["step"] == start and len(saved["record"]["lrs"]) == start
    assert sorted(p.name for p in kept.parent.iterdir()) == [checkpoint.DECAY, "step-00000030.pt"]  # pruned to 1

    again = train(
        compose_run(*run, "trainer.epochs=3", f"trainer.resume={kept}", f"tracking.uri={uri}"), tmp_path / "again"
    )
    assert again.run_id == first.run_id and again.val_loss == first.val_loss
    lrs = assert_same_end(tmp_path / "first", tmp_path / "again", total)["record"]["lrs"]
    assert lrs[start] == 0.5 and lrs[start + 1] < 0.5 and lrs[total - 1] == 0.0

    longer = compose_run(*run, "trainer.epochs=5", f"trainer.resume={kept}", "trainer.resume_changed=true")
    longer.tracking.uri = uri
    train(longer, tmp_path / "longer")
    record = checkpoint.load(checkpoint.path_for(tmp_path / "longer" / checkpoint.DIRECTORY, 50))["record"]
    later = 49 - round(0.4 * 49)  # the longer run's decay starts here
    assert record["lrs"][:start] == lrs[:start] and set(record["lrs"][start : later + 1]) == {0.5}
    assert record["lrs"][-1] == 0.0


def test_checkpoint_at_decay_needs_a_policy_with_a_decay(tmp_path, store):
    uri, client = store
    cfg = compose_run("policy=one_cycle", "trainer.checkpoint_at_decay=true", f"tracking.uri={uri}")
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint_at_decay: needs policy=wsd .* got OneCycle$"):
        train(cfg, tmp_path / "run")
    assert client.search_experiments()[0].name == "Default" and not client.search_runs(["0"])
