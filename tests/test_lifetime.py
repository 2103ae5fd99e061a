"""The collector in a clrx command: off while torch and MLflow load, never over them afterwards nor at exit."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.conftest import ROOT

# A module whose import makes garbage enough for several collections, and counts those that run meanwhile.
HEAVY = """
import gc
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
for _ in range(200_000):
    cycle = []
    cycle.append(cycle)
gc.callbacks.clear()
built = object.__new__(type("Built", (), {}))
"""


def _python(tmp_path: Path, script: str) -> str:
    (tmp_path / "heavy.py").write_text(HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_a_module_loads_without_collections_and_stays_out_of_later_ones(tmp_path):
    out = _python(
        tmp_path,
        """
        import gc
        from clrx.lifetime import load
        heavy = load("heavy")
        frozen = gc.get_freeze_count()
        tracked = {id(o) for o in gc.get_objects()}
        again = load("heavy")
        later = []
        print(heavy.collections, gc.isenabled(), frozen > 0, id(heavy.built.__class__) in tracked,
              id(later) in {id(o) for o in gc.get_objects()}, again is heavy, gc.get_freeze_count() == frozen)
        """,
    )
    # No collection while it loaded; the collector is on again; what it made is frozen, what came later is not;
    # loading it again freezes nothing more.
    assert out.split() == ["[]", "True", "True", "False", "True", "True", "True"]


def test_a_plain_import_collects_which_is_what_load_spares(tmp_path):
    out = _python(tmp_path, "import heavy; print(len(heavy.collections) > 0)")
    assert out.strip() == "True"


def test_a_program_that_turned_the_collector_off_keeps_it_off(tmp_path):
    out = _python(
        tmp_path,
        """
        import gc
        gc.disable()
        from clrx.lifetime import load
        load("heavy")
        print(gc.isenabled(), gc.get_freeze_count())
        """,
    )
    assert out.split() == ["False", "0"]


EXIT = """
import os
from clrx.lifetime import no_collection_at_exit

class Noisy:
    def __del__(self):
        os.write(1, b"collected")

noisy = Noisy()
noisy.itself = noisy  # a cycle: only a collection frees it, the one at exit included
{call}
"""


def test_the_command_leaves_without_the_collection_at_exit(tmp_path):
    assert _python(tmp_path, EXIT.format(call="")) == "collected"  # what the interpreter does by itself
    assert _python(tmp_path, EXIT.format(call="no_collection_at_exit()")) == ""


def test_a_process_age_is_no_more_than_the_time_since_it_was_started(tmp_path):
    """A run's startup_seconds: within the wall time its command took up to there, not a rounded boot time off."""
    started = time.perf_counter()
    age = float(_python(tmp_path, "from clrx.lifetime import process_age; print(process_age())"))
    tick = 1 / os.sysconf("SC_CLK_TCK")  # the kernel counts a process's start in clock ticks
    assert 0 < age <= time.perf_counter() - started + tick
