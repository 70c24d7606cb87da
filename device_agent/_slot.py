"""The model in service: the one place where the agent switches models.

:class:`ModelSlot` holds the model in service twice: on disk (the model folder's
``active.json``, through :class:`~device_agent._store.ModelStore`) and in memory (a
:class:`Serving`). Every switch goes through it: :meth:`ModelSlot.activate` (a package given
by the embedding application or the command line), :meth:`ModelSlot.restore` (the start),
and the OTA updater's :meth:`ModelSlot.serve` (with a probation), :meth:`ModelSlot.end_probation`
(the new model stays) and :meth:`ModelSlot.rollback`.

A request reads :attr:`ModelSlot.serving` once and uses it to the end, so a switch is atomic
for requests: each one is answered wholly by the old model or wholly by the new one, and none
waits. During a probation the :class:`Serving` answers through the
:class:`~device_agent._probation.ProbationWatch` instead of the plain session call, so the
request path has no branch for it.

Listeners registered with :meth:`ModelSlot.on_swap` run after each change of model, in the
switching thread, with (old, new); a listener that raises is logged and does not undo the
switch. The status publisher and the quality window listen; so can a later part that wants
to know the model in service (a shadow evaluation of a candidate, for instance).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.artifact import open_package
from edgekit.errors import ArtifactError, EdgekitError
from edgekit.manifest import compare_versions
from edgekit.protocol import EventKind, EventLevel
from edgekit.protocol.ota import Probation
from edgekit.runtimes import RuntimeOptions

from ._model import LoadedModel, TrustPolicy, load_model
from ._probation import ProbationWatch
from ._store import ModelStore, StoredPackage

if TYPE_CHECKING:
    from ._events import EventSink

__all__ = ["ModelLoader", "ModelSlot", "Serving", "SwapListener"]

log = logging.getLogger("device_agent.model")

SwapListener = Callable[["LoadedModel | None", "LoadedModel"], None]
Answer = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ModelLoader:
    """How this device verifies and loads a package: its trust policy, runtime options and
    batch limit."""

    trust: TrustPolicy
    options: RuntimeOptions
    max_batch: int

    def load(self, path: str | Path) -> LoadedModel:
        """Raises: as :func:`~device_agent._model.load_model`."""
        return load_model(path, self.trust, self.options, max_batch=self.max_batch)


class Serving:
    """What a request needs of the model in service, read with one attribute load:
    ``answer``, built once per model, checks a request's inputs (the input validator's
    check, specialised to the model's inputs) and runs the checked feeds, returning both:
    through the session's own run function, or in a probation through the watch's
    :meth:`~device_agent._probation.ProbationWatch.answer` (which raises
    :class:`~device_agent._probation.AnsweredByPrevious` when the previous model answered)."""

    __slots__ = ("answer", "model")

    def __init__(self, model: LoadedModel, run: Answer | None = None) -> None:
        self.model = model
        self.answer = model.validator.answerer(
            run if run is not None else model.session.checked_runner())


class ModelSlot:
    """The model in service, on disk and in memory; see the module docstring."""

    def __init__(self, store: ModelStore, loader: ModelLoader) -> None:
        self.store = store
        self.loader = loader
        self.serving: Serving | None = None
        self.probation: ProbationWatch | None = None
        self._lock = threading.Lock()
        self._listeners: list[SwapListener] = []

    @property
    def current(self) -> LoadedModel | None:
        """The model in service (None until one is)."""
        serving = self.serving
        return serving.model if serving is not None else None

    def on_swap(self, listener: SwapListener) -> None:
        self._listeners.append(listener)

    def load(self, stored: StoredPackage) -> LoadedModel:
        """Raises: as :func:`~device_agent._model.load_model`."""
        return self.loader.load(stored.path)

    # ---------------------------------------------------------------- switches

    def serve(self, model: LoadedModel, probation: Probation | None = None,
              previous: LoadedModel | None = None) -> ProbationWatch | None:
        """Put ``model`` in service in memory (the disk is the caller's), watched by a
        probation when ``probation`` is given (``previous`` answers for it when it fails).
        Returns the probation's watch, or None."""
        watch = ProbationWatch(model, previous, probation) if probation is not None else None
        with self._lock:
            old = self.current
            self.probation = watch
            self.serving = Serving(model, watch.answer if watch is not None else None)
            if old is not model:
                for listener in self._listeners:
                    try:
                        listener(old, model)
                    except Exception:
                        log.exception("a model-swap listener failed")
        return watch

    def end_probation(self) -> None:
        """End the probation: the model in service keeps serving, unwatched (it passed, or
        there is nothing to go back to)."""
        with self._lock:
            if self.probation is None:
                return
            model = self.probation.new
            self.probation = None
            if self.serving is not None and self.serving.model is model:
                self.serving = Serving(model)

    def rollback(self, stored: StoredPackage, model: LoadedModel) -> None:
        """Put an earlier model back: active on disk (the model it replaces is not kept as
        a previous one), then in service.

        Raises:
            OutputWriteError: ``active.json`` cannot be written.
        """
        self.store.activate(stored, demote_current=False)
        self.serve(model)

    def activate(self, package: str | os.PathLike[str]) -> LoadedModel:
        """Verify and load a package, record it as active on disk, and put it in service.

        Raises:
            ArtifactError / SignatureError / RuntimeBackendError: the package is refused;
                the model in service stays.
        """
        stored = self.store.add(package)
        try:
            model = self.load(stored)
        except EdgekitError:
            self.store.discard(stored)
            raise
        self.store.activate(stored)
        self.serve(model)
        return model

    def restore(self, given: str, events: EventSink) -> None:
        """At the start: serve the model folder's active model, or the first earlier one that
        loads, or ``given`` (``model.package``) when it is newer; report what is missing.

        Raises:
            ArtifactError / SignatureError / RuntimeBackendError: ``given`` is refused.
        """
        try:
            record = self.store.active()
        except ArtifactError as exc:
            # Written atomically, so this takes a damaged disk or a hand edit; the folder's
            # packages are still there for the next update, and a given package still serves.
            events.event(EventKind.MODEL_LOAD_FAILED, EventLevel.ERROR, exc.message)
            record = None
        if given:
            manifest = open_package(given).manifest
            if record is None or compare_versions(manifest.version, record.active.version) > 0:
                self.activate(given)
                return
            log.info("the model folder's %s %s is not older than %s %s from model.package;"
                     " keeping it", record.active.name, record.active.version, manifest.name,
                     manifest.version)
        if record is None:
            events.event(EventKind.MODEL_MISSING, EventLevel.WARNING,
                         "no model is active; waiting for one to be deployed")
            return
        for i, candidate in enumerate((record.active, *record.previous)):
            try:
                model = self.load(candidate)
            except EdgekitError as exc:
                events.event(EventKind.MODEL_LOAD_FAILED, EventLevel.ERROR,
                             f"{candidate.name} {candidate.version} does not load:"
                             f" {exc.message}", data={"package": candidate.path.name})
                continue
            if i > 0:
                # The active model is broken: the last known good one becomes active on disk
                # too, so what the folder says and what serves agree.
                self.rollback(candidate, model)
            else:
                self.serve(model)
            return
        events.event(EventKind.MODEL_MISSING, EventLevel.ERROR,
                     "no model in the model folder loads; waiting for one to be deployed")

    def stored_serving(self) -> StoredPackage | None:
        """The model folder's package of the model in service."""
        current = self.current
        if current is None:
            return None
        try:
            record = self.store.active()
        except ArtifactError:
            record = None
        if record is not None:
            for stored in (record.active, *record.previous):
                if stored.sha256 == current.sha256:
                    return stored
        return StoredPackage(current.path, current.sha256, current.name, current.version)
