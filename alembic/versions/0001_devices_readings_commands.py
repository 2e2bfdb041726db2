"""devices, readings, commands

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("central_id", sa.Integer(), nullable=True),
        sa.Column("connection_type", sa.String(length=16), nullable=False),
        sa.Column("account_address", sa.String(length=66), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("load_on", sa.Boolean(), nullable=True),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", Timestamp, nullable=True),
        sa.Column("energy_total_wh", sa.Float(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("central_id", name=op.f("uq_devices_central_id")),
        sa.UniqueConstraint("device_id", name=op.f("uq_devices_device_id")),
    )
    op.create_table(
        "commands",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("at", Timestamp, nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("instruction", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_pk"],
            ["devices.id"],
            name=op.f("fk_commands_device_pk_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commands")),
    )
    op.create_index("ix_commands_device_at", "commands", ["device_pk", "at"])
    op.create_table(
        "readings",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("boot", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("digest", sa.String(length=16), nullable=False),
        sa.Column("ts", Timestamp, nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("voltage", sa.Float(), nullable=False),
        sa.Column("current", sa.Float(), nullable=False),
        sa.Column("power", sa.Float(), nullable=False),
        sa.Column("energy_wh", sa.Float(), nullable=False),
        sa.Column("load_on", sa.Boolean(), nullable=True),
        sa.Column("current_1", sa.Float(), nullable=True),
        sa.Column("voltage_1", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_pk"],
            ["devices.id"],
            name=op.f("fk_readings_device_pk_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_readings")),
        sa.UniqueConstraint("device_pk", "boot", "seq", "digest", name="uq_readings_message"),
    )
    op.create_index("ix_readings_device_ts", "readings", ["device_pk", "ts"])


def downgrade() -> None:
    op.drop_index("ix_readings_device_ts", table_name="readings")
    op.drop_table("readings")
    op.drop_index("ix_commands_device_at", table_name="commands")
    op.drop_table("commands")
    op.drop_table("devices")
