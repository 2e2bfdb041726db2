"""The ledger's rules, as plain functions: which pending consumes go in the next multicall,
and how a multicall that would revert is split to find the calls that make it revert.

A multicall reverts whole when one call reverts (PROTOCOL section 4), so only calls
known to succeed are batched: an account's entries go in only as far as its known
balance covers them, and an account whose consume reverted for want of tokens waits
until its balance grows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import attrs

from estate.db.ledger import LedgerEntry
from estate.sct_contract import normalise_address

__all__ = [
    "INSUFFICIENT_BALANCE",
    "ConsumeCall",
    "Plan",
    "is_insufficient_balance",
    "isolate_reverting",
    "plan_consumes",
]

INSUFFICIENT_BALANCE = "INSUFFICIENT BALANCE"


@attrs.frozen
class ConsumeCall:
    """One `consume(account, amount)` in a multicall, and the ledger entries it charges."""

    account: str
    amount: int
    entries: tuple[LedgerEntry, ...]

    @property
    def entry_ids(self) -> tuple[int, ...]:
        return tuple(e.id for e in self.entries)


@attrs.frozen
class Plan:
    """The calls of the next multicall, and the accounts left waiting for their balance."""

    calls: tuple[ConsumeCall, ...]
    waiting: Mapping[str, int]
    """Account -> tokens it owes and cannot pay yet."""
    more: bool
    """More accounts had payable entries than one multicall takes."""


def plan_consumes(
    entries: Iterable[LedgerEntry],
    balances: Mapping[str, int],
    skip: Collection[str],
    max_calls: int,
) -> Plan:
    """One `consume` per account, oldest accounts first, at most `max_calls` of them.

    An account's entries are taken oldest first as long as its known balance covers
    their sum (an unknown balance lets them all through: the fee estimate decides).
    Accounts in `skip` (whose known balance proved wrong and is not read again yet) wait.
    """
    by_account: dict[str, list[LedgerEntry]] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        by_account.setdefault(normalise_address(entry.account_address), []).append(entry)
    calls: list[ConsumeCall] = []
    waiting: dict[str, int] = {}
    more = False
    for account, owed in by_account.items():
        balance = balances.get(account)
        if account in skip:
            waiting[account] = sum(e.amount for e in owed)
            continue
        taken: list[LedgerEntry] = []
        total = 0
        for entry in owed:
            if balance is not None and total + entry.amount > balance:
                break
            taken.append(entry)
            total += entry.amount
        if len(taken) < len(owed):
            waiting[account] = sum(e.amount for e in owed[len(taken) :])
        if not taken:
            continue
        if len(calls) == max_calls:
            more = True
            continue
        calls.append(ConsumeCall(account, total, tuple(taken)))
    return Plan(tuple(calls), waiting, more)


def isolate_reverting(
    calls: Sequence[ConsumeCall], revert_reason: Callable[[Sequence[ConsumeCall]], str | None]
) -> tuple[list[ConsumeCall], list[tuple[ConsumeCall, str]]]:
    """Split `calls` into those that succeed together and those that revert, with why.

    `revert_reason(calls)` simulates a multicall (a fee estimate): None if it would
    succeed, else the revert reason. Bisection: about 2 k log2 n simulations for k
    reverting calls among n. Consumes of distinct accounts do not depend on each
    other, so the halves that succeed also succeed together.
    """
    reason = revert_reason(calls)
    if reason is None:
        return list(calls), []
    if len(calls) == 1:
        return [], [(calls[0], reason)]
    middle = len(calls) // 2
    good_left, bad_left = isolate_reverting(calls[:middle], revert_reason)
    good_right, bad_right = isolate_reverting(calls[middle:], revert_reason)
    return good_left + good_right, bad_left + bad_right


def is_insufficient_balance(reason: str) -> bool:
    """The contract's revert for an account with fewer tokens than the consume asks."""
    return INSUFFICIENT_BALANCE in reason.upper()
