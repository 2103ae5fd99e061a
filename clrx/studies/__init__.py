"""Studies of clrx itself: its speed against a hand-written loop (bench), its input pipelines'
rates (throughput) and the papers' claims at small scale (reproduce).

Each is a ``python -m clrx.studies.NAME`` command built on the core; nothing in the core imports them.
"""
