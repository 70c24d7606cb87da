"""Rollouts, their per-device targets, and leases: who works on what, one at a time.

Ownership is a lease: a controller claims a rollout for ``lease_seconds`` and renews the lease
while it works; a controller that dies stops renewing and another one claims the rollout once
the lease has expired. Claims are compare-and-set updates, and on PostgreSQL the candidate row
is picked with ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent claimers never wait on, or
both win, the same row. On SQLite every write transaction is ``BEGIN IMMEDIATE``, which
serialises claimers. Lease times come from the claimers' clocks: keep them in sync (NTP) and
leases far longer than any clock skew.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, and_, case, delete, exc, insert, literal, or_, select, update

from edgekit.errors import UsageError
from edgekit.host.db._engine import StoreBase
from edgekit.host.db._records import RolloutRecord, TargetRecord
from edgekit.host.db._schema import (
    ACTIVE_ROLLOUT_STATES,
    ROLLOUT_TRANSITIONS,
    LeaseRow,
    RolloutRow,
    RolloutState,
    RolloutTargetRow,
    TargetState,
    UTCDateTime,
)
from edgekit.host.db._timeutil import as_utc, utcnow
from edgekit.host.errors import LeaseLostError

_ACTIVE = sorted(s.value for s in ACTIVE_ROLLOUT_STATES)


def _rollout(row: Any) -> RolloutRecord:
    return RolloutRecord(
        id=row.id, fleet=row.fleet, model_name=row.model_name, model_version=row.model_version,
        state=row.state, plan=row.plan or {}, current_wave=row.current_wave, owner=row.owner,
        lease_expires=row.lease_expires, reason=row.reason, created=row.created,
        updated=row.updated, finished=row.finished,
    )


def _target(row: Any) -> TargetRecord:
    return TargetRecord(
        rollout_id=row.rollout_id, device=row.device_id, wave=row.wave, state=row.state,
        reason=row.reason, previous_version=row.previous_version, assigned_at=row.assigned_at,
        updated=row.updated,
    )


def _state(value: str | RolloutState) -> RolloutState:
    try:
        return RolloutState(value)
    except ValueError:
        raise UsageError(f"unknown rollout state {value!r}",
                         hint=f"one of: {', '.join(s.value for s in RolloutState)}") from None


def _target_state(value: str | TargetState) -> TargetState:
    try:
        return TargetState(value)
    except ValueError:
        raise UsageError(f"unknown target state {value!r}",
                         hint=f"one of: {', '.join(s.value for s in TargetState)}") from None


class RolloutStore(StoreBase):
    """Rollout and lease methods of :class:`~edgekit.host.db.Store`."""

    # -- rollouts ------------------------------------------------------------------------

    def create_rollout(self, fleet: str, model_name: str, model_version: str,
                       plan: dict[str, Any], *, targets: Iterable[str] = (),
                       now: dt.datetime | None = None) -> RolloutRecord:
        """Create a ``pending`` rollout with its devices (all ``pending``, no wave yet).

        Raises:
            UsageError: the fleet already has an active rollout.
        """
        now = as_utc(now) if now else utcnow()
        try:
            with self._tx() as conn:
                active = conn.execute(
                    select(RolloutRow.id).where(RolloutRow.fleet == fleet,
                                                RolloutRow.state.in_(_ACTIVE))).scalar()
                if active is not None:
                    raise UsageError(
                        f"fleet {fleet} already has an active rollout ({active})",
                        hint="wait for it to finish, or cancel or abort it first")
                rid = conn.execute(insert(RolloutRow).values(
                    fleet=fleet, model_name=model_name, model_version=model_version,
                    state=RolloutState.PENDING.value, plan=plan, current_wave=0,
                    created=now, updated=now).returning(RolloutRow.id)).scalar_one()
                for device in dict.fromkeys(targets):
                    conn.execute(insert(RolloutTargetRow).values(
                        rollout_id=rid, device_id=device, state=TargetState.PENDING.value,
                        updated=now))
                return self._get_rollout(conn, rid)
        except exc.IntegrityError as err:
            raise UsageError(
                f"fleet {fleet} already has an active rollout (created at the same moment)",
                hint="wait for it to finish, or cancel or abort it first") from err

    def get_rollout(self, rollout_id: int) -> RolloutRecord:
        """One rollout.

        Raises:
            UsageError: there is no rollout with this id.
        """
        with self._tx(write=False) as conn:
            return self._get_rollout(conn, rollout_id)

    def list_rollouts(self, *, fleet: str | None = None,
                      active: bool | None = None) -> list[RolloutRecord]:
        """Rollouts, oldest first; ``active`` keeps only unfinished (or finished) ones."""
        query = select(RolloutRow).order_by(RolloutRow.id)
        if fleet is not None:
            query = query.where(RolloutRow.fleet == fleet)
        if active is True:
            query = query.where(RolloutRow.state.in_(_ACTIVE))
        elif active is False:
            query = query.where(RolloutRow.state.not_in(_ACTIVE))
        with self._tx(write=False) as conn:
            return [_rollout(r) for r in conn.execute(query)]

    def transition_rollout(self, rollout_id: int, state: str | RolloutState, *,
                           owner: str | None = None, reason: str | None = None,
                           now: dt.datetime | None = None) -> RolloutRecord:
        """Move a rollout to ``state`` (a no-op when it is there already).

        ``owner`` is the controller doing it: it must hold a live lease. Without ``owner``
        (an operator's command) ownership is not checked. A terminal state clears the owner.

        Raises:
            UsageError: no such rollout, an unknown state, or a transition not allowed from
                the current state (the message lists the allowed ones).
            LeaseLostError: ``owner`` does not hold the rollout's lease.
        """
        target = _state(state)
        now = as_utc(now) if now else utcnow()
        with self._tx() as conn:
            row = self._lock_rollout(conn, rollout_id)
            self._check_owner(row, owner, now)
            current = RolloutState(row.state)
            if target == current:
                return _rollout(row)
            allowed = ROLLOUT_TRANSITIONS[current]
            if target not in allowed:
                raise UsageError(
                    f"rollout {rollout_id} is {current.value}; it cannot become {target.value}",
                    hint=("allowed next: " + ", ".join(sorted(s.value for s in allowed)))
                    if allowed else "it has finished")
            values: dict[str, Any] = {"state": target.value, "updated": now}
            if reason is not None:
                values["reason"] = reason
            if target not in ACTIVE_ROLLOUT_STATES:
                values.update(finished=now, owner=None, lease_expires=None)
            conn.execute(update(RolloutRow).where(RolloutRow.id == rollout_id).values(**values))
            return self._get_rollout(conn, rollout_id)

    def set_rollout_wave(self, rollout_id: int, wave: int, *, owner: str | None = None,
                         now: dt.datetime | None = None) -> RolloutRecord:
        """Record the wave the rollout is in.

        Raises:
            UsageError: no such rollout, or it has finished.
            LeaseLostError: ``owner`` does not hold the rollout's lease.
        """
        now = as_utc(now) if now else utcnow()
        with self._tx() as conn:
            row = self._lock_rollout(conn, rollout_id)
            self._check_owner(row, owner, now)
            if row.state not in _ACTIVE:
                raise UsageError(f"rollout {rollout_id} has finished ({row.state})")
            conn.execute(update(RolloutRow).where(RolloutRow.id == rollout_id)
                         .values(current_wave=wave, updated=now))
            return self._get_rollout(conn, rollout_id)

    # -- per-device targets --------------------------------------------------------------

    def set_target_state(self, rollout_id: int, device: str, state: str | TargetState, *,
                         wave: int | None = None, reason: str | None = None,
                         previous_version: str | None = None, owner: str | None = None,
                         now: dt.datetime | None = None) -> TargetRecord:
        """Set one device's state in a rollout (added to the rollout when new to it).

        ``assigned`` stamps ``assigned_at`` (the start of the per-device timeout).
        Fields passed as None keep their stored value.

        Raises:
            UsageError: no such rollout, or an unknown state.
            LeaseLostError: ``owner`` does not hold the rollout's lease.
        """
        new_state = _target_state(state)
        now = as_utc(now) if now else utcnow()
        with self._tx() as conn:
            row = self._lock_rollout(conn, rollout_id, shared=True)
            self._check_owner(row, owner, now)
            changes: dict[str, Any] = {"state": new_state.value, "updated": now}
            for key, value in (("wave", wave), ("reason", reason),
                               ("previous_version", previous_version)):
                if value is not None:
                    changes[key] = value
            if new_state == TargetState.ASSIGNED:
                changes["assigned_at"] = now
            stmt = self._insert(RolloutTargetRow).values(
                rollout_id=rollout_id, device_id=device, **changes)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["rollout_id", "device_id"], set_=changes))
            found = conn.execute(select(RolloutTargetRow).where(
                RolloutTargetRow.rollout_id == rollout_id,
                RolloutTargetRow.device_id == device)).one()
            return _target(found)

    def list_rollout_targets(self, rollout_id: int, *,
                             state: str | TargetState | None = None) -> list[TargetRecord]:
        """The devices of a rollout, by device id."""
        query = (select(RolloutTargetRow).where(RolloutTargetRow.rollout_id == rollout_id)
                 .order_by(RolloutTargetRow.device_id))
        if state is not None:
            query = query.where(RolloutTargetRow.state == _target_state(state).value)
        with self._tx(write=False) as conn:
            return [_target(r) for r in conn.execute(query)]

    # -- ownership -----------------------------------------------------------------------

    def claim_rollout(self, controller_id: str, lease_seconds: float, *,
                      fleet: str | None = None,
                      now: dt.datetime | None = None) -> RolloutRecord | None:
        """Take the oldest active rollout that nobody holds (or whose lease has expired).

        Returns None when there is none. Rollouts this controller already holds with a live
        lease are not returned again; see :meth:`owned_rollouts` and :meth:`renew_rollout`.
        """
        now = as_utc(now) if now else utcnow()
        claimable = and_(RolloutRow.state.in_(_ACTIVE),
                         or_(RolloutRow.owner.is_(None), RolloutRow.lease_expires <= now))
        query = select(RolloutRow.id).where(claimable)
        if fleet is not None:
            query = query.where(RolloutRow.fleet == fleet)
        query = query.order_by(RolloutRow.id).limit(1).with_for_update(skip_locked=True)
        with self._tx() as conn:
            rid = conn.execute(query).scalar()
            if rid is None:
                return None
            # Compare-and-set: the row must still be claimable when it is written.
            done = conn.execute(
                update(RolloutRow).where(RolloutRow.id == rid, claimable)
                .values(owner=controller_id,
                        lease_expires=now + dt.timedelta(seconds=lease_seconds)))
            if done.rowcount != 1:
                return None
            return self._get_rollout(conn, rid)

    def renew_rollout(self, rollout_id: int, controller_id: str, lease_seconds: float, *,
                      now: dt.datetime | None = None) -> bool:
        """Extend this controller's lease; False when it no longer holds the rollout."""
        now = as_utc(now) if now else utcnow()
        with self._tx() as conn:
            done = conn.execute(
                update(RolloutRow).where(RolloutRow.id == rollout_id,
                                         RolloutRow.owner == controller_id,
                                         RolloutRow.state.in_(_ACTIVE))
                .values(lease_expires=now + dt.timedelta(seconds=lease_seconds)))
            return done.rowcount == 1

    def release_rollout(self, rollout_id: int, controller_id: str) -> bool:
        """Give a rollout up so another controller can claim it at once."""
        with self._tx() as conn:
            done = conn.execute(
                update(RolloutRow).where(RolloutRow.id == rollout_id,
                                         RolloutRow.owner == controller_id)
                .values(owner=None, lease_expires=None))
            return done.rowcount == 1

    def owned_rollouts(self, controller_id: str, *,
                       now: dt.datetime | None = None) -> list[RolloutRecord]:
        """Active rollouts this controller holds with a live lease (after a restart too)."""
        now = as_utc(now) if now else utcnow()
        query = (select(RolloutRow)
                 .where(RolloutRow.owner == controller_id, RolloutRow.state.in_(_ACTIVE),
                        RolloutRow.lease_expires > now)
                 .order_by(RolloutRow.id))
        with self._tx(write=False) as conn:
            return [_rollout(r) for r in conn.execute(query)]

    # -- named leases --------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, seconds: float, *,
                      now: dt.datetime | None = None) -> bool:
        """Take (or renew) the lease ``name`` for ``seconds``; False when another holds it."""
        now = as_utc(now) if now else utcnow()
        expires = now + dt.timedelta(seconds=seconds)
        stmt = self._insert(LeaseRow).values(name=name, owner=owner, expires=expires,
                                             acquired=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"owner": owner, "expires": expires,
                  "acquired": _keep_if_same_owner(owner, now)},
            where=or_(LeaseRow.owner == owner, LeaseRow.expires <= now),
        ).returning(LeaseRow.owner)
        with self._tx() as conn:
            return conn.execute(stmt).scalar() == owner

    def release_lease(self, name: str, owner: str) -> bool:
        """Drop the lease if ``owner`` holds it."""
        with self._tx() as conn:
            done = conn.execute(delete(LeaseRow).where(LeaseRow.name == name,
                                                       LeaseRow.owner == owner))
            return done.rowcount == 1

    def lease_holder(self, name: str, *, now: dt.datetime | None = None) -> str | None:
        """Who holds the lease now (None when free or expired)."""
        now = as_utc(now) if now else utcnow()
        with self._tx(write=False) as conn:
            return conn.execute(select(LeaseRow.owner).where(
                LeaseRow.name == name, LeaseRow.expires > now)).scalar()

    # -- helpers -------------------------------------------------------------------------

    def _get_rollout(self, conn: Connection, rollout_id: int) -> RolloutRecord:
        row = conn.execute(select(RolloutRow).where(RolloutRow.id == rollout_id)).one_or_none()
        if row is None:
            raise UsageError(f"rollout {rollout_id} not found",
                             hint="list rollouts to see their ids")
        return _rollout(row)

    def _lock_rollout(self, conn: Connection, rollout_id: int, *, shared: bool = False) -> Any:
        row = conn.execute(select(RolloutRow).where(RolloutRow.id == rollout_id)
                           .with_for_update(read=shared)).one_or_none()
        if row is None:
            raise UsageError(f"rollout {rollout_id} not found",
                             hint="list rollouts to see their ids")
        return row

    @staticmethod
    def _check_owner(row: Any, owner: str | None, now: dt.datetime) -> None:
        if owner is None:
            return
        if row.owner != owner or row.lease_expires is None or row.lease_expires <= now:
            raise LeaseLostError(
                f"controller {owner} does not hold rollout {row.id}"
                f" (holder: {row.owner or 'nobody'})",
                hint="stop working on it; claim it again before changing it")


def _keep_if_same_owner(owner: str, now: dt.datetime) -> Any:
    # A renewal keeps the time the lease was first taken; a takeover restarts it.
    return case((LeaseRow.owner == owner, LeaseRow.acquired),
                else_=literal(now, UTCDateTime()))
