"""Database connections: URL handling, SQLite settings, transactions, schema migration."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import msgspec
from sqlalchemy import Engine, create_engine, event, exc, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import StaticPool

from edgekit.errors import ConfigError
from edgekit.host.db._migrate import Upgrade, upgrade
from edgekit.host.db._schema import SchemaInfo
from edgekit.host.errors import StoreError

ENV_DB = "EDGEKIT_DB"
# Arbitrary constant key of the advisory lock that serialises migrations on PostgreSQL.
_SCHEMA_LOCK_KEY = 0x6564_6B74
_SQLITE_BUSY_TIMEOUT_S = 30.0


def default_db_url() -> str:
    """``$EDGEKIT_DB``, else a SQLite file at ``~/.edgekit/edgekit.db``."""
    env = os.environ.get(ENV_DB)
    if env:
        return env
    return f"sqlite:///{Path.home() / '.edgekit' / 'edgekit.db'}"


def redact(url: str | URL) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "<invalid URL>"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for a SQLite or PostgreSQL URL (``postgresql://`` means psycopg 3).

    SQLite connections run in WAL mode with foreign keys on, and write transactions start
    with ``BEGIN IMMEDIATE`` so that two writers queue instead of failing halfway.

    Raises:
        ConfigError: the URL is malformed or names another database kind.
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError as err:
        raise ConfigError(
            f"database URL {url!r} is not valid",
            hint="use sqlite:///path/to/edgekit.db or postgresql://user@host:5432/dbname",
        ) from err
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, echo=echo, pool_pre_ping=True, json_serializer=json_text)
    if backend == "sqlite":
        return _sqlite_engine(parsed, echo)
    raise ConfigError(
        f"database URL {redact(parsed)}: {backend} is not supported",
        hint="use a SQLite file (sqlite:///...) or PostgreSQL (postgresql://...)",
    )


def json_text(value: Any) -> str:
    """JSON columns' serializer: msgspec writes a metrics payload ~10x faster than json.dumps
    (the controller stores one per device message); NaN and infinities become null."""
    return msgspec.json.encode(value).decode()


def _sqlite_engine(url: URL, echo: bool) -> Engine:
    memory = url.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": json_text,
                              "connect_args": {"timeout": _SQLITE_BUSY_TIMEOUT_S,
                                               "check_same_thread": False}}
    if memory:
        # Every new connection to :memory: is a new empty database: share one.
        kwargs["poolclass"] = StaticPool
    else:
        path = Path(str(url.database)).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = url.set(database=str(path))
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The sqlite3 module's own transaction handling skips BEGIN before SELECTs and
        # cannot start IMMEDIATE transactions; turn it off and emit BEGIN ourselves.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("edgekit_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class StoreBase:
    """Connection handling that the parts of :class:`~edgekit.host.db.Store` share."""

    def __init__(self, url: str | None = None, *, echo: bool = False) -> None:
        """Open the database at ``url`` and migrate it to this edgekit's schema (an empty one
        gets the whole schema); ``self.migrated`` says from which revision.

        Raises:
            ConfigError: the URL is invalid, or the database was made by a newer edgekit.
            StoreError: the database cannot be reached.
        """
        self.url = url or default_db_url()
        self.engine = make_engine(self.url, echo=echo)
        self.dialect = self.engine.dialect.name
        self.migrated: Upgrade
        try:
            self._ensure_schema()
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back on any error.

        Raises:
            StoreError: the database cannot be reached or reports an operational failure.
        """
        try:
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(edgekit_write=True)
                with conn.begin():
                    yield conn
        except exc.OperationalError as err:
            raise StoreError(
                f"database {redact(self.url)}: {err.orig or err}",
                hint="check that the database server runs and the URL is right",
            ) from err

    def _insert(self, table: Any) -> Any:
        """A dialect INSERT, which has ``on_conflict_do_nothing`` / ``_do_update``."""
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _ensure_schema(self) -> None:
        with self._tx() as conn:
            if self.dialect == "postgresql":
                # Two controllers starting at once must not both migrate the schema.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            self.migrated = upgrade(conn, redact(self.url))

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._tx(write=False) as conn:
            return int(conn.execute(select(SchemaInfo.version)).scalar_one())
