"""Devices and their metrics: the fleet's latest state per device and the metrics history.
Part of :class:`edgekit.host.db.Store`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, and_, case, literal, or_, select, update

from edgekit.host.db._bulk import insert_metric_rows, upsert_device_figures
from edgekit.host.db._engine import StoreBase
from edgekit.host.db._records import DeviceRecord, MetricRecord, MetricsSummary
from edgekit.host.db._schema import DeviceRow, MetricRow, UTCDateTime
from edgekit.host.db._timeutil import as_utc, utcnow


class DeviceStore(StoreBase):
    """The devices and metrics methods of :class:`edgekit.host.db.Store`."""

    # -- devices -------------------------------------------------------------------------

    def upsert_device_status(self, fleet: str, device: str, *, online: bool, session: int,
                             agent_version: str | None = None, model_name: str | None = None,
                             model_version: str | None = None, model_sha256: str | None = None,
                             status: dict[str, Any] | None = None,
                             seen_at: dt.datetime | None = None) -> bool:
        """Apply a status message (birth, update or death) of one device.

        A message from an older session than the stored one is ignored (a late death must
        not mark a reconnected device offline). Fields passed as None keep their stored
        value; ``last_seen`` moves only when the device says it is online.

        Returns:
            True when applied, False when ignored as stale.
        """
        now = as_utc(seen_at) if seen_at else utcnow()
        changes: dict[str, Any] = {"online": online, "session_seq": session}
        for key, value in (("agent_version", agent_version), ("model_name", model_name),
                           ("model_version", model_version), ("model_sha256", model_sha256),
                           ("status", status)):
            if value is not None:
                changes[key] = value
        if online:
            changes["last_seen"] = now
        stmt = self._insert(DeviceRow).values(fleet=fleet, device_id=device, first_seen=now,
                                              **changes)
        stmt = stmt.on_conflict_do_update(
            index_elements=["fleet", "device_id"], set_=changes,
            where=DeviceRow.session_seq <= session,
        ).returning(DeviceRow.id)
        with self._tx() as conn:
            return conn.execute(stmt).scalar() is not None

    def get_device(self, fleet: str, device: str) -> DeviceRecord | None:
        """One device, or None when the controller never heard of it."""
        with self._tx(write=False) as conn:
            row = conn.execute(select(DeviceRow).where(
                DeviceRow.fleet == fleet, DeviceRow.device_id == device)).one_or_none()
        return None if row is None else _device(row)

    def list_devices(self, fleet: str | None = None, *,
                     online: bool | None = None) -> list[DeviceRecord]:
        """Devices by fleet and id, as ``edgekit fleet status`` lists them."""
        query = select(DeviceRow).order_by(DeviceRow.fleet, DeviceRow.device_id)
        if fleet is not None:
            query = query.where(DeviceRow.fleet == fleet)
        if online is not None:
            query = query.where(DeviceRow.online == online)
        with self._tx(write=False) as conn:
            return [_device(r) for r in conn.execute(query)]

    def list_fleets(self) -> list[str]:
        """Names of the fleets that have devices."""
        with self._tx(write=False) as conn:
            return list(conn.execute(
                select(DeviceRow.fleet).distinct().order_by(DeviceRow.fleet)).scalars())

    # -- metrics -------------------------------------------------------------------------

    def record_metrics(self, fleet: str, device: str, *, seq: int, payload: dict[str, Any],
                       session: int = 0, ts: dt.datetime | None = None,
                       summary: MetricsSummary | None = None,
                       received: dt.datetime | None = None) -> bool:
        """Store one metrics message; update the device's summary when it is the newest.

        ``(fleet, device, session, seq)`` identifies a message: a second delivery of it
        (MQTT at-least-once) is dropped. Agents whose ``seq`` runs on across restarts leave
        ``session`` at 0. ``summary`` replaces the device's figures (all of them) only if
        this message is newer, by ``(session, seq)``, than the one they came from.

        Returns:
            True when stored, False when it was a duplicate.
        """
        with self._tx() as conn:
            return self._record_metrics(conn, fleet, device, seq=seq, payload=payload,
                                        session=session, ts=ts, summary=summary,
                                        received=received)

    def record_metrics_batch(self, messages: Sequence[dict[str, Any]]) -> list[bool]:
        """Store several metrics messages in one transaction, with the effect of calling
        :meth:`record_metrics` for each in turn, in a few statements (what a busy controller
        needs: one commit and four round trips per batch instead of per message).

        ``messages`` holds the keyword arguments of :meth:`record_metrics`, ``fleet`` and
        ``device`` included. Returns, for each, whether it was new (the second of two equal
        messages in one batch is a duplicate).
        """
        now = utcnow()
        rows: list[dict[str, Any]] = []
        for m in messages:
            received = as_utc(m["received"]) if m.get("received") else now
            rows.append({"fleet": m["fleet"], "device_id": m["device"],
                         "session": int(m.get("session", 0)), "seq": int(m["seq"]),
                         "ts": as_utc(m["ts"]) if m.get("ts") else received,
                         "received": received, "payload": m["payload"]})
        if not rows:
            return []
        with self._tx() as conn:
            fresh = insert_metric_rows(conn, self.dialect == "postgresql", rows)
            new: list[bool] = []
            last_seen: dict[tuple[str, str], dt.datetime] = {}
            newest: dict[tuple[str, str], tuple[int, int, int]] = {}  # -> session, seq, index
            for i, row in enumerate(rows):
                ident = (row["fleet"], row["device_id"], row["session"], row["seq"])
                is_new = ident in fresh
                fresh.discard(ident)
                new.append(is_new)
                if not is_new:
                    continue
                device = (row["fleet"], row["device_id"])
                last_seen[device] = max(last_seen.get(device, row["received"]), row["received"])
                order = (row["session"], row["seq"])
                if messages[i].get("summary") is not None and (
                        device not in newest or newest[device][:2] < order):
                    newest[device] = (*order, i)
            if last_seen:
                upsert_device_figures(conn, self.dialect == "postgresql", last_seen, {
                    device: (session, seq, rows[i]["ts"], messages[i]["summary"])
                    for device, (session, seq, i) in newest.items()})
            return new

    def _record_metrics(self, conn: Connection, fleet: str, device: str, *, seq: int,
                        payload: dict[str, Any], session: int = 0,
                        ts: dt.datetime | None = None, summary: MetricsSummary | None = None,
                        received: dt.datetime | None = None) -> bool:
        received = as_utc(received) if received else utcnow()
        ts = as_utc(ts) if ts else received
        stmt = self._insert(MetricRow).values(
            fleet=fleet, device_id=device, session=session, seq=seq, ts=ts, received=received,
            payload=payload,
        ).on_conflict_do_nothing(
            index_elements=["fleet", "device_id", "session", "seq"]).returning(MetricRow.id)
        if conn.execute(stmt).scalar() is None:
            return False
        self._ensure_device(conn, fleet, device, received)
        key = and_(DeviceRow.fleet == fleet, DeviceRow.device_id == device)
        at = literal(received, UTCDateTime())
        conn.execute(update(DeviceRow).where(key).values(last_seen=case(
            (or_(DeviceRow.last_seen.is_(None), DeviceRow.last_seen < at), at),
            else_=DeviceRow.last_seen)))
        if summary is not None:
            newer = or_(DeviceRow.metrics_session.is_(None),
                        DeviceRow.metrics_session < session,
                        and_(DeviceRow.metrics_session == session,
                             DeviceRow.metrics_seq < seq))
            conn.execute(update(DeviceRow).where(key, newer).values(
                metrics_session=session, metrics_seq=seq, metrics_at=ts,
                **summary.to_dict()))
        return True

    def metrics_history(self, fleet: str | None = None, *, device: str | None = None,
                        since: dt.datetime | None = None, after_id: int = 0,
                        limit: int | None = None) -> list[MetricRecord]:
        """Stored metrics messages in arrival order (by id), optionally filtered."""
        query = select(MetricRow).where(MetricRow.id > after_id).order_by(MetricRow.id)
        if fleet is not None:
            query = query.where(MetricRow.fleet == fleet)
        if device is not None:
            query = query.where(MetricRow.device_id == device)
        if since is not None:
            query = query.where(MetricRow.ts >= as_utc(since))
        if limit is not None:
            query = query.limit(limit)
        with self._tx(write=False) as conn:
            return [MetricRecord(id=r.id, fleet=r.fleet, device=r.device_id, session=r.session,
                                 seq=r.seq, ts=r.ts, received=r.received, payload=r.payload)
                    for r in conn.execute(query)]

    def _ensure_device(self, conn: Connection, fleet: str, device: str, now: dt.datetime) -> None:
        conn.execute(self._insert(DeviceRow).values(
            fleet=fleet, device_id=device, online=False, session_seq=-1, first_seen=now,
        ).on_conflict_do_nothing(index_elements=["fleet", "device_id"]))


def _device(row: Any) -> DeviceRecord:
    return DeviceRecord(
        fleet=row.fleet, device=row.device_id, online=row.online, session=row.session_seq,
        agent_version=row.agent_version, model_name=row.model_name,
        model_version=row.model_version, model_sha256=row.model_sha256,
        first_seen=row.first_seen, last_seen=row.last_seen, status=row.status,
        metrics=MetricsSummary(
            latency_p50_ms=row.latency_p50_ms, latency_p95_ms=row.latency_p95_ms,
            latency_p99_ms=row.latency_p99_ms, accuracy=row.accuracy, f1=row.f1,
            label_count=row.label_count, estimated_accuracy=row.estimated_accuracy,
            estimated_count=row.estimated_count),
        metrics_at=row.metrics_at,
    )
