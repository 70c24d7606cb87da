"""The controller's database: fleet state, metric history, events, field samples, the model
registry, rollouts and leases, through SQLAlchemy 2.x.

A SQLite file by default (``sqlite:///~/.edgekit/edgekit.db``, WAL mode, foreign keys on),
PostgreSQL by URL (``postgresql://user@host/db``, driven by psycopg 3). The schema is created
on first use; docs/database.md describes every table. :class:`Store` is the one entry point;
its methods each run in their own transaction and return plain records (see
:mod:`edgekit.host.db._records`), never live database objects.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    case,
    exc,
    insert,
    literal,
    or_,
    select,
    update,
)

from edgekit.errors import ArtifactError, UsageError
from edgekit.host.db._bulk import insert_metric_rows, upsert_device_figures
from edgekit.host.db._engine import default_db_url, make_engine
from edgekit.host.db._records import (
    DeviceRecord,
    EventRecord,
    MetricRecord,
    MetricsSummary,
    ModelRecord,
    RolloutRecord,
    SampleIn,
    TargetRecord,
)
from edgekit.host.db._rollouts import RolloutStore
from edgekit.host.db._samples import SampleStore
from edgekit.host.db._schema import (
    SCHEMA_VERSION,
    Base,
    ChannelRow,
    DeviceRow,
    EventRow,
    MetricRow,
    ModelRow,
    RolloutState,
    TargetState,
    UTCDateTime,
)
from edgekit.host.db._timeutil import as_utc, utcnow
from edgekit.manifest import parse_version

__all__ = [
    "SCHEMA_VERSION",
    "Base",
    "DeviceRecord",
    "EventRecord",
    "MetricRecord",
    "MetricsSummary",
    "ModelRecord",
    "RolloutRecord",
    "RolloutState",
    "SampleIn",
    "Store",
    "TargetRecord",
    "TargetState",
    "default_db_url",
    "make_engine",
]


class Store(SampleStore, RolloutStore):
    """Everything the controller and the host commands keep in the database.

    ``Store(url)`` connects and creates the schema when it is missing. Rollout, target and
    lease methods are documented in :class:`edgekit.host.db._rollouts.RolloutStore`, the
    samples methods in :class:`edgekit.host.db._samples.SampleStore`.
    """

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

    # -- events --------------------------------------------------------------------------

    def record_event(self, fleet: str, kind: str, message: str = "", *,
                     device: str | None = None, seq: int | None = None, session: int = 0,
                     level: str = "info", reason: str | None = None,
                     data: dict[str, Any] | None = None, rollout_id: int | None = None,
                     ts: dt.datetime | None = None) -> int | None:
        """Append an event.

        A device's event carries its ``session`` and ``seq`` (which starts again with each
        session): a second delivery of ``(fleet, device, session, seq)`` is dropped. Agents
        whose seq runs on across restarts use session 0. The controller's own events leave
        ``seq`` unset.

        Returns:
            The new event's id (the cursor :meth:`list_events` takes), or None for a
            duplicate.

        Raises:
            UsageError: ``rollout_id`` names no rollout.
        """
        stmt = self._insert(EventRow).values(
            fleet=fleet, device_id=device, session=session, seq=seq, kind=kind, level=level,
            reason=reason, message=message, data=data, rollout_id=rollout_id,
            ts=as_utc(ts) if ts else utcnow(),
        ).on_conflict_do_nothing(index_elements=["fleet", "device_id", "session", "seq"]
                                 ).returning(EventRow.id)
        try:
            with self._tx() as conn:
                found = conn.execute(stmt).scalar()
        except exc.IntegrityError as err:
            raise UsageError(f"rollout {rollout_id} not found (event {kind!r} not recorded)",
                             hint="list rollouts to see their ids") from err
        return None if found is None else int(found)

    def list_events(self, *, after_id: int = 0, since: dt.datetime | None = None,
                    fleet: str | None = None, device: str | None = None,
                    rollout_id: int | None = None, kinds: Iterable[str] | None = None,
                    limit: int = 1000, latest: bool = False) -> list[EventRecord]:
        """Events with an id above ``after_id``, oldest first.

        To follow the log, pass the id of the last event seen as ``after_id`` on each poll.
        ``latest`` returns the newest ``limit`` matching events (still oldest first).
        """
        query = select(EventRow).where(EventRow.id > after_id)
        if since is not None:
            query = query.where(EventRow.ts >= as_utc(since))
        if fleet is not None:
            query = query.where(EventRow.fleet == fleet)
        if device is not None:
            query = query.where(EventRow.device_id == device)
        if rollout_id is not None:
            query = query.where(EventRow.rollout_id == rollout_id)
        if kinds is not None:
            query = query.where(EventRow.kind.in_(list(kinds)))
        order = EventRow.id.desc() if latest else EventRow.id
        with self._tx(write=False) as conn:
            rows = list(conn.execute(query.order_by(order).limit(limit)))
        if latest:
            rows.reverse()
        return [EventRecord(id=r.id, fleet=r.fleet, device=r.device_id, seq=r.seq,
                            kind=r.kind, level=r.level, reason=r.reason, message=r.message,
                            data=r.data, ts=r.ts, rollout_id=r.rollout_id, session=r.session)
                for r in rows]

    # -- model registry rows -------------------------------------------------------------

    def add_model(self, record: ModelRecord) -> tuple[ModelRecord, bool]:
        """Register a model version; the same one again is a no-op.

        Returns:
            The stored record and whether it was new.

        Raises:
            ArtifactError: this name and version are registered with another sha256.
        """
        values = {f.name: getattr(record, f.name) for f in fields(record)
                  if f.name not in ("channels", "created")}
        try:
            with self._tx() as conn:
                found = self._model(conn, record.name, record.version)
                if found is None:
                    conn.execute(insert(ModelRow).values(**values, created=as_utc(record.created)))
                    return self._need_model(conn, record.name, record.version), True
        except exc.IntegrityError:
            pass  # registered by a concurrent push between our check and insert
        with self._tx(write=False) as conn:
            existing = self._need_model(conn, record.name, record.version)
        if existing.sha256 != record.sha256:
            raise ArtifactError(
                f"{record.ref} is already registered with a different package"
                f" (sha256 {existing.sha256[:12]}..., this one {record.sha256[:12]}...)",
                hint="give the new package a higher version (edgekit convert --version)")
        return existing, False

    def get_model(self, name: str, version: str | None = None) -> ModelRecord | None:
        """One registered version, or the highest version of ``name`` when none is given."""
        with self._tx(write=False) as conn:
            if version is not None:
                return self._model(conn, name, version)
            versions = list(conn.execute(
                select(ModelRow.version).where(ModelRow.name == name)).scalars())
            if not versions:
                return None
            return self._model(conn, name, max(versions, key=parse_version))

    def list_models(self, name: str | None = None) -> list[ModelRecord]:
        """Registered models by name, then version (numerically)."""
        query = select(ModelRow.name, ModelRow.version)
        if name is not None:
            query = query.where(ModelRow.name == name)
        with self._tx(write=False) as conn:
            keys = sorted(conn.execute(query), key=lambda r: (r.name, parse_version(r.version)))
            return [m for r in keys if (m := self._model(conn, r.name, r.version)) is not None]

    def promote_model(self, name: str, version: str, channel: str, *,
                      now: dt.datetime | None = None) -> ModelRecord:
        """Point ``channel`` of model ``name`` at ``version`` (it leaves the version before).

        Raises:
            UsageError: the version is not registered.
        """
        now = as_utc(now) if now else utcnow()
        stmt = self._insert(ChannelRow).values(name=name, channel=channel, version=version,
                                               promoted=now)
        stmt = stmt.on_conflict_do_update(index_elements=["name", "channel"],
                                          set_={"version": version, "promoted": now})
        with self._tx() as conn:
            if self._model(conn, name, version) is None:
                raise UsageError(f"model {name}:{version} is not in the registry",
                                 hint="see `edgekit registry list`")
            conn.execute(stmt)
            return self._need_model(conn, name, version)

    def channel_version(self, name: str, channel: str) -> str | None:
        """The version a channel points at, or None."""
        with self._tx(write=False) as conn:
            return conn.execute(select(ChannelRow.version).where(
                ChannelRow.name == name, ChannelRow.channel == channel)).scalar()

    # -- helpers -------------------------------------------------------------------------

    def _ensure_device(self, conn: Connection, fleet: str, device: str, now: dt.datetime) -> None:
        conn.execute(self._insert(DeviceRow).values(
            fleet=fleet, device_id=device, online=False, session_seq=-1, first_seen=now,
        ).on_conflict_do_nothing(index_elements=["fleet", "device_id"]))

    @classmethod
    def _need_model(cls, conn: Connection, name: str, version: str) -> ModelRecord:
        found = cls._model(conn, name, version)
        if found is None:
            raise UsageError(f"model {name}:{version} is not in the registry",
                             hint="see `edgekit registry list`")
        return found

    @staticmethod
    def _model(conn: Connection, name: str, version: str) -> ModelRecord | None:
        row = conn.execute(select(ModelRow).where(
            ModelRow.name == name, ModelRow.version == version)).one_or_none()
        if row is None:
            return None
        channels = sorted(conn.execute(select(ChannelRow.channel).where(
            ChannelRow.name == name, ChannelRow.version == version)).scalars())
        return ModelRecord(
            name=row.name, version=row.version, sha256=row.sha256, size=row.size,
            format=row.format, task=row.task, path=row.path, manifest=row.manifest,
            evaluation=row.evaluation or {}, signed=row.signed,
            signature_verified=row.signature_verified, key_id=row.key_id, parent=row.parent,
            recipe=row.recipe or {}, data=row.data, created=row.created, channels=channels,
        )


def _device(row: Any) -> DeviceRecord:
    return DeviceRecord(
        fleet=row.fleet, device=row.device_id, online=row.online, session=row.session_seq,
        agent_version=row.agent_version, model_name=row.model_name,
        model_version=row.model_version, model_sha256=row.model_sha256,
        first_seen=row.first_seen, last_seen=row.last_seen, status=row.status,
        metrics=MetricsSummary(
            latency_p50_ms=row.latency_p50_ms, latency_p95_ms=row.latency_p95_ms,
            latency_p99_ms=row.latency_p99_ms, accuracy=row.accuracy, f1=row.f1,
            label_count=row.label_count),
        metrics_at=row.metrics_at,
    )

