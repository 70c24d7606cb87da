"""Schema migrations: bring a fleet database to the schema this edgekit runs (Alembic).

The migrations live in ``edgekit/host/db/migrations/versions`` (``0001`` is the schema as it
was before migrations existed). :class:`~edgekit.host.db.Store` calls :func:`upgrade` when it
opens a database, inside one transaction, so a database is always either at its old revision
or at the new one; ``edgekit db upgrade`` does the same on demand.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection

from edgekit.errors import ConfigError
from edgekit.host.db._schema import SCHEMA_VERSION, SchemaInfo

__all__ = ["FIRST_REVISION", "Upgrade", "head_revision", "upgrade"]

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The revision of a database made before migrations existed (it has no alembic_version).
FIRST_REVISION = "0001"


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


def head_revision() -> str:
    """The newest revision this edgekit knows."""
    head = _script().get_current_head()
    assert head is not None, "the migrations folder has no revision"
    return head


class Upgrade:
    """What :func:`upgrade` did: the revision found (None: an empty database) and the one left."""

    def __init__(self, before: str | None, after: str) -> None:
        self.before = before
        self.after = after

    @property
    def changed(self) -> bool:
        return self.before != self.after


def upgrade(conn: Connection, where: str) -> Upgrade:
    """Migrate the database of ``conn`` to the newest revision, in the caller's transaction.

    An empty database gets every migration; one made before migrations existed is taken to
    be at :data:`FIRST_REVISION`.

    Raises:
        ConfigError: the database was made or migrated by a newer edgekit (``where`` names it
            in the message).
    """
    tables = set(inspect(conn).get_table_names())
    if "schema_info" in tables:
        found = conn.execute(select(SchemaInfo.version).where(SchemaInfo.id == 1)).scalar()
        if found is not None and found > SCHEMA_VERSION:
            raise _newer(where, f"schema version {found}", str(SCHEMA_VERSION))
    before = _current_revision(conn, tables)
    if before is None and "schema_info" in tables:
        before = FIRST_REVISION
        _run(conn, "stamp", FIRST_REVISION)
    head = head_revision()
    if before == head:
        return Upgrade(before, head)
    if before is not None and _unknown(before):
        raise _newer(where, f"schema revision {before}", head)
    _run(conn, "upgrade", head)
    return Upgrade(before, head)


def _current_revision(conn: Connection, tables: set[str]) -> str | None:
    # Read directly rather than through Alembic's MigrationContext, which logs its setup
    # at INFO level on every open.
    if "alembic_version" not in tables:
        return None
    found = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(found) > 1:  # several heads: not a history this edgekit wrote
        raise ConfigError(f"the database has several schema revisions ({', '.join(found)})",
                          hint="it was migrated by another tool; restore it from a backup")
    return found[0] if found else None


def _unknown(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is None
    except CommandError:  # an id no migration here has
        return True


def _run(conn: Connection, what: str, revision: str) -> None:
    cfg = _config()
    cfg.attributes["connection"] = conn
    if what == "stamp":
        command.stamp(cfg, revision)
    else:
        command.upgrade(cfg, revision)


def _newer(where: str, found: str, known: str) -> ConfigError:
    return ConfigError(f"database {where} has {found}, newer than this edgekit understands"
                       f" ({known})", hint="upgrade edgekit on this machine")
