"""Why an update stops: :class:`UpdateFailure` carries the reason code events report.

::

    EdgekitError
    └── UpdateFailure      an update step refused the model; ``reason`` is an UpdateReason
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import EdgekitError
from edgekit.protocol.ota import UpdateReason

__all__ = ["UpdateFailure"]


class UpdateFailure(EdgekitError):
    """An update step refused the model, or could not go on; the model in service stays."""

    def __init__(self, reason: UpdateReason, message: str, *, hint: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
        self.details = details or {}
