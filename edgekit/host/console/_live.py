"""Notice changes in the fleet database so the pages can update themselves.

One thread polls a few cheap queries every ``interval`` seconds and compares their
fingerprints; a topic (``fleet``, ``events``, ``rollouts``, ``models``) whose fingerprint
moved gets a new version number. The server-sent-event stream of each open page checks
:meth:`ChangeFeed.moved_since` and tells the page which topics moved; the page then fetches
its data again. Polling the database (not the broker) sees every writer: this controller,
another controller sharing the database, or ``edgekit registry push``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from edgekit.host.db import Store

__all__ = ["TOPICS", "ChangeFeed"]

log = logging.getLogger("edgekit.console")

TOPICS = ("fleet", "events", "rollouts", "models")


class ChangeFeed:
    """Version numbers of the database's topics, moved by a polling thread."""

    def __init__(self, store: Store, *, interval: float = 0.5) -> None:
        self.store = store
        self.interval = interval
        self.version = 0
        self.changed: dict[str, int] = dict.fromkeys(TOPICS, 0)  # topic -> version it moved at
        self._prints: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ChangeFeed:
        self.poll()
        self._thread = threading.Thread(target=self._run, name="edgekit-console-feed",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a database hiccup must not end the live updates
                log.exception("console: polling the database failed")

    def _fingerprints(self) -> dict[str, Any]:
        store = self.store
        latest = store.list_events(limit=1, latest=True)
        active = store.list_rollouts(active=True)
        return {
            "fleet": [(d.fleet, d.device, d.online, d.model_version, d.last_seen, d.metrics_at)
                      for d in store.list_devices()],
            "events": latest[-1].id if latest else 0,
            "rollouts": [(r.id, r.state, r.current_wave, r.updated,
                          [(t.device, t.state) for t in store.list_rollout_targets(r.id)])
                         for r in active] + [len(store.list_rollouts(active=False))],
            "models": [(m.name, m.version, tuple(m.channels)) for m in store.list_models()],
        }

    def poll(self) -> list[str]:
        """Read the fingerprints once; return the topics that moved."""
        prints = self._fingerprints()
        moved = [t for t in TOPICS if prints[t] != self._prints.get(t)]
        self._prints = prints
        if moved:
            with self._lock:
                self.version += 1
                for topic in moved:
                    self.changed[topic] = self.version
        return moved

    def moved_since(self, seen: int) -> tuple[int, list[str]]:
        """The current version and the topics that moved after version ``seen``."""
        with self._lock:
            return self.version, [t for t, v in self.changed.items() if v > seen]
