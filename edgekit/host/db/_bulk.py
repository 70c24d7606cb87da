"""Bulk writes of the fleet store's hottest path, a batch of metrics messages, with the
driver's own parameters: SQLAlchemy's per-value type processing cost more than the
database's work here (``Store.record_metrics_batch`` calls these for every batch).

``pg`` selects PostgreSQL's placeholders and types; otherwise SQLite's. Values are written
as the ORM types would write them (:func:`_bind_time`, :func:`~edgekit.host.db._engine.json_text`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import fields
from typing import Any

from sqlalchemy.engine import Connection

from edgekit.host.db._engine import json_text
from edgekit.host.db._records import MetricsSummary
from edgekit.host.db._schema import DeviceRow, MetricRow

__all__ = ["insert_metric_rows", "upsert_device_figures"]


def upsert_device_figures(
        conn: Connection, pg: bool, last_seen: dict[tuple[str, str], dt.datetime],
        newest: dict[tuple[str, str], tuple[int, int, dt.datetime, MetricsSummary]]) -> None:
    """Create the devices not known yet, move ``last_seen`` forward, and replace the
    summary where the batch's message is newer by (session, seq) than the stored one:
    one INSERT ... ON CONFLICT DO UPDATE per 500 devices, driver-level parameters."""
    mark = "%s" if pg else "?"
    names = [f.name for f in fields(MetricsSummary)]
    columns = ["fleet", "device_id", "online", "session_seq", "first_seen", "last_seen",
               "metrics_session", "metrics_seq", "metrics_at", *names]
    table = DeviceRow.__tablename__
    newer = (f"excluded.metrics_session IS NOT NULL AND ({table}.metrics_session IS NULL"
             f" OR {table}.metrics_session < excluded.metrics_session"
             f" OR ({table}.metrics_session = excluded.metrics_session"
             f" AND {table}.metrics_seq < excluded.metrics_seq))")
    updates = [f"last_seen = CASE WHEN {table}.last_seen IS NULL OR {table}.last_seen <"
               f" excluded.last_seen THEN excluded.last_seen ELSE {table}.last_seen END"]
    updates += [f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {table}.{c} END"
                for c in columns[6:]]
    one = "(" + ", ".join([mark] * len(columns)) + ")"
    # Rows in one order in every batch: concurrent writers never deadlock on them.
    devices = sorted(last_seen)
    for start in range(0, len(devices), 500):
        chunk = devices[start:start + 500]
        params: list[Any] = []
        for device in chunk:
            at = _bind_time(last_seen[device], pg)
            params += (*device, False, -1, at, at)
            figures = newest.get(device)
            if figures is None:
                params += [None] * (3 + len(names))
                continue
            session, seq, ts, summary = figures
            params += (session, seq, _bind_time(ts, pg), *(getattr(summary, n) for n in names))
        conn.exec_driver_sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES"
            f" {', '.join([one] * len(chunk))} ON CONFLICT (fleet, device_id) DO UPDATE SET"
            f" {', '.join(updates)}", tuple(params))

def insert_metric_rows(conn: Connection, pg: bool, rows: list[dict[str, Any]]
                   ) -> set[tuple[Any, ...]]:
    """Insert metrics rows, dropping those already stored; return the keys
    ``(fleet, device_id, session, seq)`` that were new.

    One multi-row INSERT per 500 rows with the driver's own parameters: SQLAlchemy's
    per-value type processing cost more than the database's work here, and a busy
    controller runs this for every metrics message.
    """
    mark = "%s" if pg else "?"
    one = f"({mark}, {mark}, {mark}, {mark}, {mark}, {mark}, {mark}{'::jsonb' if pg else ''})"
    fresh: set[tuple[Any, ...]] = set()
    for start in range(0, len(rows), 500):
        chunk = rows[start:start + 500]
        params: list[Any] = []
        for r in chunk:
            params += (r["fleet"], r["device_id"], r["session"], r["seq"],
                       _bind_time(r["ts"], pg), _bind_time(r["received"], pg),
                       json_text(r["payload"]))
        sql = (f"INSERT INTO {MetricRow.__tablename__} (fleet, device_id, session, seq, ts,"
               f" received, payload) VALUES {', '.join([one] * len(chunk))}"
               " ON CONFLICT (fleet, device_id, session, seq) DO NOTHING"
               " RETURNING fleet, device_id, session, seq")
        fresh.update(tuple(r) for r in conn.exec_driver_sql(sql, tuple(params)))
    return fresh


def _bind_time(value: dt.datetime, postgres: bool) -> Any:
    """A UTC time as :class:`~edgekit.host.db._schema.UTCDateTime` stores it: aware on
    PostgreSQL, the fixed-width text SQLAlchemy writes on SQLite (compared as text there)."""
    value = value.astimezone(dt.UTC)
    return value if postgres else value.replace(tzinfo=None).isoformat(" ", "microseconds")
