"""The token ledger: consumptions to charge on chain, the transactions that charge them.

An entry is `pending` until the StarknetSigner puts it in a signed transaction; the
transaction and the entries' `submitted` state (with the nonce) are committed
together *before* the transaction is sent, so that after a crash at any point every
transaction that may be on chain is known and nothing is ever signed twice. A
transaction the node lost is replaced by one with the same nonce and the same calls,
so at most one of them can be included. Settling a nonce settles its entries:
`accepted`, or `pending` again when the transaction reverted or the nonce was used by
none of them (`dropped`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs
from sqlalchemy import Connection, func, insert, select, update

from estate.db.models import ChainCursorRow, ChainTransactionRow, DeviceRow, LedgerEntryRow
from estate.sct_contract import normalise_address
from estate.types import DeviceId, DevicePk

__all__ = [
    "LedgerConflict",
    "LedgerEntry",
    "Submission",
    "get_cursor",
    "ledger_summary",
    "mark_notified",
    "pending_entries",
    "record_balances",
    "record_replacement",
    "record_submission",
    "reject_entries",
    "set_cursor",
    "settle",
    "submissions",
    "unnotified_entries",
]

OUTCOMES = ("accepted", "reverted", "dropped")


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
class Submission:
    """A nonce of the gateway's account not settled yet: its signed transactions
    (`candidates`, (tx_hash, payload), oldest first) and the entries they charge."""

    nonce: int
    candidates: tuple[tuple[str, str], ...]
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


def pending_entries(
    conn: Connection, limit: int = 10_000, skip_accounts: Collection[str] = ()
) -> tuple[LedgerEntry, ...]:
    """The oldest pending entries, in the order they were recorded, but those of
    `skip_accounts` (normalised addresses), so that accounts that cannot pay never
    crowd out the others."""
    ids = select(LedgerEntryRow.id).where(LedgerEntryRow.status == "pending")
    if skip_accounts:
        ids = ids.where(LedgerEntryRow.account_address.not_in(list(skip_accounts)))
    ids = ids.order_by(LedgerEntryRow.id).limit(limit).scalar_subquery()
    return _entries(conn, LedgerEntryRow.id.in_(ids))


def _candidates(conn: Connection, sender: str, nonce: int) -> list[tuple[str, str]]:
    return [
        (tx_hash, payload)
        for tx_hash, payload in conn.execute(
            select(ChainTransactionRow.tx_hash, ChainTransactionRow.payload)
            .where(
                ChainTransactionRow.sender == sender,
                ChainTransactionRow.nonce == nonce,
                ChainTransactionRow.status == "submitted",
            )
            .order_by(ChainTransactionRow.created_at, ChainTransactionRow.tx_hash)
        )
    ]


def _submitted_entries(hashes: Collection[str]) -> tuple[Any, Any]:
    return (LedgerEntryRow.status == "submitted", LedgerEntryRow.tx_hash.in_(list(hashes)))


def submissions(conn: Connection, sender: str) -> tuple[Submission, ...]:
    """Every nonce of `sender` with a transaction not settled yet, lowest first."""
    nonces = conn.execute(
        select(ChainTransactionRow.nonce)
        .where(ChainTransactionRow.sender == sender, ChainTransactionRow.status == "submitted")
        .distinct()
        .order_by(ChainTransactionRow.nonce)
    ).scalars()
    found = []
    for nonce in list(nonces):
        candidates = _candidates(conn, sender, nonce)
        entries = _entries(conn, *_submitted_entries([h for h, _p in candidates]))
        found.append(Submission(nonce, tuple(candidates), entries))
    return tuple(found)


def _insert_transaction(
    conn: Connection, sender: str, tx_hash: str, nonce: int, payload: str, now: datetime
) -> None:
    conn.execute(
        insert(ChainTransactionRow).values(
            tx_hash=tx_hash,
            sender=sender,
            nonce=nonce,
            payload=payload,
            status="submitted",
            created_at=now,
        )
    )


def record_submission(
    conn: Connection,
    sender: str,
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
    _insert_transaction(conn, sender, tx_hash, nonce, payload, now)
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


def record_replacement(
    conn: Connection, sender: str, tx_hash: str, nonce: int, payload: str, now: datetime
) -> None:
    """Record a transaction signed anew for a nonce whose transaction the node lost.

    It carries the same calls; the nonce's entries now name it as their latest.
    """
    previous = [h for h, _p in _candidates(conn, sender, nonce)]
    if not previous:
        raise LedgerConflict(f"nonce {nonce} of {sender} has no transaction to replace")
    _insert_transaction(conn, sender, tx_hash, nonce, payload, now)
    conn.execute(
        update(LedgerEntryRow)
        .where(*_submitted_entries(previous))
        .values(tx_hash=tx_hash, attempts=LedgerEntryRow.attempts + 1)
    )


def settle(
    conn: Connection,
    sender: str,
    nonce: int,
    outcome: str,
    now: datetime,
    tx_hash: str | None = None,
    block_number: int | None = None,
    reason: str | None = None,
) -> tuple[LedgerEntry, ...]:
    """Settle a nonce: `tx_hash` was included and `accepted` or `reverted`, or the nonce
    was used by none of its transactions (`dropped`).

    Accepted: its entries are accepted. Reverted or dropped: they are pending again
    (with `reason` as their last error). The nonce's other transactions are `replaced`.
    Return the entries as they were (so the caller knows whom they charge); settling a
    settled nonce changes nothing and returns ().
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r}: expected one of {', '.join(OUTCOMES)}")
    if outcome != "dropped" and tx_hash is None:
        raise ValueError(f"an {outcome} nonce needs the hash of the transaction included")
    hashes = [h for h, _p in _candidates(conn, sender, nonce)]
    if not hashes:
        return ()
    entries = _entries(conn, *_submitted_entries(hashes))
    mine = _submitted_entries(hashes)
    for candidate in hashes:
        status = outcome if outcome == "dropped" or candidate == tx_hash else "replaced"
        conn.execute(
            update(ChainTransactionRow)
            .where(ChainTransactionRow.tx_hash == candidate)
            .values(
                status=status,
                settled_at=now,
                block_number=block_number if candidate == tx_hash else None,
                revert_reason=reason[:300] if reason and candidate == tx_hash else None,
            )
        )
    if outcome == "accepted":
        conn.execute(
            update(LedgerEntryRow)
            .where(*mine)
            .values(status="accepted", tx_hash=tx_hash, settled_at=now)
        )
    else:
        conn.execute(
            update(LedgerEntryRow)
            .where(*mine)
            .values(
                status="pending",
                tx_hash=None,
                nonce=None,
                submitted_at=None,
                error=(reason or outcome)[:300],
            )
        )
    return entries


def unnotified_entries(
    conn: Connection, settled_before: datetime, limit: int = 1000
) -> tuple[LedgerEntry, ...]:
    """Entries accepted before `settled_before` that the central was not told of, oldest
    first (later ones are being told now)."""
    ids = select(LedgerEntryRow.id).where(
        LedgerEntryRow.status == "accepted",
        LedgerEntryRow.notified_at.is_(None),
        LedgerEntryRow.settled_at < settled_before,
    )
    ids = ids.order_by(LedgerEntryRow.id).limit(limit).scalar_subquery()
    return _entries(conn, LedgerEntryRow.id.in_(ids))


def mark_notified(conn: Connection, entry_ids: Iterable[int], now: datetime) -> None:
    conn.execute(
        update(LedgerEntryRow)
        .where(LedgerEntryRow.id.in_(list(entry_ids)))
        .values(notified_at=now)
    )


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
