"""``python -m clrx.sync RUN_DIR [--tracking-uri URI]``: replay a run's journal into an MLflow store.

After a store failure the run's end already replays what it can; this finishes the job once the
store answers again. Given another store (``--tracking-uri``), it copies the run there: record
offline into a local SQLite file, sync to a server later. Running it twice writes nothing twice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from clrx.errors import ConfigError, user_errors
from clrx.tracking.journal import NAME, Record, read, replay
from clrx.tracking.store import METRICS_PER_BATCH, experiment_id, open_store

SYNCED_FROM = "clrx.synced_from"  # on a copy in another store: the id the run had where it was recorded


def _target_run(client: MlflowClient, record: Record) -> str:
    """The run's id in ``client``'s store: its own, an earlier copy's, or a new copy's."""
    run_id = record.run["run"]
    try:
        return client.get_run(run_id).info.run_id
    except Exception:
        pass
    experiment = experiment_id(client, record.run["experiment"])
    copies = client.search_runs([experiment], f"tags.`{SYNCED_FROM}` = '{run_id}'", max_results=1)
    if copies:
        return copies[0].info.run_id
    return client.create_run(experiment, run_name=record.run.get("name"), tags={SYNCED_FROM: run_id}).info.run_id


def sync(run_dir: Path, uri: str | None = None) -> tuple[str, int]:
    """Replay ``run_dir``'s journal into ``uri`` (default: the store it was recorded for); (run id, points written)."""
    path = run_dir / NAME
    if not path.is_file():
        raise ConfigError("run_dir", f"{run_dir} holds no {NAME}; give the folder of a clrx run")
    record = read(path)
    if not record.run:
        raise ConfigError("run_dir", f"{path} does not name its run; it is not a clrx journal")
    uri = uri or record.run["uri"]
    client = open_store(uri)
    try:
        run_id = _target_run(client, record)
        written = replay(client, run_id, record, METRICS_PER_BATCH)
        if record.end is not None:
            if record.end.get("reason"):
                client.set_tag(run_id, "clrx.failure", record.end["reason"])
            client.set_terminated(run_id, record.end["end"])
    except Exception as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ConfigError("tracking.uri", f"the MLflow store {uri} refused the run's data: {reason[:300]}") from None
    return run_id, written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clrx.sync", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a clrx run's folder (its hydra.run.dir)")
    parser.add_argument("--tracking-uri", help="the store to write to (default: the one the run was recorded for)")
    args = parser.parse_args(argv)
    with user_errors("clrx.sync"):
        run_id, written = sync(args.run_dir, args.tracking_uri)
    print(f"clrx.sync: run {run_id}: {written} points written", file=sys.stderr)


if __name__ == "__main__":
    main()
