"""Checkpoint files a run resumes from, written so that a crash never leaves a torn one.

A checkpoint is one ``torch.save`` file written under a temporary name and renamed into place.
It holds only tensors and plain Python values (random generator states included), so it loads
with ``weights_only=True``: resuming never unpickles arbitrary objects.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clrx.errors import ConfigError

FORMAT = 1
DIRECTORY = "checkpoints"
NAME = re.compile(r"step-(\d+)\.pt")
BEST = "best.pt"  # beside the step-*.pt checkpoints; never resumed from, never pruned
DECAY = "decay.pt"  # trainer.checkpoint_at_decay: where a WSD decay starts; resumed from by name, never pruned
log = logging.getLogger("clrx")


def rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and plain values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    kind, keys, position, has_gauss, gauss = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def asked_for(trainer: Any) -> bool:
    """Whether a run writes checkpoints: only when asked, since each pauses training to copy and write state.

    ``trainer.checkpoint_epochs``, ``trainer.checkpoint_every`` or ``trainer.resume`` ask for them
    (a run started with ``resume=auto`` can be resumed); ``trainer.keep_last=0`` turns them off.
    """
    asked = trainer.checkpoint_epochs or trainer.checkpoint_every > 0 or trainer.resume is not None
    return asked and trainer.keep_last > 0


def path_for(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def write_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` under a temporary name, then rename: a crash leaves the old file or none, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def save(payload: dict[str, Any], path: Path, keep_last: int) -> None:
    """Write ``payload`` atomically, then delete all but the ``keep_last`` newest checkpoints."""
    write_atomically({"format": FORMAT, **payload}, path)
    for old in _newest_first(path.parent)[keep_last:]:
        old.unlink(missing_ok=True)


def save_best(weights: dict[str, torch.Tensor], path: Path, best: dict[str, Any]) -> None:
    """The weights of the best evaluation so far, with what made them best (metric, value, step, epoch)."""
    write_atomically({"format": FORMAT, "model": weights, "best": best}, path)


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's contents; an unreadable or foreign file is a ConfigError naming it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        reason = reason.split(". ")[0][:200]
        raise ConfigError("trainer.resume", f"checkpoint {path} cannot be read ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError("trainer.resume", f"{path} is not a clrx checkpoint (format {FORMAT})")
    if "best" in payload:
        raise ConfigError(
            "trainer.resume", f"{path} holds a run's best weights only; resume from a step-*.pt checkpoint"
        )
    return payload


def _newest_first(directory: Path) -> list[Path]:
    found = [(int(match[1]), path) for path in directory.glob("step-*.pt") if (match := NAME.fullmatch(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def find(resume: str | None, output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``trainer.resume`` names, loaded, or None to start afresh.

    ``auto`` takes the newest readable checkpoint in this run's directory (none yet: start
    afresh); a directory takes its newest readable one; a file must itself be readable. A newer
    checkpoint that cannot be read is reported and passed over for the one before it.
    """
    if resume is None:
        return None
    if resume == "auto":
        directory = output_dir / DIRECTORY
        if not directory.is_dir():
            return None
    else:
        directory = Path(resume).expanduser()
        if not directory.exists():
            raise ConfigError("trainer.resume", f"{directory} does not exist; give a checkpoint, its folder or auto")
        if directory.is_file():
            return directory, load(directory)
        directory = directory / DIRECTORY if (directory / DIRECTORY).is_dir() else directory
    candidates = _newest_first(directory)
    for path in candidates:
        try:
            return path, load(path)
        except ConfigError as error:
            log.warning("%s; trying the checkpoint before it", error.problem)
    if resume == "auto" and not candidates:
        return None
    raise ConfigError("trainer.resume", f"no readable checkpoint (step-*.pt) in {directory}")
