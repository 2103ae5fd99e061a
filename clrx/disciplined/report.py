"""The procedure's report: each stage's outcome, rule, table and overlay figure, and the command that repeats
the last run; written as markdown next to the figures and attached to the parent run under ``report/``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from clrx.disciplined.procedure import StageReport
from clrx.tracking.report import markdown, overlay

if TYPE_CHECKING:
    from mlflow import MlflowClient

NAME = "disciplined.md"


def command(args: list[str]) -> str:
    """The shell command that trains the last run by hand."""
    return "python -m clrx " + " ".join(shlex.quote(arg) for arg in args)


def write(client: MlflowClient, parent: str, stages: list[StageReport], budget: list[str], last: str, out: Path) -> str:
    """Write the report and its figures to ``out``, attach them to ``parent``; the markdown text."""
    out.mkdir(parents=True, exist_ok=True)
    text = "# The disciplined approach (arXiv 1803.09820, section 5)\n\nBudget estimate:\n\n```\n"
    text += "\n".join(budget) + "\n```\n"
    for number, stage in enumerate(stages, 1):
        text += f"\n## {stage.title}\n\n**{stage.outcome}**\n"
        if stage.rule:
            text += f"\nRule: {stage.rule}\n"
        if stage.rows:
            text += "\n" + markdown(stage.rows)
        if stage.run_ids:
            figure = f"stage{number}.png"
            runs = [client.get_run(run_id) for run_id in stage.run_ids]
            drawn = overlay(client, runs)
            if len(runs) == 1:  # a lone run is labelled by its name, not by its every override
                for line in drawn.axes[0].get_lines():
                    line.set_label(runs[0].info.run_name)
                drawn.axes[0].legend(fontsize="small")
            drawn.savefig(out / figure)
            text += f"\n![{stage.title}]({figure})\n"
            client.log_artifact(parent, str(out / figure), "report")
    text += f"\n## The last run, by hand\n\n```\n{last}\n```\n"
    (out / NAME).write_text(text)
    client.log_artifact(parent, str(out / NAME), "report")
    return text
