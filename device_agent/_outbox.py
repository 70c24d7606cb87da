"""Store and forward: telemetry waits in a bounded SQLite queue until the broker has it.

Every metrics, events and samples message is written here first, with its sequence number
taken in the same transaction, and deleted only when the broker acknowledged it (QoS 1).
So messages survive a broker outage and an agent restart, and go out in the order they
were made. Two bounds hold the queue: a number of messages and a number of bytes (topic
and payload of the queued messages; SQLite reuses the pages freed, so the file stays near
that size). Past either, the oldest are deleted and counted; the count is reported in every
metrics message, with the queue's depth and bytes. The same database keeps the agent's counters (sequence numbers, the MQTT
session number), so they grow across restarts.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import OutputWriteError

__all__ = ["Outbox", "QueuedMessage"]

DROPPED = "outbox.dropped"
# A message's size as the byte bound counts it: its topic and its payload.
_SIZE = "LENGTH(CAST(topic AS BLOB)) + LENGTH(payload)"


@dataclass(frozen=True)
class QueuedMessage:
    id: int
    topic: str
    payload: bytes


class Outbox:
    """The queue and the counters. Thread-safe; one connection behind a lock."""

    def __init__(self, path: Path, max_messages: int, max_bytes: int | None = None) -> None:
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: every commit is on disk before it returns. With NORMAL a power loss may
            # undo the last commits of the WAL, and a sequence or session number already
            # published would be handed out again (the host drops it as a duplicate).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY,"
                " value INTEGER NOT NULL)")
        except sqlite3.Error as exc:
            raise OutputWriteError(f"cannot open the telemetry queue {path}: {exc}",
                                   hint="check that the state folder is writable") from exc
        with self._lock:
            self._depth = self._count_locked()
            self._bytes = self._bytes_locked()

    @property
    def synchronous(self) -> int:
        """SQLite's ``synchronous`` level of the queue's connection (2: FULL)."""
        with self._lock:
            return int(self._db.execute("PRAGMA synchronous").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def next_value(self, name: str) -> int:
        """Increment a persistent counter and return its new value (the first is 1)."""
        with self._lock:
            return self._bump(name, 1)

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def put(self, topic: str, make_payload: Callable[[int], bytes], seq_name: str) -> int:
        """Queue a message whose payload carries the next value of counter ``seq_name``.

        ``make_payload(seq)`` builds the bytes; sequence number and row are written in one
        transaction, so numbers are contiguous in the queue. Returns the sequence number.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._bump(seq_name, 1)
                payload = make_payload(seq)
                self._db.execute("INSERT INTO outbox (topic, payload, created) VALUES (?, ?, ?)",
                                 (topic, payload, time.time()))
                self._depth += 1
                self._bytes += len(topic.encode("utf-8")) + len(payload)
                self._drop_oldest()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._depth = self._count_locked()
                self._bytes = self._bytes_locked()
                raise
        return seq

    def peek(self, after_id: int, limit: int) -> list[QueuedMessage]:
        """The oldest messages with an id above ``after_id``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall()
        return [QueuedMessage(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def remove(self, ids: list[int]) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with self._lock:
            size = self._db.execute(f"SELECT COALESCE(SUM({_SIZE}), 0) FROM outbox WHERE id IN"
                                    f" ({marks})", ids).fetchone()[0]
            cur = self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids)
            self._depth -= max(cur.rowcount, 0)
            self._bytes -= int(size)

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def bytes(self) -> int:
        """Bytes of the queued messages (topic and payload), what ``max_bytes`` bounds."""
        return self._bytes

    @property
    def dropped(self) -> int:
        return self.counter(DROPPED)

    def _bump(self, name: str, by: int) -> int:
        # No RETURNING: older SQLite builds (Debian bullseye ships 3.34) lack it.
        self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name)"
                         " DO UPDATE SET value = value + excluded.value", (name, by))
        row = self._db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(row[0])

    def _drop_oldest(self) -> None:
        """Delete the oldest messages while a bound is exceeded, and count them (inside the
        caller's transaction)."""
        excess = self._depth - self.max_messages
        over = 0 if self.max_bytes is None else self._bytes - self.max_bytes
        if excess <= 0 and over <= 0:
            return
        cut, freed, last = 0, 0, 0
        for row_id, size in self._db.execute(f"SELECT id, {_SIZE} FROM outbox ORDER BY id"):
            if cut >= excess and freed >= over:
                break
            cut, freed, last = cut + 1, freed + int(size), int(row_id)
        self._db.execute("DELETE FROM outbox WHERE id <= ?", (last,))
        self._bump(DROPPED, cut)
        self._depth -= cut
        self._bytes -= freed

    def _count_locked(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def _bytes_locked(self) -> int:
        return int(self._db.execute(f"SELECT COALESCE(SUM({_SIZE}), 0) FROM outbox")
                   .fetchone()[0])
