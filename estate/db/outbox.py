"""The relay outbox: readings wait here, in batches, until the central has them.

A reading's `relay_batch` is NULL until it is claimed into a batch; a batch's
`sent_at` is NULL until the central accepted it. A batch is resent with the same id
until then, so a retry never stores twice at the central, and after a restart the
unsent batch is sent first. Readings are claimed in id order, so each device's
readings reach the central in the order they were stored. Claims skip rows another
gateway sharing the database holds (PostgreSQL `FOR UPDATE SKIP LOCKED`).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import attrs
from sqlalchemy import Connection, delete, func, insert, select, update

from estate.central_wire import ReadingsBatch, RelayedReading
from estate.db.models import DeviceRow, ReadingRow, RelayBatchRow

__all__ = ["OutboxState", "claim_batch", "mark_sent", "outbox_state", "prune_relayed"]


@attrs.frozen
class OutboxState:
    """Readings not yet accepted by the central, and the oldest one's receive time."""

    waiting: int
    oldest: datetime | None


def _load(conn: Connection, batch_id: str) -> ReadingsBatch:
    rows = conn.execute(
        select(
            DeviceRow.device_id,
            ReadingRow.ts,
            ReadingRow.voltage,
            ReadingRow.current,
            ReadingRow.power,
            ReadingRow.energy_wh,
        )
        .join(DeviceRow, DeviceRow.id == ReadingRow.device_pk)
        .where(ReadingRow.relay_batch == batch_id)
        .order_by(ReadingRow.id)
    )
    return ReadingsBatch(batch_id, tuple(RelayedReading(*row) for row in rows))


def claim_batch(
    conn: Connection, max_size: int, max_age: timedelta, now: datetime
) -> ReadingsBatch | None:
    """The unsent batch if there is one, else a new batch of the oldest waiting readings.

    A new batch is made only when `max_size` readings wait or the oldest has waited
    `max_age`; otherwise None.
    """
    unsent = conn.execute(
        select(RelayBatchRow.batch_id)
        .where(RelayBatchRow.sent_at.is_(None))
        .order_by(RelayBatchRow.created_at)
        .limit(1)
    ).scalar()
    if unsent is not None:
        return _load(conn, unsent)
    candidates = (
        select(ReadingRow.id, ReadingRow.received_at)
        .where(ReadingRow.relay_batch.is_(None))
        .order_by(ReadingRow.id)
        .limit(max_size)
    )
    if conn.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    rows = conn.execute(candidates).all()
    if not rows:
        return None
    if len(rows) < max_size and now - min(r.received_at for r in rows) < max_age:
        return None
    batch_id = str(uuid.uuid4())
    conn.execute(
        insert(RelayBatchRow).values(batch_id=batch_id, created_at=now, size=len(rows))
    )
    ids = [r.id for r in rows]
    for start in range(0, len(ids), 1000):
        conn.execute(
            update(ReadingRow)
            .where(ReadingRow.id.in_(ids[start : start + 1000]))
            .values(relay_batch=batch_id)
        )
    return _load(conn, batch_id)


def mark_sent(conn: Connection, batch_id: str, now: datetime) -> None:
    """The central accepted the batch."""
    conn.execute(
        update(RelayBatchRow).where(RelayBatchRow.batch_id == batch_id).values(sent_at=now)
    )


def outbox_state(conn: Connection) -> OutboxState:
    """How many readings the central does not have yet, and since when."""
    unsent = select(RelayBatchRow.batch_id).where(RelayBatchRow.sent_at.is_(None))
    waiting, oldest = conn.execute(
        select(func.count(), func.min(ReadingRow.received_at)).where(
            (ReadingRow.relay_batch.is_(None)) | (ReadingRow.relay_batch.in_(unsent))
        )
    ).one()
    return OutboxState(waiting, oldest)


def prune_relayed(conn: Connection, older_than: datetime) -> int:
    """Delete readings the central accepted before `older_than`; return how many."""
    old = select(RelayBatchRow.batch_id).where(RelayBatchRow.sent_at < older_than)
    deleted = conn.execute(delete(ReadingRow).where(ReadingRow.relay_batch.in_(old))).rowcount
    conn.execute(delete(RelayBatchRow).where(RelayBatchRow.sent_at < older_than))
    return deleted
