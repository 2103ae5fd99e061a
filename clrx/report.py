"""``python -m clrx.report SWEEP``: a sweep's summary, rebuilt from MLflow at any time.

python -m clrx.report multirun/2026-11-23/10-00-00.123456   # a sweep folder
python -m clrx.report 3f2a9c...                             # or its parent run's id

The table (jobs that differ only by seed pooled into one row, mean and sd) and the overlay figures
go to the sweep's folder (or reports/<id>) and onto the parent run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clrx.errors import ClrxError, user_errors
from clrx.tracking.report import markdown, report
from clrx.tracking.store import PARENT_FILE, default_uri, open_store, parent_run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clrx.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="a sweep folder (multirun/...) or the parent run's id")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: as python -m clrx uses)")
    args = parser.parse_args(argv)
    with user_errors("clrx.report"):
        client = open_store(args.tracking_uri or default_uri())
        folder = Path(args.sweep)
        parent = parent_run_id(folder) if folder.is_dir() else args.sweep
        if parent is None:
            raise ClrxError(f"{folder} holds no {PARENT_FILE} file: is it a clrx multirun folder?")
        try:
            client.get_run(parent)
        except Exception:
            raise ClrxError(f"no MLflow run {parent!r} in {client.tracking_uri}") from None
        out = folder if folder.is_dir() else Path("reports") / parent
        table, best = report(client, parent, out)
    print((f"{best}\n\n" if best else "") + markdown(table) if table else "the sweep has no job runs yet")
    print(f"summary in {out} and on run {parent}")


if __name__ == "__main__":
    main()
