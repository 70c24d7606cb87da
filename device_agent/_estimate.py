"""Accuracy estimated without labels, per telemetry interval (CBPE: the mean of each
prediction's estimated chance of being right).

Most field traffic never gets a label. A package whose manifest carries an accuracy
estimate (``metrics.calibration``, fitted by the converter on labelled data;
:mod:`edgekit.calibration`) lets the agent turn each prediction's output row into the chance
that its top-1 class is right: a logistic model of the row's features (the converter's
default), or a map of its top-1 confidence (for an ATC map, 1 at or above its threshold and 0
below; for an isotonic one, the probability that it is right). The mean over the interval's
predictions is the estimated accuracy the metrics report beside the label-based figures. It
runs on the telemetry thread, from the output rows the interval already keeps for its
prediction section (a few dozen numbers per row): the request path does nothing more. A
package without an estimate gets none.
"""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from edgekit.calibration import Estimator, estimator_from_manifest
from edgekit.errors import ArtifactError
from edgekit.protocol import EstimateSection

from ._model import LoadedModel

__all__ = ["estimate_section", "estimator_of"]

log = logging.getLogger("device_agent.estimate")

# The parsed estimate of each loaded model (None: it has none, or a malformed one), read once.
_estimators: weakref.WeakKeyDictionary[LoadedModel, Estimator | None] = \
    weakref.WeakKeyDictionary()
_lock = threading.Lock()


def estimator_of(model: LoadedModel) -> Estimator | None:
    """The model's accuracy estimate, or None when its package has none (or a malformed
    one: logged once; the model serves as before, only without an estimate)."""
    with _lock:
        if model in _estimators:
            return _estimators[model]
        try:
            found = estimator_from_manifest(model.manifest.metrics)
        except ArtifactError as exc:
            log.warning("%s %s: no accuracy estimate: %s", model.name, model.version,
                        exc.message)
            found = None
        _estimators[model] = found
        return found


def estimate_section(model: LoadedModel | None, rows: np.ndarray | None
                     ) -> EstimateSection | None:
    """The interval's estimate from its predictions' ``[N, C]`` output rows, or None without
    a model, an estimate in its package or predictions (or rows of another width than it was
    fitted on: another model's, around a swap)."""
    if model is None or rows is None or len(rows) == 0:
        return None
    estimator = estimator_of(model)
    if estimator is None:
        return None
    accuracy = estimator.estimate_scores(rows)
    if accuracy is None:
        return None
    return EstimateSection(accuracy=min(max(accuracy, 0.0), 1.0), count=int(len(rows)))
