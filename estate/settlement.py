"""Settling the ledger on Starknet, as a plain class: the StarknetSigner's logic.

`Settlement` owns the gateway account's nonce, the transaction in flight, the known
balances and the event cursor. It talks to the chain through a `StarknetChain` and to
the ledger through a `LedgerPort` (the DbWriter, asked, in the actor), both blocking,
and returns what the actor must tell others as effects. It never raises for a failing
node or database: it backs off and reports it (`reachable`, counters).

The rules (README "Token accounting on Starknet"):

- Pending entries gather for `window` seconds, then go as one multicall, one
  `consume(account, n)` per account, only as far as each known balance covers.
- A transaction is recorded, with its nonce, before it is sent; one is in flight at
  a time. A transaction the node lost is broadcast again unchanged, and if the node
  refuses it now, replaced by one signed anew with the same nonce and calls: at most
  one of a nonce's transactions can be included, so nothing is charged twice. A nonce
  is settled when one of its transactions is in a block (accepted or reverted), or
  dropped when the nonce is used and none of them is known for `DROP_AFTER` seconds.
- A multicall that would revert is split to find the calls that make it revert: an
  account that cannot pay waits until its balance grows; a call refused for another
  reason while others succeed is rejected; when every call fails alike, it is the
  gateway's own problem and nothing is rejected.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs

from estate.backoff import Backoff
from estate.db.ledger import LedgerConflict, LedgerEntry, Submission
from estate.ledger import ConsumeCall, is_insufficient_balance, isolate_reverting, plan_consumes
from estate.logs import RateLimitedLog
from estate.sct_contract import normalise_address
from estate.starknet_client import (
    ChainError,
    ChainRejected,
    ChainReverted,
    ChainUnavailable,
    NonceError,
    SignedInvoke,
    StarknetChain,
)
from estate.types import DeviceId

__all__ = [
    "BalancesRead",
    "Charged",
    "DbUnavailable",
    "LedgerPort",
    "Settlement",
]

logger = logging.getLogger("estate.signer")

RECEIPT_POLL = 1.0
"""Seconds between two looks at the transaction in flight."""
RESEND_AFTER = 30.0
"""Seconds a transaction may stay unknown to the node before it is broadcast again."""
DROP_AFTER = 120.0
"""Seconds a nonce must be used, with none of its transactions known, before it is dropped."""
MAX_REPLACEMENTS = 5
"""Transactions signed anew for one nonce at most (then the log asks for a look)."""
STUCK_WARNING = 300.0
"""Seconds a transaction may wait for a block before the log says it is stuck."""
EVENT_BLOCKS_MAX = 10_000
"""Blocks read in one poll of events at most (a gateway far behind catches up in steps)."""


class DbUnavailable(Exception):
    """The ledger did not answer (the writer restarting, the database down)."""


class LedgerPort(Protocol):
    """The ledger as the settlement sees it (the actor asks the DbWriter)."""

    def pending(self, skip_accounts: frozenset[str]) -> tuple[LedgerEntry, ...]: ...
    def submissions(self) -> tuple[Submission, ...]: ...
    def record_submission(self, signed: SignedInvoke, entry_ids: tuple[int, ...]) -> None: ...
    def record_replacement(self, signed: SignedInvoke) -> None: ...
    def settle(
        self,
        nonce: int,
        outcome: str,
        tx_hash: str | None = None,
        block: int | None = None,
        reason: str | None = None,
    ) -> tuple[LedgerEntry, ...]: ...
    def reject(self, entry_ids: tuple[int, ...], reason: str) -> None: ...
    def cursor(self) -> int | None: ...
    def set_cursor(self, block: int) -> None: ...


@attrs.frozen
class BalancesRead:
    """Balances just read on chain; boards in `charged` were charged in `tx_hash`."""

    balances: dict[str, int]
    reason: str
    tx_hash: str | None = None
    charged: frozenset[DeviceId] = frozenset()


@attrs.frozen
class Charged:
    """A nonce's transaction was accepted: these entries are charged."""

    tx_hash: str
    entries: tuple[LedgerEntry, ...]


Effect = BalancesRead | Charged


@attrs.define
class InFlight:
    """The nonce sent and not settled: its transactions (the newest last) and entries."""

    nonce: int
    candidates: list[SignedInvoke]
    entries: tuple[LedgerEntry, ...]
    broadcast_at: float
    next_look: float
    since: float
    unknown_since: float | None = None

    @classmethod
    def of(cls, submission: Submission, now: float) -> InFlight:
        """A nonce left by a previous run: looked at now, broadcast again if unknown."""
        signed = [SignedInvoke(h, submission.nonce, p) for h, p in submission.candidates]
        return cls(
            submission.nonce, signed, submission.entries, now - RESEND_AFTER, now, now
        )


class Settlement:
    """The gateway account's consumes on chain: plan, sign, record, send, settle."""

    def __init__(
        self,
        chain: StarknetChain,
        ledger: LedgerPort,
        window: float,
        max_calls: int,
        concurrency: int,
        event_interval: float,
        clock: Callable[[], float],
    ) -> None:
        self.chain, self.ledger, self.clock = chain, ledger, clock
        self.window, self.max_calls = window, max_calls
        self.concurrency, self.event_interval = concurrency, event_interval
        self.ready = False
        self.reachable: bool | None = None
        self.nonce: int | None = None
        self.accounts: set[str] = set()
        self.balances: dict[str, int] = {}
        self.stale: set[str] = set()
        """Accounts whose known balance proved wrong and could not be read again."""
        self.owing: dict[str, int] = {}
        """Accounts that owe more than their balance covers: tokens owed."""
        self.in_flight: InFlight | None = None
        self.batch_due: float | None = None
        self.refresh_due = False
        self.retry_at = 0.0
        self.backoff = Backoff(ceiling=60.0)
        self.events_at = 0.0
        self.events_backoff = Backoff(ceiling=300.0)
        self.cursor: int | None = None
        self.counts: Counter[str] = Counter()
        self.error_log = RateLimitedLog(logger, interval=30.0)

    # -- inputs ----------------------------------------------------------------------------

    def follow(self, accounts: Iterable[str]) -> None:
        """These (normalised) accounts are the boards' owners: read them all soon."""
        self.accounts = set(accounts)
        self.refresh_due = True

    def ledger_changed(self) -> None:
        """New pending entries: they go when the window closes."""
        if self.batch_due is None:
            self.batch_due = self.clock() + self.window

    def read_balance(self, account: str) -> int:
        """Read one account's balance now (raises ChainError)."""
        balance = self.chain.balance_of(account)
        self._note_balance(account, balance)
        return balance

    def tick(self) -> list[Effect]:
        """Do what is due; failures back off, never raise."""
        now = self.clock()
        effects: list[Effect] = []
        if now >= self.retry_at:
            answered = self.chain.answers
            try:
                self._due(now, effects)
            except (ChainError, DbUnavailable) as exc:
                self._failed(exc, now)
            else:
                self.backoff.succeeded()
                if self.chain.answers > answered:
                    self._reachable()
        if self.ready and now >= self.events_at:
            try:
                effects += self._poll_events()
            except (ChainError, DbUnavailable) as exc:
                self.events_at = now + self.events_backoff.failed()
                self.error_log.warning("events", "cannot read SCT events: %s", exc)
            else:
                self.events_backoff.succeeded()
                self.events_at = now + self.event_interval
        return effects

    def _due(self, now: float, effects: list[Effect]) -> None:
        """Start, read balances, settle or submit; `effects` keeps what was done if a
        later step fails."""
        if not self.ready:
            self._start(now)
        if self.refresh_due:
            effects += self._read(self.accounts, "sync")
            self.refresh_due = False
        if self.in_flight is not None:
            if now >= self.in_flight.next_look:
                effects += self._look(now)
        elif self.batch_due is not None and now >= self.batch_due:
            effects += self._submit(now)

    # -- start -----------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        """Check the chain, read the nonce, take up what a previous run left submitted."""
        self.chain.check_chain()
        left = self.ledger.submissions()
        self.cursor = self.ledger.cursor()
        # a transaction of ours may wait in the mempool, not counted by the node's nonce yet
        self.nonce = max([self.chain.nonce(), *(s.nonce + 1 for s in left)])
        for submission in left:
            logger.info(
                "reconciling nonce %d (%d transactions, %d entries) left by a previous run",
                submission.nonce,
                len(submission.candidates),
                len(submission.entries),
            )
        if left:
            self.in_flight = InFlight.of(left[0], now)
        self.ready = True
        self.batch_due = now  # entries left pending by a previous run go at once
        logger.info("signer ready: account nonce %d", self.nonce)

    # -- balances --------------------------------------------------------------------------

    def _read(
        self,
        accounts: Iterable[str],
        reason: str,
        tx_hash: str | None = None,
        charged: frozenset[DeviceId] = frozenset(),
    ) -> list[Effect]:
        accounts = sorted(set(accounts))
        if not accounts:
            return []
        read = self.chain.balances(accounts, self.concurrency)
        fresh = {a: b for a, b in read.items() if isinstance(b, int)}
        failed = {a: b for a, b in read.items() if not isinstance(b, int)}
        if failed:
            account, error = next(iter(failed.items()))
            self.error_log.warning(
                "balance", "cannot read %d balances (%s: %s)", len(failed), account, error
            )
        for account, balance in fresh.items():
            self._note_balance(account, balance)
        self.counts["balance_reads"] += len(fresh)
        return [BalancesRead(fresh, reason, tx_hash, charged)] if fresh else []

    def _note_balance(self, account: str, balance: int) -> None:
        """Keep what the chain said; an account that owes may pay now."""
        old = self.balances.get(account)
        self.balances[account] = balance
        self.stale.discard(account)
        if account in self.owing and (old is None or balance > old):
            del self.owing[account]  # planned again, with its new balance
            self.batch_due = self.batch_due or self.clock()

    # -- submitting ------------------------------------------------------------------------

    def _submit(self, now: float) -> list[Effect]:
        """Sign the pending entries into one multicall, record it, send it.

        If anything fails before the transaction is recorded, the batch stays due (after
        the backoff): pending entries are never left without a try.
        """
        try:
            return self._sign_and_send(now)
        except Exception:
            if self.in_flight is None:
                self.batch_due = now
            raise

    def _sign_and_send(self, now: float) -> list[Effect]:
        assert self.nonce is not None
        # accounts that can pay nothing now are left out, so they never crowd out the others
        broke = {a for a in self.owing if self.balances.get(a, 0) <= 0}
        entries = self.ledger.pending(frozenset(self.stale | broke))
        plan = plan_consumes(entries, self.balances, self.stale, self.max_calls)
        self.owing = {a: n for a, n in self.owing.items() if a in broke} | dict(plan.waiting)
        self.batch_due = now if plan.more else None
        effects: list[Effect] = []
        calls = list(plan.calls)
        if not calls:
            return effects
        try:
            signed = self.chain.sign_consumes(_consumes(calls), self.nonce)
        except ChainReverted:
            calls, effects = self._isolate(calls)
            if not calls:
                return effects
            signed = self.chain.sign_consumes(_consumes(calls), self.nonce)
        charged = tuple(e for call in calls for e in call.entries)
        try:
            self.ledger.record_submission(signed, tuple(e.id for e in charged))
        except LedgerConflict as exc:
            logger.warning("not sending %s: %s", signed.tx_hash, exc)
            self.batch_due = now
            return effects
        self.in_flight = InFlight(signed.nonce, [signed], charged, now, now + RECEIPT_POLL, now)
        self.nonce += 1
        self.counts["transactions"] += 1
        self.counts["consume_calls"] += len(calls)
        logger.info(
            "consuming %d SCT from %d accounts (%d entries) in %s, nonce %d",
            sum(c.amount for c in calls),
            len(calls),
            len(charged),
            signed.tx_hash,
            signed.nonce,
        )
        self._broadcast(self.in_flight, now, first=True)
        return effects

    def _broadcast(self, flight: InFlight, now: float, first: bool = False) -> None:
        """Send the newest transaction of the nonce in flight (it is in the ledger already)."""
        signed = flight.candidates[-1]
        flight.broadcast_at = now
        try:
            self.chain.send(signed.payload)
        except ChainUnavailable:
            raise  # maybe sent, maybe not: the receipt tells, an unknown one goes again
        except (NonceError, ChainRejected) as exc:
            if not first:
                # sent before: it may be in a block by now, or lost; `_look` decides
                logger.info("node refuses %s again (%s)", signed.tx_hash, exc)
                flight.next_look = now
                return
            # refused on its first broadcast, so never included: its entries go again
            logger.warning("node refused %s: %s", signed.tx_hash, exc)
            self._settle("dropped", reason=str(exc))
            self.nonce = self.chain.nonce()
            if isinstance(exc, ChainRejected):
                raise

    def _isolate(self, calls: list[ConsumeCall]) -> tuple[list[ConsumeCall], list[Effect]]:
        """Find the calls that make the multicall revert; those that can pay go on."""
        assert self.nonce is not None
        chain, nonce = self.chain, self.nonce

        def reason(subset: Sequence[ConsumeCall]) -> str | None:
            self.counts["simulations"] += 1
            try:
                chain.simulate(_consumes(subset), nonce)
            except ChainReverted as exc:
                return exc.reason
            return None

        good, bad = isolate_reverting(calls, reason)
        self.counts["reverting_calls"] += len(bad)
        short = {call.account: call for call, why in bad if is_insufficient_balance(why)}
        effects: list[Effect] = []
        if short:
            # the known balance was stale: read it; the next plan takes what it covers
            effects = self._read(short, "sync")
            read = _read_accounts(effects)
            for account, call in short.items():
                self.owing[account] = self.owing.get(account, 0) + call.amount
                if account not in read:
                    self.stale.add(account)
                logger.warning(
                    "%s cannot pay %d SCT now (balance %s); it pays what its balance covers",
                    account,
                    call.amount,
                    self.balances.get(account, "unknown"),
                )
            self.batch_due = self.clock()
        refused = [(call, why) for call, why in bad if call.account not in short]
        if refused and not good:
            # no call goes through: the gateway's own problem (not authorised?), not theirs
            raise ChainRejected(
                f"the SCT contract refuses every consume ({refused[0][1]}): is the gateway's "
                "account authorised on it (the owner, or a hub added with addHub)?"
            )
        for call, why in refused:
            logger.error(
                "the SCT contract refuses to charge %s (%s); %d ledger entries rejected",
                call.account,
                why,
                len(call.entries),
            )
            self.ledger.reject(call.entry_ids, why)
        return good, effects

    # -- settling --------------------------------------------------------------------------

    def _look(self, now: float) -> list[Effect]:
        """Where is the nonce in flight? Settle it, wait, send it again or replace it."""
        flight = self.in_flight
        assert flight is not None
        flight.next_look = now + RECEIPT_POLL
        pending = False
        for signed in reversed(flight.candidates):
            outcome = self.chain.outcome(signed.tx_hash)
            if outcome.status == "accepted":
                return self._accepted(signed.tx_hash, outcome.block_number)
            if outcome.status == "reverted":
                self.counts["reverted"] += 1
                logger.warning(
                    "transaction %s reverted (%s); its consumes are split and tried again",
                    signed.tx_hash,
                    outcome.reason,
                )
                self._settle("reverted", signed.tx_hash, outcome.block_number, outcome.reason)
                self.nonce = self.chain.nonce()
                return []
            pending = pending or outcome.status == "pending"
        if pending:
            flight.unknown_since = None
            if now - flight.since >= STUCK_WARNING:
                self.error_log.warning(
                    "stuck",
                    "nonce %d has waited %.0f s for a block; new consumes wait in the ledger",
                    flight.nonce,
                    now - flight.since,
                )
            return []
        flight.unknown_since = flight.unknown_since or now
        if self.chain.nonce("latest") > flight.nonce:
            if now - flight.unknown_since >= DROP_AFTER:
                # its nonce is used, and by none of its transactions: none can be included
                logger.warning(
                    "nonce %d was used by none of its %d transactions: dropped, its consumes "
                    "go again",
                    flight.nonce,
                    len(flight.candidates),
                )
                self._settle("dropped", reason="nonce used by another transaction")
                self.nonce = self.chain.nonce()
            return []
        if now - flight.broadcast_at >= RESEND_AFTER:
            self.counts["rebroadcasts"] += 1
            logger.info("node does not know %s: sending it again", flight.candidates[-1].tx_hash)
            self._broadcast(flight, now)
            if flight.next_look == now:  # refused now: sign it anew, same nonce and calls
                self._replace(flight, now)
        return []

    def _replace(self, flight: InFlight, now: float) -> None:
        if len(flight.candidates) > MAX_REPLACEMENTS:
            self.error_log.error(
                "replace",
                "nonce %d: the node refuses its %d transactions; its consumes wait (check "
                "the node, the account's STRK balance and STARKNET_FEE_MARGIN)",
                flight.nonce,
                len(flight.candidates),
            )
            return
        calls = _calls_of(flight.entries)
        signed = self.chain.sign_consumes(calls, flight.nonce)
        self.ledger.record_replacement(signed)
        flight.candidates.append(signed)
        self.counts["replacements"] += 1
        logger.warning(
            "nonce %d: %s replaces %s (same calls, a fresh fee estimate)",
            flight.nonce,
            signed.tx_hash,
            flight.candidates[-2].tx_hash,
        )
        self._broadcast(flight, now)

    def _settle(
        self,
        outcome: str,
        tx_hash: str | None = None,
        block: int | None = None,
        reason: str | None = None,
    ) -> tuple[LedgerEntry, ...]:
        flight = self.in_flight
        assert flight is not None
        entries = self.ledger.settle(flight.nonce, outcome, tx_hash, block, reason)
        self.in_flight = None
        if outcome != "accepted":
            self.batch_due = self.clock()  # its entries are pending again
        self._next_left()
        return entries or flight.entries

    def _next_left(self) -> None:
        """After a restart, several nonces may wait: take the next."""
        left = self.ledger.submissions()
        if left:
            self.in_flight = InFlight.of(left[0], self.clock())

    def _accepted(self, tx_hash: str, block: int | None) -> list[Effect]:
        entries = self._settle("accepted", tx_hash, block)
        self.counts["accepted"] += 1
        self.counts["sct_consumed"] += sum(e.amount for e in entries)
        logger.info(
            "transaction %s accepted in block %s: %d SCT charged",
            tx_hash,
            block,
            sum(e.amount for e in entries),
        )
        owners = {normalise_address(e.account_address) for e in entries}
        charged = frozenset(e.device_id for e in entries)
        effects: list[Effect] = [Charged(tx_hash, entries)]
        try:
            effects[:0] = self._read(owners, "sync", tx_hash, charged)
        except ChainError as exc:
            # the boards learn their balance from the next event poll or refresh
            self.error_log.warning("balance", "cannot read balances after %s: %s", tx_hash, exc)
        return effects

    # -- events ----------------------------------------------------------------------------

    def _poll_events(self) -> list[Effect]:
        """Read the balances of followed accounts that SCT events touched since the cursor."""
        head = self.chain.block_number()
        if self.cursor is None:
            self.cursor = head  # a first start reads all balances anyway
            self.ledger.set_cursor(head)
            return []
        if head <= self.cursor:
            return []
        last = min(head, self.cursor + EVENT_BLOCKS_MAX)
        events = self.chain.events(self.cursor + 1, last)
        # the boards' owners, and accounts that owe (a removed board's debt, say)
        followed = self.accounts | self.owing.keys() | self.stale
        touched = {a for event in events for a in event.accounts if a in followed}
        self.counts["events"] += len(events)
        effects = self._read(touched, "event")
        self.cursor = last
        self.ledger.set_cursor(last)
        return effects

    # -- state -----------------------------------------------------------------------------

    def _reachable(self) -> None:
        if self.reachable is False:
            logger.info("Starknet node reachable again")
        self.reachable = True

    def _failed(self, exc: Exception, now: float) -> None:
        delay = self.backoff.failed()
        self.retry_at = now + delay
        if isinstance(exc, NonceError):
            self.counts["nonce_errors"] += 1
            self.error_log.warning("nonce", "%s; re-reading the nonce", exc)
            with contextlib.suppress(ChainError):
                self.nonce = self.chain.nonce()
        elif isinstance(exc, ChainUnavailable):
            self.reachable = False
            self.counts["node_failures"] += 1
            self.error_log.warning("node", "%s; retrying in %.0fs", exc, delay)
        elif isinstance(exc, DbUnavailable):
            self.error_log.warning("db", "ledger unavailable (%s); retrying in %.0fs", exc, delay)
        else:
            self.counts["refusals"] += 1
            self.error_log.error("refused", "%s; retrying in %.0fs", exc, delay)

    def stats(self) -> dict[str, Any]:
        flight = self.in_flight
        return {
            "ready": self.ready,
            "reachable": self.reachable,
            "nonce": self.nonce,
            "accounts": len(self.accounts),
            "in_flight": flight.candidates[-1].tx_hash if flight else None,
            "accounts_owing": len(self.owing),
            "event_cursor": self.cursor,
            **self.counts,
        }


def _read_accounts(effects: Iterable[Effect]) -> set[str]:
    return {a for e in effects if isinstance(e, BalancesRead) for a in e.balances}


def _consumes(calls: Iterable[ConsumeCall]) -> list[tuple[str, int]]:
    return [(call.account, call.amount) for call in calls]


def _calls_of(entries: Iterable[LedgerEntry]) -> list[tuple[str, int]]:
    """The consumes that charge these entries: one per account, in first-entry order."""
    owed: dict[str, int] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        account = normalise_address(entry.account_address)
        owed[account] = owed.get(account, 0) + entry.amount
    return list(owed.items())
