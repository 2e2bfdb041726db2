"""relay outbox: relay_batches and readings.relay_batch

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "relay_batches",
        sa.Column("batch_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("sent_at", Timestamp, nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_relay_batches")),
    )
    op.create_index("ix_relay_batches_sent", "relay_batches", ["sent_at"])
    with op.batch_alter_table("readings") as batch:
        batch.add_column(sa.Column("relay_batch", sa.String(length=36), nullable=True))
        batch.create_foreign_key(
            op.f("fk_readings_relay_batch_relay_batches"),
            "relay_batches",
            ["relay_batch"],
            ["batch_id"],
            ondelete="SET NULL",
        )
        batch.create_index("ix_readings_relay", ["relay_batch", "id"])


def downgrade() -> None:
    with op.batch_alter_table("readings") as batch:
        batch.drop_index("ix_readings_relay")
        batch.drop_constraint(op.f("fk_readings_relay_batch_relay_batches"), type_="foreignkey")
        batch.drop_column("relay_batch")
    op.drop_index("ix_relay_batches_sent", table_name="relay_batches")
    op.drop_table("relay_batches")
