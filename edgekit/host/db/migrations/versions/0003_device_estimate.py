"""The device summary keeps the accuracy estimated without labels: ``devices.estimated_accuracy``
and ``devices.estimated_count``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Agents report, beside the labelled figures, the accuracy estimated from the calibrated
confidence of the interval's predictions (metrics ``estimate``); ``fleet status`` shows the
latest one per device. Devices stored before this revision have none until their next
metrics message.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("estimated_accuracy", sa.Float(), nullable=True))
        batch.add_column(sa.Column("estimated_count", sa.BigInteger(), nullable=True))
    op.execute(sa.text("UPDATE schema_info SET version = 3 WHERE id = 1"))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("estimated_count")
        batch.drop_column("estimated_accuracy")
    op.execute(sa.text("UPDATE schema_info SET version = 2 WHERE id = 1"))
