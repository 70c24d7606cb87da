"""One policy window of a fleet and the distance of prediction distributions: what the
maintenance policy (:mod:`.policy`) computes each ``policy.interval_s``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgekit.host.controller.config import PolicySection

__all__ = ["Window", "distribution_shift"]

_EPS = 1e-4


@dataclass(frozen=True)
class Window:
    """One policy window of a fleet, for the model most of its devices run."""

    fleet: str
    model: str  # name:version
    sha256: str
    devices: int
    labels: int
    new_labels: int
    accuracy: float | None
    f1: float | None
    predictions: int
    confidence: float | None
    distribution: dict[str, float]
    estimated_accuracy: float | None = None
    estimated: int = 0  # predictions the estimate covers

    def metric(self, name: str) -> float | None:
        if name == "estimated_accuracy":
            return self.estimated_accuracy
        return self.accuracy if name == "accuracy" else self.f1

    def enough(self, settings: PolicySection) -> bool:
        """Whether the window has the data its metric needs to count."""
        if settings.metric == "estimated_accuracy":
            return self.estimated >= settings.min_estimated
        return self.labels >= settings.min_labels and self.new_labels > 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def distribution_shift(p: dict[str, float], q: dict[str, float], measure: str) -> float:
    """Total variation distance (``tv``, 0..1) or population stability index (``psi``)."""
    keys = set(p) | set(q)
    if measure == "tv":
        return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)
    total = 0.0
    for k in keys:
        a, b = max(p.get(k, 0.0), _EPS), max(q.get(k, 0.0), _EPS)
        total += (a - b) * math.log(a / b)
    return total
