"""Typed errors. Each names the offending field, file, line or tensor so a user can fix it."""


class NanoseekError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""


class ConfigError(NanoseekError, ValueError):
    """An invalid or unreadable model configuration (names the field and, when known, the file)."""


class CheckpointError(NanoseekError):
    """A checkpoint that cannot be read or written (names the file and the tensor)."""


class DataError(NanoseekError, ValueError):
    """Bad training or evaluation data (names the file and line)."""
