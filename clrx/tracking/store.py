"""MLflow tracking that never makes a training step wait.

Per-step values are buffered in memory and handed, in chunks of up to 1000 metrics, to the run's
journal (``clrx.tracking.journal``) and then to a writer thread that calls ``log_batch``; ``finish``
waits for every chunk and replays from the journal whatever a failing store missed before closing
the run, so after a run the store holds exactly the points that were recorded. The writer runs at the lowest CPU
priority: on a small machine, a store busy inserting rows must not take a core from the
training step's own threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from clrx.errors import ConfigError, Stopped
from clrx.tracking.journal import Journal, read, replay, stored_steps

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
PARAM_VALUE_LIMIT = 6000
PARAM_KEY = re.compile(r"[\w./ -]+")  # what MLflow takes in a param's name
PARENT_FILE = "mlflow_parent_run"  # in a sweep's folder: the id of the sweep's parent run
# The experiment tag by which MLflow 3's UI picks an experiment's view, and its value for training.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
log = logging.getLogger("clrx")


def default_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the directory clrx runs from."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(config: DictConfig | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values, the shape MLflow params take."""
    container = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    flat: dict[str, str] = {}
    for key, value in container.items():
        # A mapping keyed by what MLflow refuses in a name (optimizer.lr_mult's globs) stays one value.
        if isinstance(value, Mapping) and value and all(PARAM_KEY.fullmatch(str(inner)) for inner in value):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:PARAM_VALUE_LIMIT]
    return flat


@contextmanager
def _probe_once() -> Iterator[None]:
    # A wrong server address should fail in seconds, not after MLflow's minutes of retries.
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _database(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def _serialized(uri: str) -> Iterator[None]:
    """Across processes, one at a time: creating or migrating a SQLite schema, or an experiment.

    Runs started together would otherwise race in MLflow's migrations and leave the store broken.
    The lock is a file beside the database; other stores serialize these themselves.
    """
    database = _database(uri)
    if database is None or not database.parent.is_dir():
        yield
        return
    with FileLock(database.with_name(database.name + ".lock")):
        yield


def bound_requests(timeout: int) -> None:
    """Let one call to an MLflow server take at most about ``timeout`` seconds, retries included.

    MLflow's own defaults retry for minutes; a training run would stall that long on a server
    that went away. Three attempts with short back-offs, each given a third of the rest.
    """
    os.environ.update(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, (timeout - 3) // 3)),
    )


def open_store(uri: str) -> MlflowClient:
    """A client for ``uri``, checked to answer; a store that cannot be opened is a config error."""
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema set-up notes on a new database
    # Set-up notes, and a traceback for every failed query: the failure reaches clrx, which says it in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        with _probe_once(), _serialized(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ConfigError("tracking.uri", f"cannot open MLflow store {uri!r}: {reason[:300]}") from None
    return client


def parent_run_id(sweep_dir: str | Path) -> str | None:
    """The parent run of the sweep writing to ``sweep_dir``, if one was started."""
    path = Path(sweep_dir) / PARENT_FILE
    return path.read_text().strip() if path.exists() else None


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Keep a SQLite store's artifacts beside the database, wherever the run started."""
    database = _database(uri)
    if database is None:
        return None
    return (database.parent / "mlartifacts" / experiment).as_uri()


def check_experiment(client: MlflowClient, name: str) -> None:
    """Refuse a deleted experiment, which takes no runs, before anything is trained; a new one is created
    with the first run."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        _refuse_deleted(client, found)


def _refuse_deleted(client: MlflowClient, found: Any) -> None:
    if found.lifecycle_stage == "deleted":
        raise ConfigError(
            "tracking.experiment",
            f"experiment {found.name!r} is deleted in {client.tracking_uri}; restore it (MLFLOW_TRACKING_URI="
            f"{client.tracking_uri} mlflow experiments restore --experiment-id {found.experiment_id}) "
            "or choose another",
        )


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if new (by one process, when several start at once); marked as
    model training so that MLflow 3's UI opens it on its runs and charts, not on its GenAI traces (a
    user's own choice of kind is kept)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        with _serialized(client.tracking_uri):
            found = client.get_experiment_by_name(name)
            if found is None:
                location = _artifact_location(client.tracking_uri, name)
                tags = {EXPERIMENT_KIND: MODEL_TRAINING}
                return client.create_experiment(name, artifact_location=location, tags=tags)
    _refuse_deleted(client, found)
    if EXPERIMENT_KIND not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return found.experiment_id


def lowest_priority() -> None:
    """The calling thread at the lowest CPU priority: background work never takes a core from training."""
    with contextlib.suppress(OSError):  # Linux sets a thread's own niceness; elsewhere, run as is
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class _Writer:
    """A low-priority thread that writes metric chunks to the store in the order given.

    At the first write the store refuses it stops writing: the chunks after it stay in the
    journal, to be replayed, so the store always holds a prefix of the run's points.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.chunks: queue.Queue[list[tuple[str, float, int, int]] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.stored = 0  # points the store took
        self.thread = threading.Thread(target=self._run, name="clrx-mlflow-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from mlflow.entities import Metric

        lowest_priority()
        while (chunk := self.chunks.get()) is not None:
            try:
                if self.error is None:  # MLflow's entities are built here, off the training thread
                    self.client.log_batch(self.run_id, metrics=[Metric(*point) for point in chunk])
                    self.stored += len(chunk)
            except Exception as error:  # reported on the training thread
                self.failed(error)
            finally:
                self.chunks.task_done()

    def failed(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            log.warning("tracking.uri: %s stopped taking writes: %s", self.client.tracking_uri, _reason(error))

    def close(self) -> None:
        """Write everything queued (unless the store failed), then stop."""
        self.chunks.put(None)
        self.thread.join()


def _reason(error: BaseException) -> str:
    error = getattr(error, "orig", None) or error  # SQLAlchemy's wrapper: the database's own words
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:300]


class Buffered:
    """Per-step values gathered in memory and handed on a chunk at a time (``flush``): the cheap path a step takes.

    ``logged`` maps metric keys to the last step the run already holds (a resumed run): points up to
    it are not taken again, so every step keeps exactly one point.
    """

    def __init__(self, logged: Mapping[str, int] | None = None) -> None:
        self._logged = dict(logged or {})
        self._metrics: list[tuple[str, float, int, int]] = []  # (key, value, ms timestamp, step)
        self._recorded = 0  # points handed on

    @property
    def logged(self) -> dict[str, int]:
        """The last step of each metric the run held when it was opened (a resumed run)."""
        return dict(self._logged)

    def metric(self, key: str, value: float, step: int) -> None:
        self.points([(key, value, step)])

    def points(self, points: list[tuple[str, float, int]]) -> None:
        """Several (key, value, step) points, stamped with one time: the cheap path for per-step values."""
        now = int(time.time() * 1000)
        if self._logged:
            points = [(k, v, s) for k, v, s in points if s > self._logged.get(k, -1)]
        self._metrics.extend([(key, value, now, step) for key, value, step in points])
        if len(self._metrics) >= METRICS_PER_BATCH:
            self.flush()

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        self.points([(key, value, step) for key, value in values.items()])

    def flush(self) -> None:
        raise NotImplementedError


class Tracker(Buffered):
    """One MLflow run, written to in batches, each point first into the run's journal (if given).

    If the store fails, training goes on (``on_failure="continue"``) with points kept in the journal
    and replayed at the end, or stops at the next chunk (``"stop"``).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        logged: Mapping[str, int] | None = None,
        journal: Journal | None = None,
        on_failure: str = "continue",
        system_metrics: bool = False,
    ) -> None:
        super().__init__(logged)
        self.client, self.run_id, self.journal, self.on_failure = client, run_id, journal, on_failure
        self._writer = _Writer(client, run_id)
        self._monitor = None
        if system_metrics:
            from clrx.tracking.provenance import system_monitor

            self._monitor = system_monitor(client, run_id, resume=bool(logged))

    @property
    def uri(self) -> str:
        return self.client.tracking_uri

    def flush(self) -> None:
        """Write buffered metrics to the journal and hand them to the writer thread; returns without waiting."""
        self.check()
        self._hand_on()

    def take(self, points: list[tuple[str, float, int, int]]) -> None:
        """Points stamped and filtered elsewhere (``Buffered.points`` in the training process), handed on."""
        self._metrics.extend(points)
        self.flush()

    def _hand_on(self) -> None:
        if self.journal is not None:
            self.journal.points(self._metrics)
        for start in range(0, len(self._metrics), METRICS_PER_BATCH):
            self._writer.chunks.put(self._metrics[start : start + METRICS_PER_BATCH])
        self._recorded += len(self._metrics)
        self._metrics = []

    def sync(self) -> None:
        """Return once every metric recorded so far is in the store (or the store has failed)."""
        self.flush()
        self._writer.chunks.join()
        self.check()

    def persist(self) -> dict[str, int]:
        """Make every point so far durable in the journal; how many were recorded and how many the store took."""
        self.flush()
        if self.journal is not None:
            self.journal.persist()
        return {"recorded": self._recorded, "stored": self._writer.stored}

    def check(self) -> None:
        """With ``on_failure="stop"``, raise once the store has failed."""
        if self._writer.error is not None and self.on_failure == "stop":
            raise self._failure(self._writer.error)

    def _failure(self, error: BaseException) -> ConfigError:
        kept = "" if self.journal is None else f"; every point is kept in {self.journal.path}"
        replay = "" if self.journal is None else f" (python -m clrx.sync {self.journal.path.parent})"
        return ConfigError(
            "tracking.uri",
            f"the MLflow store {self.uri} stopped taking writes ({_reason(error)}){kept}"
            f"{replay and ', to replay once it answers' + replay}",
        )

    def _store(self, write: Any, *args: Any) -> None:
        """A direct write to the store; once the store has failed, skipped (the journal keeps params and tags)."""
        if self._writer.error is None:
            try:
                write(*args)
            except Exception as error:
                self._writer.failed(error)
        self.check()

    def params(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        if self.journal is not None:
            self.journal.record(params=dict(values))
        items = [Param(key, value) for key, value in values.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._store(self.client.log_batch, self.run_id, [], items[start : start + PARAMS_PER_BATCH])

    def tags(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        values = {key: str(value) for key, value in values.items()}
        if self.journal is not None:
            self.journal.record(tags=values)
        self._store(self.client.log_batch, self.run_id, [], [], [RunTag(k, v) for k, v in values.items()])

    def text(self, text: str, artifact_file: str) -> None:
        self._store(self.client.log_text, self.run_id, text, artifact_file)

    def figure(self, figure: Figure, artifact_file: str) -> None:
        self._store(self.client.log_figure, self.run_id, figure, artifact_file)

    def plot(self, artifact_file: str, draw: Callable[..., Figure], *args: Any) -> None:
        """The figure ``draw(*args)`` as ``artifact_file``, drawn where the store is written."""
        self.figure(draw(*args), artifact_file)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._store(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def artifacts(self, directory: Path, artifact_path: str) -> None:
        self._store(self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def inputs(self, data: Any) -> None:
        """``data``'s splits as MLflow dataset inputs (see ``provenance.dataset_inputs``)."""
        self.datasets(data.name, data.source, data.contents())

    def datasets(self, name: str, source: str | None, contents: Mapping[str, tuple[Any, Any]]) -> None:
        from clrx.tracking.provenance import dataset_inputs

        self._store(self.client.log_inputs, self.run_id, dataset_inputs(name, source, contents))

    def model(
        self, exported: Mapping[str, Any], metadata: Mapping[str, Any], step: int, register_as: str | None = None
    ) -> None:
        """The trained model (``models.exported``) as the run's MLflow model (see ``provenance.log_model``), with
        the metrics at ``step``.

        A model MLflow cannot save is a warning, not the run's failure: its weights are in model.pt.
        """
        self.sync()  # the final metrics, which MLflow copies onto the logged model
        if self._writer.error is not None:
            return
        from clrx.tracking.provenance import log_model

        try:
            log_model(self.client, self.run_id, exported, metadata, step, register_as)
        except Exception as error:
            log.warning("tracking.log_model: the model was not logged: %s", _reason(error))

    def finish(self, status: str, reason: str | None = None) -> None:
        """Wait for every buffered point to land, replay what the store missed, then close the run with ``status``.

        A store that still refuses leaves the points in the journal and ends as a ConfigError naming it.
        """
        if self._monitor is not None:  # its last samples, while the run still counts as RUNNING
            self._monitor.finish()
        self._hand_on()
        self._writer.close()
        try:
            if self._writer.error is not None:
                if self.journal is None:
                    raise self._writer.error
                self.journal.persist()
                replayed = replay(self.client, self.run_id, read(self.journal.path), METRICS_PER_BATCH)
                log.info("the store is back: replayed %d points from %s", replayed, self.journal.path)
            if reason:
                self.client.set_tag(self.run_id, "clrx.failure", reason[:PARAM_VALUE_LIMIT])
            self.client.set_terminated(self.run_id, status)
        except Exception as error:
            raise self._failure(self._writer.error or error) from None
        finally:
            if self.journal is not None:
                self.journal.record(end=status, reason=reason)
                self.journal.close()


class Silent:
    """The tracker of a process that logs nothing: every rank but the main one."""

    run_id = uri = ""

    def metric(self, key: str, value: float, step: int) -> None:
        pass

    def points(self, points: list[tuple[str, float, int]]) -> None:
        pass

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def persist(self) -> dict[str, int]:
        return {}

    def params(self, values: Mapping[str, str]) -> None:
        pass

    def tags(self, values: Mapping[str, str]) -> None:
        pass

    def text(self, text: str, artifact_file: str) -> None:
        pass

    def figure(self, figure: Figure, artifact_file: str) -> None:
        pass

    def plot(self, artifact_file: str, draw: Callable[..., Figure], *args: Any) -> None:
        pass

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def artifacts(self, directory: Path, artifact_path: str) -> None:
        pass

    def inputs(self, data: Any) -> None:
        pass

    def model(
        self, exported: Mapping[str, Any], metadata: Mapping[str, Any], step: int, register_as: str | None = None
    ) -> None:
        pass


def _reopen(client: MlflowClient, run_id: str, journal: Path | None) -> dict[str, int]:
    """Mark an earlier run RUNNING again, with what its journal holds and the store missed.

    Returns the last step of each metric the run holds.
    """
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ConfigError(
            "trainer.resume", f"the checkpoint's MLflow run {run_id} is not in {client.tracking_uri}"
        ) from None
    if "clrx.failure" in run.data.tags:  # from the attempt that stopped; this one may well finish
        client.delete_tag(run_id, "clrx.failure")
    client.update_run(run_id, "RUNNING")
    if journal is not None and journal.exists():
        replayed = replay(client, run_id, read(journal), METRICS_PER_BATCH)
        if replayed:
            log.info("replayed %d points the store had missed from %s", replayed, journal)
    return stored_steps(client, run_id)


def open_run(
    client: MlflowClient,
    experiment: str,
    run_name: str | None,
    tags: Mapping[str, str],
    resume: str | None = None,
    journal: Path | None = None,
    on_failure: str = "continue",
    system_metrics: bool = False,
    started: float | None = None,
) -> Tracker:
    """A new run, or ``resume`` (the id of an earlier run) again with its metrics going on where they stopped.

    ``journal`` is the file every point is written to first (see ``clrx.tracking.journal``). A new
    run is tagged as ``mlflow.start_run`` would tag it (user, entry point, git commit), under ``tags``.
    ``system_metrics``: MLflow's monitor samples the machine while the run lasts. ``started``: when the
    run was asked for (``time.time()``), if not now.
    """
    if resume is None:
        from clrx.tracking.provenance import context_tags

        tags = context_tags(tags)
        start_time = None if started is None else int(started * 1000)
        run = client.create_run(experiment_id(client, experiment), start_time=start_time, tags=tags, run_name=run_name)
        run_id, logged = run.info.run_id, None
    else:
        run_id, logged = resume, _reopen(client, resume, journal)
    log_file = None if journal is None else Journal(journal, fresh=resume is None)
    if log_file is not None and resume is None:
        log_file.record(run=run_id, uri=client.tracking_uri, experiment=experiment, name=run_name)
    tracker = Tracker(client, run_id, logged, log_file, on_failure, system_metrics)
    tracker.tags({k: v for k, v in tags.items() if resume is None or not k.startswith("mlflow.")})
    return tracker


@contextmanager
def closing(tracker: Any) -> Iterator[Any]:
    """``tracker``'s run ended as the block ends: FINISHED, KILLED (a signal, Ctrl-C) or FAILED with the
    reason tagged; never left RUNNING."""
    try:
        yield tracker
    except Stopped as stopped:
        tracker.finish("KILLED", str(stopped))
        stopped.run_id = tracker.run_id  # the run a job under submitit fails if it is not requeued
        raise
    except KeyboardInterrupt:
        tracker.finish("KILLED", "interrupted")
        raise
    except BaseException as error:
        tracker.finish("FAILED", f"{type(error).__name__}: {error}")
        error.run_id = tracker.run_id  # lets a sweep tell a failed run from a job that never started one
        raise
    tracker.finish("FINISHED")


@contextmanager
def tracked_run(client: MlflowClient, *args: Any, **kwargs: Any) -> Iterator[Tracker]:
    """A run (``open_run``'s arguments) that always ends FINISHED, FAILED or KILLED, never left RUNNING."""
    with closing(open_run(client, *args, **kwargs)) as tracker:
        yield tracker


@contextmanager
def main_run(store: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """The MLflow run (``open_run``'s arguments) of the main process, the one given a ``store``
    (``clrx.tracking.opening``); every other records into nothing."""
    if store is None:
        yield Silent()
        return
    with store.run(*args, **kwargs) as tracker:
        yield tracker


def log_config(tracker: Tracker | Silent, cfg: DictConfig, data: Any, output_dir: Path) -> None:
    """The config as run, plus what the data turned out to be: sizes and classes of ``data``'s splits,
    and each split as an MLflow dataset input (name, source, digest, shapes)."""
    sizes = {"train_images": len(data.train), "val_images": len(data.val), "num_classes": data.num_classes}
    if data.test is not None:
        sizes["test_images"] = len(data.test)
    tracker.params({**flatten(cfg), **flatten(sizes, "data.")})
    tracker.inputs(data)
    tracker.text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
    if data.classes:
        tracker.text("\n".join(data.classes) + "\n", "data/classes.txt")
    if (output_dir / ".hydra").is_dir():
        tracker.artifacts(output_dir / ".hydra", "config/hydra")


def run_name(cfg: DictConfig, tags: Mapping[str, str]) -> str:
    """``one_cycle-test_resnet-digits-3f9a``: what ran, and a suffix from the OS's randomness.

    MLflow's own random names come from Python's generator, which the run's seed has just fixed:
    every run of a seed would get the same name.
    """
    policy = tags.get("clrx.policy") or cfg.policy._target_.rpartition(".")[2].lower()
    dataset = tags.get("clrx.dataset") or cfg.dataset._target_.rpartition(".")[2]
    return f"{policy}-{cfg.model.name}-{dataset}-{secrets.token_hex(2)}"


def newest_finished_run(
    client: MlflowClient, experiment: str, tag: str, value: str
) -> tuple[str, dict[str, str], datetime] | None:
    """(run id, tags, start time) of the newest FINISHED run in ``experiment`` whose ``tag`` is ``value``."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        return None
    started = datetime.fromtimestamp(runs[0].info.start_time / 1000)
    return runs[0].info.run_id, runs[0].data.tags, started


def record_failed_job(uri: str, experiment: str, tags: Mapping[str, str], reason: str, run_id: str | None) -> None:
    """End a failed sweep job's run FAILED with ``reason`` (unless it is already), or for a job that
    stopped before its run started create one, so the sweep reports it."""
    from clrx.tracking.provenance import context_tags

    client = open_store(uri)
    if run_id is None:
        run_id = client.create_run(experiment_id(client, experiment), tags=context_tags(tags)).info.run_id
    elif client.get_run(run_id).info.status == "FAILED":
        return
    client.set_tag(run_id, "clrx.failure", reason[:PARAM_VALUE_LIMIT])
    client.set_terminated(run_id, "FAILED")
