"""The disciplined approach (Smith 2018, section 5) as one command: ``python -m clrx.disciplined``.

Pure decision rules (rules), the stages as child runs of one parent (procedure), the report (report).
"""
