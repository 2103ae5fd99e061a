"""Batched, asynchronous MLflow logging loses nothing, and a run never stays RUNNING."""

import pytest

from clrx.errors import ConfigError
from clrx.tracking.store import experiment_id, flatten, open_store, tracked_run


def test_every_buffered_point_lands_once_across_many_batches(store):
    uri, client = store
    steps = 1234  # 3 metrics a step: several full batches and a partial one
    with tracked_run(open_store(uri), "t", "batches", {}) as tracker:
        for step in range(steps):
            tracker.metrics({"lr": step * 1e-3, "momentum": 0.9, "train_loss": 1.0 / (step + 1)}, step)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    for key in ("lr", "momentum", "train_loss"):
        history = sorted(client.get_metric_history(tracker.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(steps))
    lrs = sorted(client.get_metric_history(tracker.run_id, "lr"), key=lambda m: m.step)
    assert [m.value for m in lrs] == pytest.approx([s * 1e-3 for s in range(steps)])


def test_a_failure_ends_the_run_failed_with_the_reason_and_keeps_the_points(store):
    uri, client = store
    with pytest.raises(RuntimeError):
        with tracked_run(open_store(uri), "t", None, {}) as tracker:
            tracker.metric("lr", 0.1, 0)
            raise RuntimeError("boom")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["clrx.failure"] == "RuntimeError: boom"
    assert len(client.get_metric_history(tracker.run_id, "lr")) == 1


def test_a_store_that_cannot_be_opened_is_a_config_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="tracking.uri: cannot open MLflow store"):
        open_store(f"sqlite:///{blocker / 'mlflow.db'}")


def test_params_are_the_flattened_config():
    assert flatten({"policy": {"max_lr": 0.5, "betas": [0.9, 0.99]}, "empty": {}}) == {
        "policy.max_lr": "0.5",
        "policy.betas": "[0.9, 0.99]",
        "empty": "{}",
    }


def test_experiments_open_in_the_model_training_view_unless_their_owner_chose_another(store):
    _, client = store
    kind = "mlflow.experimentKind"
    assert client.get_experiment(experiment_id(client, "new")).tags[kind] == "custom_model_development"
    older = client.create_experiment("older")  # made before clrx marked its experiments
    assert experiment_id(client, "older") == older
    assert client.get_experiment(older).tags[kind] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={kind: "genai_development"})
    experiment_id(client, "chosen")
    assert client.get_experiment(chosen).tags[kind] == "genai_development"
