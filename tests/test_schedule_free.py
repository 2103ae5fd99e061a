"""Schedule-free optimizers evaluated, kept and resumed at their average; Prodigy's logged LR; refused schedules."""

import pytest
import schedulefree
import torch
import torch.nn.functional as F

from clrx.config.build import instantiate
from clrx.config.schema import compose_run
from clrx.data.splits import build_data
from clrx.errors import ConfigError
from clrx.training import checkpoint
from clrx.training.run import train
from tests.conftest import run_cli
from tests.test_cli import _no_runs
from tests.test_wsd import assert_same_end

SMALL = ("dataset.limit_train=640", "dataset.limit_val=128", "trainer.progress=false", "trainer.device=cpu")
PER_EPOCH = 640 // 64


def _model(cfg, weights=None):
    model = instantiate(cfg.model, "model", num_classes=10, in_chans=1)
    if weights is not None:
        model.load_state_dict(weights)
    return model


def _val_loss(model, data):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(data.pipeline(data.val.images, train=False)), data.val.labels).item()


def test_evaluation_scores_the_average_the_optimizer_state_defines(tmp_path, store, monkeypatch):
    """x = (y - (1 - momentum) z) / momentum from the training weights y and the state z, as the paper defines
    the average; a model without batch norm, so the weights alone decide the score."""
    uri, client = store
    averages = []
    switch = schedulefree.SGDScheduleFree.eval

    def spied(optimizer):
        group = optimizer.param_groups[0]
        if group["train_mode"]:
            beta = group["momentum"]
            params = [(p.detach() - (1 - beta) * optimizer.state[p]["z"]) / beta for p in group["params"]]
            averages.append(params)
        switch(optimizer)

    monkeypatch.setattr(schedulefree.SGDScheduleFree, "eval", spied)
    vit = ("model.name=test_vit", "+model.img_size=16", "+model.patch_size=4")
    cfg = compose_run(*vit, *SMALL, "optimizer=schedulefree_sgd", "policy=fixed", "policy.lr=0.5", "trainer.epochs=2")
    cfg.tracking.uri = uri
    result = train(cfg, tmp_path / "run")
    assert len(averages) == 3  # each epoch's evaluation, and the weights kept at the end
    data = build_data(cfg.dataset)
    logged = sorted(client.get_metric_history(result.run_id, "val_loss"), key=lambda m: m.step)
    for point, average in zip(logged, averages, strict=False):
        model = _model(cfg)
        with torch.no_grad():
            for param, value in zip(model.parameters(), average, strict=True):
                param.copy_(value)
        assert point.value == pytest.approx(_val_loss(model, data), rel=1e-5)
    kept = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    trained = [kept[name] for name, _ in _model(cfg).named_parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(trained, averages[-1], strict=True))
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(averages[0], averages[-1], strict=True))


def test_batch_norm_statistics_are_recomputed_at_the_kept_average(tmp_path, store):
    """Each batch-norm layer's running mean and variance: the average over the first training batches (in order,
    unaugmented) of each batch's own mean and unbiased variance of the layer's input, at the kept weights."""
    uri, _ = store
    cfg = compose_run(*SMALL, "optimizer=schedulefree_adamw", "policy=fixed", "policy.lr=0.005", "trainer.epochs=1")
    cfg.tracking.uri = uri
    train(cfg, tmp_path / "run")
    kept = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    model = _model(cfg, kept).train()
    norms = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    seen = {name: [] for name in norms}
    for name, module in norms.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(args[0].detach()))
    images = build_data(cfg.dataset).train.images
    with torch.no_grad():
        for first in range(0, len(images), 64):
            model(build_data(cfg.dataset).pipeline(images[first : first + 64], train=False))
    assert norms and len(seen[next(iter(norms))]) == PER_EPOCH
    for name, inputs in seen.items():
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
        variances = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in inputs]).mean(0)
        assert torch.allclose(kept[f"{name}.running_mean"], means, atol=1e-5), name
        assert torch.allclose(kept[f"{name}.running_var"], variances, rtol=1e-4, atol=1e-5), name


def test_a_resumed_schedule_free_run_ends_as_the_uninterrupted_one(tmp_path, store):
    """Checkpoints hold what was evaluated (the average, its batch-norm statistics); resuming one changes nothing."""
    uri, client = store
    run = (*SMALL, "optimizer=schedulefree_sgd", "policy=wsd", "policy.decay_frac=0", "policy.max_lr=1.0")
    run += ("trainer.epochs=3", "trainer.checkpoint_every=4", "trainer.keep_last=20", "trainer.save_model=false")
    first = train(compose_run(*run, f"tracking.uri={uri}"), tmp_path / "first")
    cfg = compose_run(*run)
    at_epoch_end = checkpoint.load(checkpoint.path_for(tmp_path / "first" / checkpoint.DIRECTORY, PER_EPOCH))
    [first_score, *_] = sorted(client.get_metric_history(first.run_id, "val_loss"), key=lambda m: m.step)
    assert first_score.value == pytest.approx(
        _val_loss(_model(cfg, at_epoch_end["model"]), build_data(cfg.dataset)), rel=1e-5
    )
    middle = checkpoint.path_for(tmp_path / "first" / checkpoint.DIRECTORY, 12)  # mid-epoch 2, after an evaluation
    assert checkpoint.load(middle)["optimizer"]["param_groups"][0]["train_mode"] is False  # saved at the average
    again = train(compose_run(*run, f"trainer.resume={middle}", f"tracking.uri={uri}"), tmp_path / "again")
    assert again.val_loss == first.val_loss
    assert_same_end(tmp_path / "first", tmp_path / "again", 3 * PER_EPOCH)


def test_prodigy_logs_d_times_lr_from_its_state_and_keeps_d_under_its_limit(tmp_path, store):
    """The checkpoint after step s holds the d that step s + 1 takes; the logged lr of that step is d x lr."""
    uri, client = store
    run = (*SMALL, "dataset.limit_train=320", "optimizer=prodigy", "policy=fixed", "policy.lr=0.5")
    run += ("optimizer.d_limit=4e-6", "trainer.epochs=2", "trainer.checkpoint_every=1", "trainer.keep_last=100")
    result = train(compose_run(*run, "trainer.save_model=false", f"tracking.uri={uri}"), tmp_path / "run")
    logged = {m.step: m.value for m in client.get_metric_history(result.run_id, "lr")}
    assert sorted(logged) == list(range(10)) and logged[0] == 0.5 * 1e-6  # d0
    for step in range(1, 10):
        state = checkpoint.load(checkpoint.path_for(tmp_path / "run" / checkpoint.DIRECTORY, step))
        group = state["optimizer"]["param_groups"][0]
        assert logged[step] == group["d"] * group["lr"] and group["lr"] == 0.5, step
    assert max(logged.values()) == 0.5 * 4e-6 and logged[9] == logged[8]  # reached, and held at the limit


def test_a_cyclical_policy_with_a_schedule_free_optimizer_is_one_line_and_no_run(tmp_path, store):
    uri, client = store
    done = run_cli("optimizer=schedulefree_sgd", "policy=one_cycle", f"tracking.uri={uri}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "clrx: error: policy: schedule-free optimizers keep their own average and need a constant LR after "
        "warm-up; use policy=fixed or policy=wsd with decay_frac=0; got OneCycle"
    ]
    assert _no_runs(client)


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (("optimizer=schedulefree_adamw", "policy=wsd"), "schedule-free optimizers .* got WSD"),
        (("optimizer=schedulefree_sgd", "policy=cosine"), "schedule-free optimizers .* got Cosine"),
        (("optimizer=prodigy", "policy=triangular2"), "Prodigy estimates its own LR .* got Cyclic"),
        # before the range test that automatic bounds would run: no run at all
        (("optimizer=schedulefree_sgd", "policy=one_cycle", "policy.max_lr=auto"), "schedule-free .* got OneCycle"),
    ],
)
def test_schedules_that_fight_the_optimizer_are_refused(tmp_path, store, overrides, refused):
    uri, client = store
    with pytest.raises(ConfigError, match=f"^policy: {refused}$"):
        train(compose_run(*overrides, *SMALL, f"tracking.uri={uri}"), tmp_path / "run")
    assert _no_runs(client)
