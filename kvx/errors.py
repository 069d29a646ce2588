"""Errors that name the offending field and what is allowed."""


class KVXError(Exception):
    """Base class of every error kvx raises on purpose."""


class ConfigError(KVXError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class DataError(KVXError, ValueError):
    """A data file is missing, empty or malformed."""


class UnsupportedModelError(KVXError, ValueError):
    """The engine cannot drive this model architecture."""


INTERRUPTED = "kvx: interrupted; the run was not recorded"  # run.py's line on Ctrl-C (exit status 130)
AMBIGUOUS_ONE = "1.0 is ambiguous (one token, or all of them?): write 1 for one token or a fraction below 1"

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Print `kvx: warning: <message>` on stderr, once per process for each distinct message."""
    import sys

    if message not in _WARNED:
        _WARNED.add(message)
        print(f"kvx: warning: {message}", file=sys.stderr)
