"""How the agent's errors reach a client: protocol error codes and HTTP statuses.

The agent raises errors of edgekit's tree (:mod:`edgekit.errors`) and one of its own::

    EdgekitError
    ├── InputError          inputs that do not fit the manifest  -> invalid_input, 422
    ├── ProtocolError       a payload that is not JSON / schema   -> bad_request, 400
    ├── RuntimeBackendError the runtime failed                    -> internal, 500
    └── RequestError        any other refusal; carries its code   -> its code and status

:func:`describe` maps any exception to (code, HTTP status, message) so the HTTP and MQTT
front ends answer the same thing for the same failure.
"""

from __future__ import annotations

from edgekit.errors import EdgekitError, InputError, ProtocolError, RuntimeBackendError
from edgekit.protocol import ErrorCode

__all__ = ["RequestError", "describe"]

_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.INVALID_INPUT: 422,
    ErrorCode.NO_MODEL: 503,
    ErrorCode.BUSY: 503,
    ErrorCode.UNKNOWN_PREDICTION: 404,
    ErrorCode.ALREADY_LABELLED: 409,
    ErrorCode.UNSUPPORTED: 422,
    ErrorCode.INTERNAL: 500,
}


class RequestError(EdgekitError):
    """A request the agent refuses, with the protocol code that says why."""

    def __init__(self, code: ErrorCode, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


def describe(exc: BaseException) -> tuple[ErrorCode, int, str]:
    """The error code, HTTP status and message a client gets for ``exc``."""
    if isinstance(exc, RequestError):
        code = exc.code
    elif isinstance(exc, InputError):
        code = ErrorCode.INVALID_INPUT
    elif isinstance(exc, ProtocolError):
        code = ErrorCode.BAD_REQUEST
    else:
        code = ErrorCode.INTERNAL
    if isinstance(exc, RuntimeBackendError | RequestError | InputError | ProtocolError):
        message = exc.format()
    else:
        message = f"internal error ({type(exc).__name__}); the agent log has the details"
    return code, _STATUS[code], message
