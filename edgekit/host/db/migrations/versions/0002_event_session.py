"""Events keyed by session: ``events.session``, unique (fleet, device_id, session, seq).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

An agent's event ``seq`` starts again at each session, so (fleet, device_id, seq) dropped the
events of a new session as duplicates of the old one's. Events stored before this revision get
session 0, the session of agents whose seq runs on across restarts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: on SQLite the table is copied into a new one with the new constraint.
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("session", sa.BigInteger(), nullable=False,
                                   server_default=sa.text("0")))
        batch.drop_constraint("uq_events_device_seq", type_="unique")
        batch.create_unique_constraint("uq_events_device_session_seq",
                                       ["fleet", "device_id", "session", "seq"])
    op.execute(sa.text("UPDATE schema_info SET version = 2 WHERE id = 1"))


def downgrade() -> None:
    # Events that differ only by session would collide: keep the first of each.
    op.execute(sa.text(
        "DELETE FROM events WHERE seq IS NOT NULL AND id NOT IN (SELECT MIN(id) FROM events"
        " WHERE seq IS NOT NULL GROUP BY fleet, device_id, seq)"))
    with op.batch_alter_table("events") as batch:
        batch.drop_constraint("uq_events_device_session_seq", type_="unique")
        batch.create_unique_constraint("uq_events_device_seq", ["fleet", "device_id", "seq"])
        batch.drop_column("session")
    op.execute(sa.text("UPDATE schema_info SET version = 1 WHERE id = 1"))
