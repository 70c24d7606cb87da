"""Bulk writes of the fleet store's hottest path, a batch of metrics messages, with the
driver's own parameters: SQLAlchemy's per-value type processing cost more than the
database's work here (``Store.record_metrics_batch`` calls these for every batch).

On PostgreSQL a batch is one statement per table whatever its size: the rows travel as one
JSON array (encoded by msgspec in C, the metrics payloads inserted as the bytes already
checked, not encoded again) that ``jsonb_array_elements`` turns back into rows. The
statement's text never changes, so psycopg parses it once and the server runs it as a
prepared statement; a multi-row ``VALUES`` list with a placeholder per value would be a new,
long text for every batch size, which psycopg re-parses in Python each time, and one array
parameter per column costs psycopg a Python call per value to dump (each more time than the
database's own work). SQLite takes the multi-row ``VALUES`` form. Values are written as the ORM types
would write them (:func:`_bind_time`, :func:`~edgekit.host.db._engine.json_text`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import fields
from typing import Any

import msgspec
from sqlalchemy import Integer
from sqlalchemy.engine import Connection

from edgekit.host.db._engine import json_text
from edgekit.host.db._records import MetricsSummary
from edgekit.host.db._schema import DeviceRow, MetricRow

__all__ = ["insert_metric_rows", "upsert_device_figures"]

_encoder = msgspec.json.Encoder()
_SQLITE_ROWS = 500  # rows per SQLite statement (999 parameters at most in old builds)
_SUMMARY = [f.name for f in fields(MetricsSummary)]
# PostgreSQL types of the device columns a batch writes, in the statement's order; the
# summary's follow their columns (a count is an integer, a figure a float).
_DEVICE_TYPES = {"fleet": "text", "device_id": "text", "online": "bool", "session_seq": "int8",
                 "first_seen": "timestamptz", "last_seen": "timestamptz",
                 "metrics_session": "int8", "metrics_seq": "int8", "metrics_at": "timestamptz",
                 **{n: "int8" if isinstance(DeviceRow.__table__.c[n].type, Integer) else "float8"
                    for n in _SUMMARY}}
_METRIC_TYPES = {"fleet": "text", "device_id": "text", "session": "int8", "seq": "int8",
                 "ts": "timestamptz", "received": "timestamptz", "payload": "jsonb"}


def upsert_device_figures(
        conn: Connection, pg: bool, last_seen: dict[tuple[str, str], dt.datetime],
        newest: dict[tuple[str, str], tuple[int, int, dt.datetime, MetricsSummary]]) -> None:
    """Create the devices not known yet, move ``last_seen`` forward, and replace the
    summary where the batch's message is newer by (session, seq) than the stored one, in
    one INSERT ... ON CONFLICT DO UPDATE (per 500 devices on SQLite)."""
    columns = list(_DEVICE_TYPES)
    table = DeviceRow.__tablename__
    newer = (f"excluded.metrics_session IS NOT NULL AND ({table}.metrics_session IS NULL"
             f" OR {table}.metrics_session < excluded.metrics_session"
             f" OR ({table}.metrics_session = excluded.metrics_session"
             f" AND {table}.metrics_seq < excluded.metrics_seq))")
    updates = [f"last_seen = CASE WHEN {table}.last_seen IS NULL OR {table}.last_seen <"
               f" excluded.last_seen THEN excluded.last_seen ELSE {table}.last_seen END"]
    updates += [f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {table}.{c} END"
                for c in columns[6:]]
    conflict = f" ON CONFLICT (fleet, device_id) DO UPDATE SET {', '.join(updates)}"
    rows: list[tuple[Any, ...]] = []
    # Rows in one order in every batch: concurrent writers never deadlock on them.
    for device in sorted(last_seen):
        at = _bind_time(last_seen[device], pg)
        figures = newest.get(device)
        if figures is None:
            rows.append((*device, False, -1, at, at, *[None] * (3 + len(_SUMMARY))))
            continue
        session, seq, ts, summary = figures
        rows.append((*device, False, -1, at, at, session, seq, _bind_time(ts, pg),
                     *(getattr(summary, n) for n in _SUMMARY)))
    _insert(conn, pg, table, _DEVICE_TYPES, rows, conflict)


def insert_metric_rows(conn: Connection, pg: bool, rows: list[dict[str, Any]]
                       ) -> set[tuple[Any, ...]]:
    """Insert metrics rows, dropping those already stored; return the keys
    ``(fleet, device_id, session, seq)`` that were new.

    ``payload`` is a dict or the JSON text of one (written as it is).
    """
    values = [(r["fleet"], r["device_id"], r["session"], r["seq"], _bind_time(r["ts"], pg),
               _bind_time(r["received"], pg), _payload(r["payload"], pg)) for r in rows]
    conflict = (" ON CONFLICT (fleet, device_id, session, seq) DO NOTHING"
                " RETURNING fleet, device_id, session, seq")
    return {tuple(r) for r in _insert(conn, pg, MetricRow.__tablename__, _METRIC_TYPES, values,
                                      conflict)}


def _insert(conn: Connection, pg: bool, table: str, types: dict[str, str],
            rows: list[tuple[Any, ...]], tail: str) -> list[Any]:
    """INSERT ``rows`` (tuples in the order of ``types``) into ``table``, then ``tail``
    (ON CONFLICT ..., RETURNING ...); return the rows the statements returned."""
    if not rows:
        return []
    names = ", ".join(types)
    if pg:
        values = ", ".join(f"r->{i}" if t == "jsonb" else f"(r->>{i})::{t}"
                           for i, t in enumerate(types.values()))
        result = conn.exec_driver_sql(
            f"INSERT INTO {table} ({names}) SELECT {values}"
            f" FROM jsonb_array_elements(%s::jsonb) AS r{tail}",
            (_encoder.encode(rows).decode(),))
        return list(result.fetchall()) if result.returns_rows else []
    one = "(" + ", ".join(["?"] * len(types)) + ")"
    out: list[Any] = []
    for start in range(0, len(rows), _SQLITE_ROWS):
        chunk = rows[start:start + _SQLITE_ROWS]
        result = conn.exec_driver_sql(
            f"INSERT INTO {table} ({names}) VALUES {', '.join([one] * len(chunk))}{tail}",
            tuple(v for row in chunk for v in row))
        if result.returns_rows:
            out += result.fetchall()
    return out


def _payload(payload: dict[str, Any] | str, pg: bool) -> Any:
    """A JSON column's value: its text on SQLite; on PostgreSQL what goes into the batch's
    JSON array as it is (text already encoded is not encoded again)."""
    if pg:
        return msgspec.Raw(payload.encode()) if isinstance(payload, str) else payload
    return payload if isinstance(payload, str) else json_text(payload)


def _bind_time(value: dt.datetime, postgres: bool) -> Any:
    """A UTC time as :class:`~edgekit.host.db._schema.UTCDateTime` stores it: aware on
    PostgreSQL, the fixed-width text SQLAlchemy writes on SQLite (compared as text there)."""
    value = value.astimezone(dt.UTC)
    return value if postgres else value.replace(tzinfo=None).isoformat(" ", "microseconds")
