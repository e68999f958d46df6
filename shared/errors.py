"""User-facing errors: one line that says what went wrong and what to do about it."""


class RestnetError(Exception):
    """An error caused by the user's input or environment, reported without a traceback.

    `hint` says what to do next; the CLI prints `error: <message> (<hint>)` and exits with `exit_code`.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(RestnetError):
    """A fleet config that is missing, malformed or inconsistent."""


class ModelError(RestnetError):
    """An unknown model name, unsupported family, missing checkpoint or unreachable model hub."""


class BudgetError(RestnetError):
    """A budget that no stitched variant fits."""


class IntegrityError(RestnetError):
    """An artifact whose bytes do not match their recorded sha256, or weights that are not what they claim."""
