"""Alembic's entry point: runs the migrations on the connection edgekit hands over.

:func:`edgekit.host.db._migrate.upgrade` puts an open connection, inside its transaction, in
``config.attributes["connection"]``; the whole upgrade then commits or rolls back as one.
"""

from __future__ import annotations

from alembic import context

from edgekit.host.db._schema import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER constraints, so batch operations copy the table.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
