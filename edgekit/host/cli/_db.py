"""``edgekit db upgrade``: migrate the fleet database to this edgekit's schema.

A store migrates its database when it opens it; this command does it on its own, for an
operator who wants the upgrade done (and seen) before the controllers restart.
"""

from __future__ import annotations

import click

from edgekit.host.cli._app import cli, emit_json


@cli.group()
def db() -> None:
    """The fleet database: schema migrations (docs/database.md)."""


@db.command("upgrade")
@click.option("--db", "db_url", metavar="URL",
              help="Database URL (default: $EDGEKIT_DB or ~/.edgekit/edgekit.db).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def db_upgrade(db_url: str | None, as_json: bool) -> None:
    """Migrate the database to the newest schema revision (nothing to do: says so)."""
    # The host side needs SQLAlchemy; import it only when a host command runs.
    from edgekit.host.db import Store
    from edgekit.host.db._engine import redact

    with Store(db_url) as store:
        done, url = store.migrated, redact(store.url)
    if as_json:
        emit_json({"database": url, "before": done.before, "after": done.after,
                   "changed": done.changed})
    elif done.changed:
        click.echo(f"{url}: schema upgraded from revision {done.before or '(empty)'}"
                   f" to {done.after}")
    else:
        click.echo(f"{url}: schema already at revision {done.after}")
