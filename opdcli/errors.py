"""One exception hierarchy for everything a user can get wrong.

`opdcli.cli` catches `OpdError`, prints its message on one line to stderr and exits with code 2.
Every error also subclasses the stdlib type it replaces, so library callers can catch either.
Messages state what is wrong, the offending value, and what to do about it.
"""

from __future__ import annotations


class OpdError(Exception):
    """Base class of all user-facing errors."""


class ConfigError(OpdError, ValueError):
    """A config file, key, value or flag combination is invalid."""


class DataError(OpdError, ValueError):
    """A dataset or prompt source is missing, empty or malformed."""


class ModelError(OpdError, ValueError):
    """A model or tokenizer cannot be loaded, or two models are incompatible."""


class RecordError(OpdError, ValueError):
    """A rollouts.jsonl record does not follow the schema."""


class CheckpointError(OpdError, ValueError):
    """A checkpoint directory is missing or incomplete."""


class MethodNotFoundError(ConfigError, KeyError):
    """An unknown method name was requested."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class BenchmarkNotFoundError(ConfigError, KeyError):
    """An unknown benchmark name was requested (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class EngineError(OpdError, RuntimeError):
    """An inference engine or a model endpoint cannot be reached or answers with an error."""


class NonFiniteError(OpdError, ArithmeticError):
    """A training step met a non-finite teacher signal, loss or gradient (train.on_nonfinite=stop)."""
