"""The input-pipeline benchmark runs end to end; its figures are measurements, its verdicts follow from them."""

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
    for row in report["rows"]:  # the verdict is the comparison of the two measured rates, in the file and printed
        assert row["keeps_up"] == (row["loading_images_per_s"] >= row["training_images_per_s"]), row
    assert [row["workers"] for row in report["rows"]][0] == 0  # in memory: no worker processes
    printed = capsys.readouterr().out
    for row in report["rows"]:
        assert f"{row['loading_images_per_s']:>15}{row['training_images_per_s']:>16}  " in printed
        assert ("yes" if row["keeps_up"] else "NO") in printed.split(row["pipeline"])[1].splitlines()[0]
