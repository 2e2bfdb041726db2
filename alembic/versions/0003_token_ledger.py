"""token ledger: ledger_entries, chain_transactions, chain_cursors, devices' charge state

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(
            sa.Column("charge_wh", sa.Float(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(
            sa.Column("load_cut_off", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "ledger_entries",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("account_address", sa.String(length=66), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("nonce", sa.BigInteger(), nullable=True),
        sa.Column("submitted_at", Timestamp, nullable=True),
        sa.Column("settled_at", Timestamp, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.Column("notified_at", Timestamp, nullable=True),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.id"], name=op.f("fk_ledger_entries_device_pk_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    op.create_index("ix_ledger_entries_status", "ledger_entries", ["status", "id"])
    op.create_index("ix_ledger_entries_tx", "ledger_entries", ["tx_hash"])
    op.create_table(
        "chain_transactions",
        sa.Column("tx_hash", sa.String(length=66), nullable=False),
        sa.Column("sender", sa.String(length=66), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("settled_at", Timestamp, nullable=True),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("revert_reason", sa.String(length=300), nullable=True),
        sa.PrimaryKeyConstraint("tx_hash", name=op.f("pk_chain_transactions")),
    )
    op.create_index(
        "ix_chain_transactions_sender", "chain_transactions", ["sender", "status", "nonce"]
    )
    op.create_table(
        "chain_cursors",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_chain_cursors")),
    )


def downgrade() -> None:
    op.drop_table("chain_cursors")
    op.drop_index("ix_chain_transactions_sender", table_name="chain_transactions")
    op.drop_table("chain_transactions")
    op.drop_index("ix_ledger_entries_tx", table_name="ledger_entries")
    op.drop_index("ix_ledger_entries_status", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("load_cut_off")
        batch.drop_column("charge_wh")
