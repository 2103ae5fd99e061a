"""Everything that leaves a run for MLflow: the store and its writer thread (store), the sweep's
parent and child runs (sweep), summaries read back from the store (report) and figures (plots).

The core reaches MLflow only through this package.
"""
