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
