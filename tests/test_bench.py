"""The speed benchmark still runs end to end (its figures are read by people, not asserted)."""

import json

from clrx.studies.bench import main


def test_bench_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["--block", "2", "--repeats", "1", "--out", str(tmp_path / "bench.json"), "trainer.batch_size=32"])
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in (
        "reference_ms_per_step",
        "clrx_ms_per_step",
        "untracked_ms_per_step",
        "tracking_ratio_paired_median",
        "logging_cpu_us_per_step",
        "store_write_us_per_step",
        "ratio",
        "logging_us_per_step",
        "range_test_seconds_100_steps",
        "startup_seconds",
        "peak_rss_mb",
    ):
        assert figures[key] > 0, key
