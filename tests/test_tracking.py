"""Batched, asynchronous MLflow logging loses nothing, and a run never stays RUNNING."""

import time

import pytest

from clrx.errors import ConfigError
from clrx.tracking import store as store_module
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


CHUNK = 12


def _chunks_written(monkeypatch, client):
    """Sizes of the log_batch calls the tracker's writer makes, in order."""
    sizes = []
    log_batch = client.log_batch

    def counting(run_id, metrics=(), *args, **kwargs):
        if metrics:
            sizes.append(len(metrics))
        return log_batch(run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(client, "log_batch", counting)
    return sizes


def _wait_for(condition):
    """Until the writer thread has written what it was handed (the store, not a clock, decides when)."""
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, "the writer never wrote what it was handed"
        time.sleep(0.01)


@pytest.mark.parametrize("per_step", [1, 2, 3, 4])
@pytest.mark.parametrize("chunks", [1, 2])
def test_a_buffer_of_exactly_one_or_two_chunks_is_written_whole(store, monkeypatch, per_step, chunks):
    """12 metrics a chunk: 1-4 metrics a step fill one or two chunks exactly, each handed over as it fills."""
    monkeypatch.setattr(store_module, "METRICS_PER_BATCH", CHUNK)
    uri, client = store
    tracking = open_store(uri)
    sizes = _chunks_written(monkeypatch, tracking)
    keys = [f"m{k}" for k in range(per_step)]
    steps = chunks * CHUNK // per_step
    with tracked_run(tracking, "t", None, {}) as tracker:
        for step in range(steps):
            tracker.metrics({key: step + k / 10 for k, key in enumerate(keys)}, step)
        _wait_for(lambda: sizes == [CHUNK] * chunks)  # handed over as each filled, without a flush
    assert sizes == [CHUNK] * chunks  # nothing was left for the end
    for k, key in enumerate(keys):
        history = sorted(client.get_metric_history(tracker.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(s, s + k / 10) for s in range(steps)]


def test_a_buffer_past_a_chunk_is_split_and_the_rest_waits(store, monkeypatch):
    monkeypatch.setattr(store_module, "METRICS_PER_BATCH", CHUNK)
    uri, client = store
    tracking = open_store(uri)
    sizes = _chunks_written(monkeypatch, tracking)
    with tracked_run(tracking, "t", None, {}) as tracker:
        tracker.points([("a", 1.0, s) for s in range(11)])
        tracker.sync()
        tracker.points([("a", 1.0, s) for s in range(11, 40)])  # 29 at once: handed over as 12, 12 and 5
        _wait_for(lambda: sizes == [11, CHUNK, CHUNK, 5])
        tracker.metric("a", 2.0, 40)  # buffered until the run finishes
    assert sizes == [11, CHUNK, CHUNK, 5, 1]
    assert [m.step for m in sorted(client.get_metric_history(tracker.run_id, "a"), key=lambda m: m.step)] == list(
        range(41)
    )


def test_a_resumed_run_skips_the_steps_it_already_holds(store):
    uri, client = store
    before = int(time.time() * 1000)
    with tracked_run(open_store(uri), "t", None, {}) as first:
        first.points([("lr", 0.1, 0), ("lr", 0.2, 1), ("loss", 5.0, 0)])
    after = int(time.time() * 1000)
    assert all(before <= m.timestamp <= after for m in client.get_metric_history(first.run_id, "lr"))  # in ms
    with tracked_run(open_store(uri), "t", None, {}, resume=first.run_id) as again:
        again.points([("lr", 9.0, 1), ("lr", 0.3, 2), ("loss", 4.0, 1), ("acc", 0.5, 0)])
    assert again.run_id == first.run_id

    def points(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, key))

    assert points("lr") == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert points("loss") == [(0, 5.0), (1, 4.0)] and points("acc") == [(0, 0.5)]
