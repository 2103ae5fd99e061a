"""Errors that reach the user as one line instead of a traceback."""


class ClrxError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


class ConfigError(ClrxError, ValueError):
    """A setting has a value that clrx cannot use; names the setting and what is allowed."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")

    def within(self, group: str) -> "ConfigError":
        """The same error with the setting's full dotted key."""
        return ConfigError(f"{group}.{self.setting}", self.problem)


class TrainingDiverged(ClrxError):
    """The loss stopped being finite; the run is marked FAILED with this reason."""
