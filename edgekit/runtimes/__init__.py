"""Inference runtimes behind one small interface, one module per backend.

A backend registers itself with :func:`register`; a missing SDK (onnxruntime, LiteRT) drops
that backend with a note that :func:`availability` reports (``edgekit doctor`` prints it).
"""

from __future__ import annotations

from edgekit.runtimes import litert as _litert  # noqa: F401  (registers the backend)
from edgekit.runtimes import onnxrt as _onnxrt  # noqa: F401  (registers the backend)
from edgekit.runtimes._base import (
    BackendInfo,
    RuntimeBackend,
    RuntimeOptions,
    Session,
    availability,
    backend_for,
    load_session,
    register,
)

__all__ = [
    "BackendInfo",
    "RuntimeBackend",
    "RuntimeOptions",
    "Session",
    "availability",
    "backend_for",
    "load_session",
    "register",
]
