"""Errors that mean "the user asked for something that cannot work", as opposed to a bug.

The ``lit-llm`` command prints these as one ``error: ...`` line and exits with status 2; anything else keeps
its traceback, because it is a bug to report. Each is also a ``ValueError``, so callers of the Python API
can catch them as such.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the input: a missing or wrong file, a bad value, the wrong kind of checkpoint."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used here: not a lit_llm file, another config, the wrong stage."""


class DataError(UserError):
    """Data that cannot be used: malformed records, an empty dataset, a file of the wrong type."""


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint (or pretrained model) path that does not exist; ``path`` is the path as given, so the
    ``lit-llm`` command can say which command (and which course chapter) writes it."""

    def __init__(self, path: str | object, what: str = "checkpoint") -> None:
        self.path = str(path)
        super().__init__(f"{what} not found: {self.path}")
