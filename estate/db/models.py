"""SQLAlchemy models of the gateway's local cache."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Base",
    "ChainCursorRow",
    "ChainTransactionRow",
    "CommandRow",
    "DeviceRow",
    "LedgerEntryRow",
    "ReadingRow",
    "RelayBatchRow",
    "UtcDateTime",
]

# An integer primary key that is BIGINT on PostgreSQL and the rowid alias on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class DeviceRow(Base):
    """A known board: from the central's sync or registered locally."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), unique=True)
    central_id: Mapped[int | None] = mapped_column(Integer, unique=True)
    connection_type: Mapped[str] = mapped_column(String(16))
    account_address: Mapped[str | None] = mapped_column(String(66))
    status: Mapped[str] = mapped_column(String(16), default="offline")
    load_on: Mapped[bool | None] = mapped_column(Boolean)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime)
    energy_total_wh: Mapped[float] = mapped_column(Float, default=0.0)
    charge_wh: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    """Energy a consumer used that is not charged yet (less than one token's worth)."""
    load_cut_off: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """The gateway switched the load off for want of tokens."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ReadingRow(Base):
    """One stored reading. `(device, boot, seq, digest)` identifies a board's message.

    `boot` counts the board's restarts as the gateway saw them (its `seq` going back
    without the broker's redelivery flag); `digest` fingerprints the payload bytes, so
    a redelivered message hits the same key and a new one with a reused `seq` does not.
    Readings without `seq` have a NULL key part and are never de-duplicated.
    """

    __tablename__ = "readings"
    __table_args__ = (
        UniqueConstraint("device_pk", "boot", "seq", "digest", name="uq_readings_message"),
        Index("ix_readings_device_ts", "device_pk", "ts"),
        Index("ix_readings_relay", "relay_batch", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    boot: Mapped[int] = mapped_column(Integer, default=0)
    seq: Mapped[int | None] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(16))
    ts: Mapped[datetime] = mapped_column(UtcDateTime)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    voltage: Mapped[float] = mapped_column(Float)
    current: Mapped[float] = mapped_column(Float)
    power: Mapped[float] = mapped_column(Float)
    energy_wh: Mapped[float] = mapped_column(Float)
    load_on: Mapped[bool | None] = mapped_column(Boolean)
    current_1: Mapped[float | None] = mapped_column(Float)
    voltage_1: Mapped[float | None] = mapped_column(Float)
    relay_batch: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("relay_batches.batch_id", ondelete="SET NULL")
    )
    """The outbox: NULL until the reading is put in a batch for the central."""


class RelayBatchRow(Base):
    """A batch of readings for the central's `/readings`; its id makes a retry idempotent."""

    __tablename__ = "relay_batches"
    __table_args__ = (Index("ix_relay_batches_sent", "sent_at"),)

    batch_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    size: Mapped[int] = mapped_column(Integer)


class CommandRow(Base):
    """A command the gateway sent to a board (keep-alives are counted, not stored)."""

    __tablename__ = "commands"
    __table_args__ = (Index("ix_commands_device_at", "device_pk", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    balance: Mapped[int] = mapped_column(BigInteger)
    instruction: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(32))


class LedgerEntryRow(Base):
    """One consumption to charge on chain: `amount` SCT from `account_address` (normalised).

    `pending` until put in a transaction, then `submitted` (with its `nonce` and the
    `tx_hash` of its latest signed transaction), then `accepted`, or `rejected` when
    the contract refuses it for good. It is written in the transaction that stored the
    readings whose energy it charges. `notified_at`: when the central was told.
    A device with ledger entries cannot be deleted (its debt would vanish).
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_status", "status", "id"),
        Index("ix_ledger_entries_tx", "tx_hash"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    account_address: Mapped[str] = mapped_column(String(66))
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    tx_hash: Mapped[str | None] = mapped_column(String(66))
    nonce: Mapped[int | None] = mapped_column(BigInteger)
    submitted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    settled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(300))
    notified_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ChainTransactionRow(Base):
    """An invoke the gateway signed, recorded before it is sent.

    `sender` is the gateway account that signed it. Several rows may share a nonce: a
    transaction the node lost is replaced by one signed anew with the same nonce and
    the same calls, so that at most one of them can ever be included. `payload` is
    the signed transaction as broadcast (JSON), to send it again unchanged. `status`:
    `submitted`, then `accepted` or `reverted` (the one included), `replaced` (another
    of its nonce was), or `dropped` (its nonce was used by none of them).
    """

    __tablename__ = "chain_transactions"
    __table_args__ = (Index("ix_chain_transactions_sender", "sender", "status", "nonce"),)

    tx_hash: Mapped[str] = mapped_column(String(66), primary_key=True)
    sender: Mapped[str] = mapped_column(String(66))
    nonce: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="submitted")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    settled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    block_number: Mapped[int | None] = mapped_column(BigInteger)
    revert_reason: Mapped[str | None] = mapped_column(String(300))


class ChainCursorRow(Base):
    """How far a gateway has read the chain's events (the last processed block), by name."""

    __tablename__ = "chain_cursors"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    block_number: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
