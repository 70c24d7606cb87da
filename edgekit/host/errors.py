"""Errors of the host side (database and rollout ownership).

The tree (under :class:`edgekit.errors.EdgekitError`)::

    EdgekitError
    └── StoreError          exit 1, the database cannot be reached or refused an operation
        └── LeaseLostError  this controller no longer owns the rollout it tried to change

Wrong arguments (an unknown rollout, a transition that is not allowed) are
:class:`edgekit.errors.UsageError`; a package that conflicts with the registry is
:class:`edgekit.errors.ArtifactError`.
"""

from __future__ import annotations

from edgekit.errors import EdgekitError

__all__ = ["LeaseLostError", "StoreError"]


class StoreError(EdgekitError):
    """The database cannot be reached, or refused an operation."""


class LeaseLostError(StoreError):
    """The rollout's lease expired and another controller took it, or it was released."""
