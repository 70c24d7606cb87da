"""Accuracy estimated without labels, per telemetry interval (from confidence: ATC or CBPE).

Most field traffic never gets a label. A package whose manifest carries a calibration map
(``metrics.calibration``, fitted by the converter on labelled data;
:mod:`edgekit.calibration`) lets the agent turn each prediction's top-1 confidence into a
value of the map (for an ATC map, 1 at or above its threshold and 0 below; for an isotonic
one, the probability that it is right); the mean over the interval's predictions is the
estimated accuracy the metrics report beside the label-based figures. It runs on the telemetry thread,
from the confidences the interval's prediction section already computed: the request path
does nothing more. A package without the map gets no estimate.
"""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from edgekit.calibration import Calibration
from edgekit.errors import ArtifactError
from edgekit.protocol import EstimateSection

from ._model import LoadedModel

__all__ = ["estimate_section"]

log = logging.getLogger("device_agent.estimate")

# The parsed map of each loaded model (None: it has none, or a malformed one), read once.
_maps: weakref.WeakKeyDictionary[LoadedModel, Calibration | None] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def calibration_of(model: LoadedModel) -> Calibration | None:
    """The model's calibration map, or None when its package has none (or a malformed one:
    logged once; the model serves as before, only without an estimate)."""
    with _lock:
        if model in _maps:
            return _maps[model]
        try:
            found = Calibration.from_manifest(model.manifest.metrics)
        except ArtifactError as exc:
            log.warning("%s %s: no accuracy estimate: %s", model.name, model.version,
                        exc.message)
            found = None
        _maps[model] = found
        return found


def estimate_section(model: LoadedModel | None, confidence: np.ndarray | None
                     ) -> EstimateSection | None:
    """The interval's estimate from its predictions' top-1 confidences, or None without a
    model, a calibration map or predictions."""
    if model is None or confidence is None or len(confidence) == 0:
        return None
    calibration = calibration_of(model)
    if calibration is None:
        return None
    accuracy = calibration.estimate(confidence)
    if accuracy is None:
        return None
    return EstimateSection(accuracy=min(max(accuracy, 0.0), 1.0), count=int(len(confidence)))
