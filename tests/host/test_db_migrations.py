"""Schema migrations, on SQLite and on the real PostgreSQL server.

An old database is built from ``schema_v1/<dialect>.sql``: the DDL that edgekit emitted
before migrations existed (commit c0dff34), with rows in every table; opening it must upgrade
it and keep every row.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import MetaData, create_engine, insert, text
from sqlalchemy.engine import Connection, make_url

from edgekit.errors import ConfigError
from edgekit.host.cli import cli
from edgekit.host.db import SCHEMA_VERSION, Store
from edgekit.host.db._migrate import FIRST_REVISION, head_revision
from edgekit.host.db._schema import Base

SCHEMA_V1 = Path(__file__).parent / "schema_v1"
T0 = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


def _engine(db_url: str) -> Any:
    url = make_url(db_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url)


def _differences(store: Store) -> list[Any]:
    """What separates the database's schema from the models (empty: they agree)."""
    with store.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def _old_database(db_url: str) -> None:
    """A database as edgekit at schema version 1 made it, with a row in every table."""
    engine = _engine(db_url)
    dialect = engine.dialect.name
    ddl = (SCHEMA_V1 / f"{dialect}.sql").read_text()
    statements = "\n".join(ln for ln in ddl.splitlines() if not ln.startswith("--")).split(";")
    # SQLite keeps times as naive UTC text; PostgreSQL has timestamptz.
    t0 = T0.replace(tzinfo=None) if dialect == "sqlite" else T0
    later = t0 + dt.timedelta(hours=1)
    with engine.begin() as conn:
        for statement in statements:
            if statement.strip():
                conn.execute(text(statement))
        tables = MetaData()
        tables.reflect(conn)
        _insert_v1_rows(conn, tables.tables, t0, later)
    engine.dispose()


def _insert_v1_rows(conn: Connection, t: Any, t0: dt.datetime, later: dt.datetime) -> None:
    rows: list[tuple[str, dict[str, Any]]] = [
        ("schema_info", {"id": 1, "version": 1, "created": t0}),
        ("devices", {"fleet": "f", "device_id": "d1", "online": True, "session_seq": 3,
                     "model_name": "tiny", "model_version": "1.0.0", "first_seen": t0,
                     "last_seen": t0, "status": {"state": "serving"}, "accuracy": 0.9,
                     "label_count": 10, "metrics_session": 3, "metrics_seq": 1}),
        ("metrics", {"fleet": "f", "device_id": "d1", "session": 3, "seq": 1, "ts": t0,
                     "received": t0, "payload": {"seq": 1}}),
        ("models", {"name": "tiny", "version": "1.0.0", "sha256": "a" * 64, "size": 123,
                    "format": "onnx", "task": "classification",
                    "path": "tiny/1.0.0/model.edgepkg", "manifest": {"name": "tiny"},
                    "evaluation": {"accuracy": 0.9}, "signed": False,
                    "signature_verified": False, "created": t0}),
        ("model_channels", {"name": "tiny", "channel": "stable", "version": "1.0.0",
                            "promoted": t0}),
        ("rollouts", {"id": 1, "fleet": "f", "model_name": "tiny", "model_version": "1.0.0",
                      "state": "running", "plan": {"canary": 1}, "current_wave": 0,
                      "owner": "ctl", "lease_expires": later, "created": t0, "updated": t0}),
        ("rollout_targets", {"rollout_id": 1, "device_id": "d1", "wave": 0,
                             "state": "assigned", "assigned_at": t0, "updated": t0}),
        ("events", {"fleet": "f", "device_id": "d1", "seq": 7, "kind": "ota.failed",
                    "level": "error", "message": "bad hash", "ts": t0, "rollout_id": 1}),
        ("events", {"fleet": "f", "device_id": None, "seq": None, "kind": "rollout.created",
                    "level": "info", "message": "", "ts": t0, "rollout_id": 1}),
        ("samples", {"fleet": "f", "device_id": "d1", "prediction_id": "p1", "row": 0,
                     "ts": t0, "inputs": b"npz", "label": 2, "prediction": 1}),
        ("leases", {"name": "policy:f", "owner": "ctl", "expires": later, "acquired": t0}),
    ]
    for table, values in rows:
        conn.execute(insert(t[table]).values(**values))


def test_old_database_is_upgraded_and_keeps_its_rows(db_url: str) -> None:
    _old_database(db_url)
    store = Store(db_url)
    try:
        assert (store.migrated.before, store.migrated.after) == (FIRST_REVISION, head_revision())
        assert store.schema_version() == SCHEMA_VERSION
        assert _differences(store) == []
        device = store.get_device("f", "d1")
        assert device is not None and device.online and device.session == 3
        assert (device.status, device.metrics.accuracy) == ({"state": "serving"}, 0.9)
        assert [(m.session, m.seq, m.payload) for m in store.metrics_history("f")] == \
            [(3, 1, {"seq": 1})]
        model = store.get_model("tiny", "1.0.0")
        assert model is not None and model.channels == ["stable"] and model.size == 123
        rollout = store.get_rollout(1)
        assert (rollout.state, rollout.owner, rollout.plan) == ("running", "ctl", {"canary": 1})
        assert [t.device for t in store.list_rollout_targets(1)] == ["d1"]
        events = store.list_events(fleet="f")
        assert [(e.kind, e.device, e.session, e.seq, e.rollout_id) for e in events] == [
            ("ota.failed", "d1", 0, 7, 1), ("rollout.created", None, 0, None, 1)]
        assert store.count_samples(fleet="f") == 1
        assert store.lease_holder("policy:f", now=T0) == "ctl"
        # Old events are session 0: a redelivery is still a duplicate, a new session is not.
        assert store.record_event("f", "ota.failed", device="d1", seq=7) is None
        assert store.record_event("f", "ota.failed", device="d1", seq=7, session=4) is not None
    finally:
        store.close()
    again = Store(db_url)  # at the newest revision: nothing to do
    assert not again.migrated.changed
    again.close()


def test_migrations_of_an_empty_database_build_the_models(db_url: str) -> None:
    store = Store(db_url)
    try:
        assert store.migrated.before is None and store.migrated.after == head_revision()
        assert store.schema_version() == SCHEMA_VERSION == int(head_revision())
        assert _differences(store) == []
    finally:
        store.close()


def test_events_are_keyed_by_session(store: Store) -> None:
    first = store.record_event("f", "boot", device="d1", session=1, seq=1)
    second = store.record_event("f", "boot", device="d1", session=2, seq=1)
    assert first is not None and second is not None and first != second
    assert store.record_event("f", "boot", device="d1", session=2, seq=1) is None
    assert [(e.session, e.seq) for e in store.list_events(device="d1")] == [(1, 1), (2, 1)]
    assert store.list_events(device="d1")[0].to_dict()["session"] == 1


def test_database_of_a_newer_edgekit_is_refused(db_url: str) -> None:
    Store(db_url).close()
    engine = _engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(ConfigError, match="schema revision 9999, newer than this edgekit"):
        Store(db_url)


def test_db_upgrade_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _old_database(url)
    runner = CliRunner()
    first = runner.invoke(cli, ["db", "upgrade", "--db", url])
    assert first.exit_code == 0, first.output
    assert f"upgraded from revision {FIRST_REVISION} to {head_revision()}" in first.output
    second = runner.invoke(cli, ["db", "upgrade", "--db", url, "--json"])
    assert second.exit_code == 0 and '"changed": false' in second.output
    bad = runner.invoke(cli, ["db", "upgrade", "--db", "nosuch://x"])
    assert bad.exit_code == 2 and "nosuch is not supported" in bad.output


def test_event_session_migration_can_be_undone(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from edgekit.host.db import _migrate

    store = Store(db_url)
    store.record_event("f", "boot", device="d1", session=1, seq=1)
    store.record_event("f", "boot", device="d1", session=2, seq=1)
    store.close()
    engine = _engine(db_url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(_migrate._MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, FIRST_REVISION)
    with engine.connect() as conn:
        # Without sessions the two events collide: the first one stays.
        assert conn.execute(text("SELECT count(*) FROM events")).scalar_one() == 1
        assert conn.execute(text("SELECT version FROM schema_info")).scalar_one() == 1
    engine.dispose()
    again = Store(db_url)
    try:
        assert (again.migrated.before, again.migrated.after) == (FIRST_REVISION, head_revision())
        assert _differences(again) == []
    finally:
        again.close()
