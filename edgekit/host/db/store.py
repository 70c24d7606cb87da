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
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from sqlalchemy import (
    Connection,
    exc,
    insert,
    select,
)

from edgekit.errors import ArtifactError, UsageError
from edgekit.host.db._devices import DeviceStore
from edgekit.host.db._engine import default_db_url
from edgekit.host.db._records import (
    EventRecord,
    ModelRecord,
)
from edgekit.host.db._rollouts import RolloutStore
from edgekit.host.db._samples import SampleStore
from edgekit.host.db._schema import (
    SCHEMA_VERSION,
    ChannelRow,
    EventRow,
    ModelRow,
)
from edgekit.host.db._timeutil import as_utc, utcnow
from edgekit.manifest import parse_version

__all__ = ["SCHEMA_VERSION", "Store", "default_db_url"]


class Store(DeviceStore, SampleStore, RolloutStore):
    """Everything the controller and the host commands keep in the database.

    ``Store(url)`` connects and migrates the schema to the newest revision. Rollout, target and
    lease methods are documented in :class:`edgekit.host.db._rollouts.RolloutStore`, the
    samples methods in :class:`edgekit.host.db._samples.SampleStore`, the devices and
    metrics methods in :class:`edgekit.host.db._devices.DeviceStore`.
    """

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
