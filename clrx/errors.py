"""Errors that reach the user as one line instead of a traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException


class ClrxError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


class ConfigError(ClrxError, ValueError):
    """A setting has a value that clrx cannot use; names the setting and what is allowed."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # raised again in the process that reads it
        return type(self), (self.setting, self.problem)

    def within(self, group: str) -> ConfigError:
        """The same error with the setting's full dotted key."""
        return ConfigError(f"{group}.{self.setting}", self.problem)


def check_positive_whole(setting: str, value: object, unit: str = "") -> None:
    """Counts (steps, images, pixels) must be positive integers; booleans are not counts."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(setting, f"must be a positive whole number{unit}, got {value!r}")


class TrainingDiverged(ClrxError):
    """The loss stopped being finite; the run is marked FAILED with this reason."""


class ProcessLost(ClrxError):
    """A process of a multi-process launch died or lost its connection; the run is marked FAILED with this reason."""


class Stopped(BaseException):
    """A signal asked the run to stop: not an error, so nothing catches it on the way out but the CLI."""

    def __init__(self, signum: int, step: int | None = None, resume_dir: Path | None = None) -> None:
        self.signum, self.step, self.resume_dir = signum, step, resume_dir
        super().__init__(signum, step, resume_dir)

    @property
    def status(self) -> int:
        """The shell's convention for a process ended by a signal."""
        return 128 + self.signum

    def __str__(self) -> str:
        where = "" if self.step is None else f" at step {self.step}"
        return f"stopped by {signal.Signals(self.signum).name}{where}"

    def message(self) -> str:
        """What the CLI prints: where it stopped and, if a checkpoint was written, how to go on."""
        if self.resume_dir is None:
            return str(self)
        return f"{self}; resume with trainer.resume=auto hydra.run.dir={self.resume_dir}"


USER_ERRORS = (HydraException, OmegaConfBaseException, ClrxError)


def one_line(error: BaseException) -> str:
    """The useful part of a clrx, Hydra or OmegaConf error, on one line."""
    reason: BaseException | None = error
    while reason is not None and not isinstance(reason, ClrxError):  # one raised while resolving the config
        reason = reason.__cause__ or reason.__context__
    if reason is not None:
        return str(reason)
    if isinstance(error, MissingConfigException) and error.options is not None:
        group, _, choice = (error.missing_cfg_file or "").rpartition("/")
        return f"{group}={choice} is not available; choose one of: {', '.join(sorted(error.options))}"
    parts = [" ".join(line.strip() for line in str(error).splitlines()[:2] if line.strip())]
    if isinstance(error.__cause__, OmegaConfBaseException):
        parts.append(str(error.__cause__).splitlines()[0])
    return ": ".join(part for part in parts if part) or type(error).__name__


def exit_with(program: str, message: str, status: int) -> NoReturn:
    # SystemExit passes Hydra's job runner untouched: no traceback, no "Error executing job".
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(status)


@contextmanager
def user_errors(program: str) -> Iterator[None]:
    """A command's body: a mistake in its settings ends as one line on stderr and exit status 2."""
    try:
        yield
    except USER_ERRORS as error:
        exit_with(program, one_line(error), 2)
