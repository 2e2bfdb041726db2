"""The token ledger: consumptions to charge on chain, the transactions that charge them.

An entry is `pending` until the StarknetSigner puts it in a signed transaction; the
transaction and the entries' `submitted` state are committed together *before* the
transaction is sent, so that a crash at any point leaves a record of every
transaction that may be on chain and nothing is ever signed twice. The receipt then
settles the transaction: its entries become `accepted`, or `pending` again when it
reverted or was dropped (never included, its nonce reused by none of ours).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import attrs
from sqlalchemy import Connection, func, insert, select, update

from estate.db.models import ChainCursorRow, ChainTransactionRow, DeviceRow, LedgerEntryRow
from estate.sct_contract import normalise_address
from estate.types import DeviceId, DevicePk

__all__ = [
    "ChainTransaction",
    "LedgerConflict",
    "LedgerEntry",
    "get_cursor",
    "ledger_summary",
    "pending_entries",
    "record_balances",
    "record_submission",
    "reject_entries",
    "set_cursor",
    "settle",
    "submitted_transactions",
]

SETTLED = ("accepted", "reverted", "dropped")


class LedgerConflict(RuntimeError):
    """Entries to submit are no longer pending (another gateway on this database took them)."""


@attrs.frozen
class LedgerEntry:
    id: int
    device_pk: DevicePk
    device_id: DeviceId
    account_address: str
    amount: int
    status: str
    tx_hash: str | None = None
    nonce: int | None = None
    attempts: int = 0


@attrs.frozen
class ChainTransaction:
    """A signed transaction not yet settled, with the entries it charges."""

    tx_hash: str
    nonce: int
    payload: str
    entries: tuple[LedgerEntry, ...]


def _entries(conn: Connection, *where) -> tuple[LedgerEntry, ...]:
    rows = conn.execute(
        select(
            LedgerEntryRow.id,
            LedgerEntryRow.device_pk,
            DeviceRow.device_id,
            LedgerEntryRow.account_address,
            LedgerEntryRow.amount,
            LedgerEntryRow.status,
            LedgerEntryRow.tx_hash,
            LedgerEntryRow.nonce,
            LedgerEntryRow.attempts,
        )
        .join(DeviceRow, DeviceRow.id == LedgerEntryRow.device_pk)
        .where(*where)
        .order_by(LedgerEntryRow.id)
    )
    return tuple(LedgerEntry(*row) for row in rows)


def pending_entries(conn: Connection, limit: int = 10_000) -> tuple[LedgerEntry, ...]:
    """The oldest pending entries, in the order they were recorded."""
    ids = select(LedgerEntryRow.id).where(LedgerEntryRow.status == "pending")
    ids = ids.order_by(LedgerEntryRow.id).limit(limit).scalar_subquery()
    return _entries(conn, LedgerEntryRow.id.in_(ids))


def submitted_transactions(conn: Connection) -> tuple[ChainTransaction, ...]:
    """Every transaction signed and not settled yet, oldest nonce first."""
    rows = conn.execute(
        select(ChainTransactionRow.tx_hash, ChainTransactionRow.nonce, ChainTransactionRow.payload)
        .where(ChainTransactionRow.status == "submitted")
        .order_by(ChainTransactionRow.nonce)
    ).all()
    return tuple(
        ChainTransaction(tx_hash, nonce, payload, _entries(conn, LedgerEntryRow.tx_hash == tx_hash))
        for tx_hash, nonce, payload in rows
    )


def record_submission(
    conn: Connection,
    tx_hash: str,
    nonce: int,
    payload: str,
    entry_ids: Sequence[int],
    now: datetime,
) -> None:
    """Record a signed transaction and mark its entries submitted, before it is sent.

    Raise LedgerConflict (and the caller's transaction must roll back) if any entry is
    no longer pending.
    """
    conn.execute(
        insert(ChainTransactionRow).values(
            tx_hash=tx_hash, nonce=nonce, payload=payload, status="submitted", created_at=now
        )
    )
    marked = conn.execute(
        update(LedgerEntryRow)
        .where(LedgerEntryRow.id.in_(entry_ids), LedgerEntryRow.status == "pending")
        .values(
            status="submitted",
            tx_hash=tx_hash,
            nonce=nonce,
            submitted_at=now,
            attempts=LedgerEntryRow.attempts + 1,
        )
    ).rowcount
    if marked != len(set(entry_ids)):
        raise LedgerConflict(
            f"{len(set(entry_ids)) - marked} of {len(set(entry_ids))} ledger entries are no "
            "longer pending"
        )


def settle(
    conn: Connection,
    tx_hash: str,
    outcome: str,
    now: datetime,
    block_number: int | None = None,
    reason: str | None = None,
) -> tuple[LedgerEntry, ...]:
    """Settle a submitted transaction: `accepted`, `reverted` or `dropped`.

    Accepted: its entries are accepted. Reverted or dropped: its entries are pending
    again (with `reason` as their last error), to go in a later transaction. Return
    the entries as they were before (so the caller knows whom they charge). Settling
    an already settled transaction changes nothing and returns ().
    """
    if outcome not in SETTLED:
        raise ValueError(f"outcome {outcome!r}: expected one of {', '.join(SETTLED)}")
    done = conn.execute(
        update(ChainTransactionRow)
        .where(ChainTransactionRow.tx_hash == tx_hash, ChainTransactionRow.status == "submitted")
        .values(
            status=outcome,
            settled_at=now,
            block_number=block_number,
            revert_reason=reason[:300] if reason else None,
        )
    ).rowcount
    if not done:
        return ()
    entries = _entries(conn, LedgerEntryRow.tx_hash == tx_hash)
    mine = LedgerEntryRow.tx_hash == tx_hash
    if outcome == "accepted":
        conn.execute(update(LedgerEntryRow).where(mine).values(status="accepted", settled_at=now))
    else:
        conn.execute(
            update(LedgerEntryRow)
            .where(mine)
            .values(
                status="pending",
                tx_hash=None,
                nonce=None,
                submitted_at=None,
                error=(reason or outcome)[:300],
            )
        )
    return entries


def reject_entries(conn: Connection, entry_ids: Iterable[int], reason: str, now: datetime) -> int:
    """Mark pending entries rejected for good (the contract refuses them alone)."""
    return conn.execute(
        update(LedgerEntryRow)
        .where(LedgerEntryRow.id.in_(list(entry_ids)), LedgerEntryRow.status == "pending")
        .values(status="rejected", settled_at=now, error=reason[:300])
    ).rowcount


def record_balances(conn: Connection, balances: Mapping[str, int], now: datetime) -> None:
    """Store each account's balance on the devices it owns (addresses as normalised)."""
    if not balances:
        return
    owners = conn.execute(
        select(DeviceRow.id, DeviceRow.account_address).where(
            DeviceRow.account_address.is_not(None)
        )
    ).all()
    for pk, address in owners:
        try:
            balance = balances.get(normalise_address(address))
        except ValueError:
            continue
        if balance is not None:
            conn.execute(
                update(DeviceRow)
                .where(DeviceRow.id == pk, DeviceRow.balance != balance)
                .values(balance=balance, updated_at=now)
            )


def get_cursor(conn: Connection, name: str) -> int | None:
    """The last block whose events were processed, or None."""
    return conn.execute(
        select(ChainCursorRow.block_number).where(ChainCursorRow.name == name)
    ).scalar_one_or_none()


def set_cursor(conn: Connection, name: str, block_number: int, now: datetime) -> None:
    changed = conn.execute(
        update(ChainCursorRow)
        .where(ChainCursorRow.name == name)
        .values(block_number=block_number, updated_at=now)
    ).rowcount
    if not changed:
        conn.execute(
            insert(ChainCursorRow).values(name=name, block_number=block_number, updated_at=now)
        )


def ledger_summary(conn: Connection) -> dict[str, int]:
    """How many entries and tokens are in each state: {"pending": n, "pending_sct": k, ...}."""
    summary: dict[str, int] = {}
    for status, count, amount in conn.execute(
        select(
            LedgerEntryRow.status, func.count(), func.coalesce(func.sum(LedgerEntryRow.amount), 0)
        ).group_by(LedgerEntryRow.status)
    ):
        summary[status] = int(count)
        summary[f"{status}_sct"] = int(amount)
    return summary
