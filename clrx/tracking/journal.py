"""The run's own record, written before anything goes to MLflow: a write-ahead log of JSON lines.

``<run dir>/metrics.jsonl`` holds one line per metric point (``[key, value, ms timestamp, step]``)
and an object line for the run itself, its params and tags, and its end. Points are written a
chunk at a time (one write call per ~1000 points, never per step) and made durable (fsync) at
checkpoints. Whatever the store missed (it stopped answering, refused writes, or the run was
recorded offline) is replayed from here, so the store ends with exactly one point per step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

NAME = "metrics.jsonl"
Point = tuple[str, float, int, int]  # (key, value, ms timestamp, step)


class Journal:
    """Appends to a run's log; ``points`` returns after one buffered write of a whole chunk."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        """Continue the journal at ``path``, or (``fresh``) start one, keeping an earlier run's under its run id."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():
            path.rename(path.with_name(f"metrics-{read(path).run.get('run', 'earlier')}.jsonl"))
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # open for the run's life

    def record(self, **entry: Any) -> None:
        """An object line: the run (``run``), its ``params``, ``tags``, or its ``end``."""
        self._write([json.dumps(entry)])

    def points(self, points: Iterable[Point]) -> None:
        self._write([json.dumps(point) for point in points])

    def _write(self, lines: list[str]) -> None:
        if lines:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()  # into the OS: a killed process loses nothing it handed on

    def persist(self) -> None:
        """Make everything written so far survive a crash of the machine (at checkpoints)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.persist()
        self._file.close()


@dataclass
class Record:
    """A journal as read back."""

    run: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    end: dict[str, Any] | None = None


def read(path: Path) -> Record:
    """The run recorded at ``path``; a torn last line (the process died writing it) is skipped."""
    record = Record()
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, list):
                record.points.append(tuple(entry))
            elif "run" in entry:
                record.run = entry
            elif "params" in entry:
                record.params.update(entry["params"])
            elif "tags" in entry:
                record.tags.update(entry["tags"])
            elif "end" in entry:
                record.end = entry
    return record


def stored_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step of each metric the run holds in the store."""
    keys = client.get_run(run_id).data.metrics
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def missing(points: Iterable[Point], stored: Mapping[str, int]) -> list[Point]:
    """The points after the last one the store holds of their metric.

    The writer ships in journal order and stops at its first failure, so what a store holds of
    a run is a prefix of its journal, and this is exactly the rest.
    """
    return [point for point in points if point[3] > stored.get(point[0], -1)]


def replay(client: MlflowClient, run_id: str, record: Record, per_batch: int) -> int:
    """Write what the run is missing of ``record`` (params, tags, points); how many points were written."""
    from mlflow.entities import Metric, Param, RunTag

    have = client.get_run(run_id).data
    params = [Param(key, value) for key, value in record.params.items() if key not in have.params]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in record.tags.items()])
    todo = missing(record.points, stored_steps(client, run_id))
    for start in range(0, len(todo), per_batch):
        client.log_batch(run_id, metrics=[Metric(*point) for point in todo[start : start + per_batch]])
    return len(todo)
