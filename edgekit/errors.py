"""Errors that edgekit raises, and the exit code each one maps to.

The tree::

    EdgekitError                exit 1, base of everything below
    ├── UsageError              exit 2, bad arguments or options
    │   └── ConfigError         a configuration key with a bad value
    ├── DataError               a data file (.npz) does not fit the model
    ├── ArtifactError           a .edgepkg that is missing, corrupt or unsafe
    │   └── SignatureError      signature missing, wrong or from an untrusted key
    ├── ModelError              a source model that is missing, corrupt or unsupported
    ├── ConversionError         an exporter or quantizer failed
    │   └── ValidationError     parity or accuracy outside the tolerances (``--strict``)
    ├── RuntimeBackendError     an inference runtime is missing or cannot load a model
    ├── InputError              a request whose inputs do not match the manifest
    ├── ProtocolError           an MQTT payload that is not JSON or does not fit its schema
    └── OutputWriteError        the output could not be written (full disk, permissions)

Every error carries a message that says what is wrong and, where it helps, a ``hint`` that
says what to do. The CLI prints it once and exits with ``exit_code``.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigError",
    "ConversionError",
    "DataError",
    "EdgekitError",
    "InputError",
    "ModelError",
    "OutputWriteError",
    "ProtocolError",
    "RuntimeBackendError",
    "SignatureError",
    "UsageError",
    "ValidationError",
]


class EdgekitError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def format(self) -> str:
        """The text the CLI prints: the message, then the hint on its own line."""
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message

    def __str__(self) -> str:
        return self.format()


class UsageError(EdgekitError):
    """Bad arguments or options."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key has a bad value; the message names the key."""


class DataError(EdgekitError):
    """A data file does not fit the model (keys, shapes, dtypes, labels)."""


class ArtifactError(EdgekitError):
    """A package that is missing, corrupt, too large or unsafe to unpack."""


class SignatureError(ArtifactError):
    """A signature that is missing, does not match, or comes from an untrusted key."""


class ModelError(EdgekitError):
    """A source model that is missing, corrupt or of an unsupported kind."""


class ConversionError(EdgekitError):
    """An exporter or quantizer failed on the model."""


class ValidationError(ConversionError):
    """The converted model is outside the parity or accuracy tolerances."""


class RuntimeBackendError(EdgekitError):
    """An inference runtime is missing, or cannot load or run a model."""


class InputError(EdgekitError):
    """Inputs of a request do not match the model's manifest."""


class ProtocolError(EdgekitError):
    """An MQTT payload that is not valid JSON, or does not fit its schema (see docs/protocol.md)."""


class OutputWriteError(EdgekitError):
    """An output file could not be written; nothing partial is left behind."""
