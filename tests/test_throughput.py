"""The input-pipeline benchmark runs end to end (its figures are not asserted: they are measurements)."""

import json

from clrx.studies.throughput import main


def test_throughput_reports_both_pipelines(tmp_path, data_root, capsys):
    out = tmp_path / "throughput.json"
    main(
        [
            "trainer.batch_size=8",
            "--folder",
            str(data_root / "folder"),
            "--image-size",
            "24",
            "--batches",
            "2",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert [row["pipeline"] for row in report["rows"]] == ["in memory, 32x32", "image folder, 24px"]
    assert all(row["loading_images_per_s"] > 0 and row["training_images_per_s"] > 0 for row in report["rows"])
    assert "keeps up" in capsys.readouterr().out
