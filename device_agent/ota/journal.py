"""The update journal: where an update stands, on disk, so a restart finishes or undoes it.

One JSON file, ``<state_dir>/ota/journal.json``, replaced atomically (temporary file, fsync,
rename, fsync of the folder) at every step. It holds the update in progress (``current``),
and the outcome of recent deployments (so a retained desired document that failed is not
tried again on every reconnect). The replay high-water mark and the version floor are kept
apart, in ``trust.json`` (:mod:`device_agent.ota.intent`). docs/ota.md says what a restart does at each step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgekit.fsutil import atomic_write

__all__ = ["HISTORY_SIZE", "JournalStep", "OtaJournal", "UpdateRecord"]

log = logging.getLogger("device_agent.ota")

JOURNAL_SCHEMA = "edgekit.protocol.ota-journal/1"
HISTORY_SIZE = 50


class JournalStep(StrEnum):
    """Where an update stands on disk. ``activating`` is written before the switch of
    ``active.json`` and ``probation`` after the in-memory swap; ``rolling_back`` before the
    switch back."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    ACTIVATING = "activating"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"


@dataclass
class UpdateRecord:
    """The update in progress."""

    deployment: str
    desired: dict[str, Any]  # the DesiredDocument being carried out
    step: str = JournalStep.QUEUED.value
    offset: int = 0  # bytes of the partial download that are on disk (synced)
    source: str | None = None  # mqtt | http | kept
    package: str | None = None  # the downloaded (or kept) package, relative to the model folder
    sha256: str | None = None  # of that package, once it is whole
    previous: dict[str, str] | None = None  # StoredPackage.to_dict of the model it replaces
    started: float = field(default_factory=time.time)
    activated: float | None = None
    reason: str | None = None  # why a rollback started (rolling_back)
    verify_attempts: int = 0  # starts of verification (a crash loop there ends the update)


@dataclass
class Outcome:
    deployment: str
    outcome: str  # UpdateStep: succeeded | failed | rolled_back
    reason: str | None
    message: str
    model: dict[str, Any]
    ts: float


class OtaJournal:
    """The journal file; every change is written through at once (fsync)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.current: UpdateRecord | None = None
        self.history: list[Outcome] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Written atomically, so this is damage from outside; keep it for a look, start
            # afresh (the model folder's record still says what serves).
            aside = self.path.with_suffix(f".broken-{int(time.time())}")
            log.error("the update journal %s is unreadable (%s); moved to %s", self.path, exc,
                      aside.name)
            self.path.replace(aside)
            return
        try:
            if doc.get("schema") != JOURNAL_SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}")
            current = doc.get("current")
            self.current = UpdateRecord(**current) if current else None
            self.history = [Outcome(**o) for o in doc.get("history", [])]
        except (TypeError, ValueError, AttributeError) as exc:
            log.error("the update journal %s is malformed (%s); starting afresh", self.path, exc)
            self.current, self.history = None, []

    def save(self) -> None:
        """Write the journal atomically.

        Raises:
            OutputWriteError: the disk is full or not writable (the old journal stays).
        """
        # Written about once a MiB during a download: no deep copies (the fields are plain
        # JSON values already) and the C encoder (compact; an indent would take the slow one).
        doc = {
            "schema": JOURNAL_SCHEMA,
            "current": vars(self.current) if self.current else None,
            "history": [vars(o) for o in self.history[-HISTORY_SIZE:]],
        }
        with atomic_write(self.path) as handle:
            handle.write(json.dumps(doc, separators=(",", ":")).encode("utf-8"))

    def begin(self, record: UpdateRecord) -> None:
        self.current = record
        self.save()

    def step(self, step: JournalStep, **changes: Any) -> None:
        """Record that the current update reached ``step`` (and other field changes)."""
        assert self.current is not None
        self.current.step = step.value
        for key, value in changes.items():
            setattr(self.current, key, value)
        self.save()

    def progress(self, offset: int) -> None:
        assert self.current is not None
        self.current.offset = offset
        self.save()

    def finish(self, outcome: str, reason: str | None, message: str,
               model: dict[str, Any]) -> Outcome:
        """Close the current update and keep its outcome in the history."""
        assert self.current is not None
        deployment, self.current = self.current.deployment, None
        return self.record(deployment, outcome, reason, message, model)

    def record(self, deployment: str, outcome: str, reason: str | None, message: str,
               model: dict[str, Any]) -> Outcome:
        """Record the outcome of a deployment that never became the current update (already
        served, or refused on sight), leaving the current update alone."""
        entry = Outcome(deployment, outcome, reason, message, model, time.time())
        self.history = [o for o in self.history if o.deployment != deployment][-HISTORY_SIZE + 1:]
        self.history.append(entry)
        self.save()
        return entry

    def outcome_of(self, deployment: str) -> Outcome | None:
        return next((o for o in reversed(self.history) if o.deployment == deployment), None)

    @property
    def last(self) -> Outcome | None:
        return self.history[-1] if self.history else None
