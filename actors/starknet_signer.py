"""StarknetSigner: the only holder of the gateway account's key and nonce (PROTOCOL section 4).

It follows the SCT balance of every board's owner (at start, after each device load,
when SCT events touch the account, when a board's balance key asks) and tells each
DeviceActor. It charges consumption from the durable ledger: pending entries gather
for `STARKNET_BATCH_WINDOW` seconds, then go as one multicall invoke (v3), one
`consume(account, n)` per account, with only calls known to succeed (a multicall
reverts whole). Each transaction is committed to the ledger, signed and with its
nonce, *before* it is sent, so that after a crash it is reconciled from its receipt
(or sent again unchanged if the node lost it) and never signed twice. One
transaction is in flight at a time; the ledger is the queue.

Everything it asks of the DbWriter (below it) is asked with a timeout; it tells the
DeviceActors, the DbWriter and the CentralApi the results.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import pykka
from sqlalchemy.exc import SQLAlchemyError

from actors.base import EstateActor, Ticker, handles, tell_if_alive
from actors.central_api import Backoff
from estate.config import Settings
from estate.db.ledger import LedgerConflict, LedgerEntry
from estate.ledger import ConsumeCall, is_insufficient_balance, isolate_reverting, plan_consumes
from estate.logs import RateLimitedLog
from estate.messages import (
    AccountsChanged,
    BalanceChanged,
    BalanceRefreshFailed,
    GetChainCursor,
    GetPendingLedger,
    GetStats,
    GetSubmittedTransactions,
    LedgerChanged,
    NotifyConsumption,
    PeersChanged,
    RecordBalances,
    RecordSubmission,
    RefreshBalance,
    RejectLedgerEntries,
    SetChainCursor,
    SettleTransaction,
    SignerTick,
    TokenAccount,
)
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

__all__ = ["StarknetSigner", "chain_from_settings"]

TICK = 0.25
DB_TIMEOUT = 15.0
RECEIPT_POLL = 1.0
"""Seconds between two looks at the transaction in flight."""
RESEND_AFTER = 30.0
"""Seconds a transaction may stay unknown to the node before it is broadcast again."""
STUCK_WARNING = 300.0
"""Seconds a transaction may wait for a block before the log says it is stuck."""
EVENT_BLOCKS_MAX = 10_000
"""Blocks read in one poll of events at most (a gateway far behind catches up in steps)."""


class DbUnavailable(Exception):
    """The DbWriter did not answer (restarting, database down): try again later."""


@attrs.define
class InFlight:
    """The transaction sent and not settled yet."""

    signed: SignedInvoke
    entries: tuple[LedgerEntry, ...]
    sent_at: float
    next_look: float
    broadcasts: int = 1


def chain_from_settings(settings: Settings) -> StarknetChain:
    """The chain client the settings describe (they were cross-checked at load)."""
    assert settings.starknet_rpc_url
    assert settings.starknet_account_address
    assert settings.starknet_private_key
    assert settings.sct_contract_address
    return StarknetChain(
        settings.starknet_rpc_url,
        settings.starknet_account_address,
        settings.starknet_private_key,
        settings.sct_contract_address,
        chain=settings.starknet_chain,
        timeout=settings.starknet_timeout,
        fee_margin=settings.starknet_fee_margin,
    )


class StarknetSigner(EstateActor):
    """Balances and consumption on Starknet for the boards' owners."""

    kind = "signer"

    def __init__(
        self,
        settings: Settings,
        supervisor: pykka.ActorRef[Any] | None = None,
        peers: PeersChanged | None = None,
        chain_factory: Callable[[Settings], StarknetChain] = chain_from_settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("signer", supervisor)
        self.peers = dict(peers.peers) if peers else {}
        self.settings, self.chain_factory, self.clock = settings, chain_factory, clock
        self.window = settings.starknet_batch_window
        self.max_calls = settings.starknet_batch_max_calls
        self.concurrency = settings.starknet_balance_concurrency
        self.event_interval = settings.starknet_event_poll_interval
        self.chain: StarknetChain | None = None
        self.ticker: Ticker | None = None
        self.ready = False
        self.nonce: int | None = None
        self.boards: dict[str, list[TokenAccount]] = {}
        self.by_device: dict[DeviceId, str] = {}
        self.balances: dict[str, int] = {}
        self.blocked: dict[str, int] = {}
        self.in_flight: InFlight | None = None
        self.batch_due: float | None = None
        self.retry_at = 0.0
        self.backoff = Backoff(ceiling=60.0)
        self.next_events = 0.0
        self.cursor: int | None = None
        self.reachable: bool | None = None
        self.refresh_due = False
        self.counts: Counter[str] = Counter()
        self.error_log = RateLimitedLog(self.log, interval=30.0)

    def setup(self) -> None:
        self._check_key_file()
        self.chain = self.chain_factory(self.settings)
        self.log.info(
            "token accounting on: %s, account %s, SCT %s, chain %s",
            self.chain.rpc_url,
            self.chain.account_address,
            self.chain.sct_address,
            self.chain.chain,
        )
        self.ticker = Ticker(self.actor_ref, SignerTick(), TICK).start()

    def _check_key_file(self) -> None:
        """Warn when the key file (already read) can be read by other users."""
        key_file = self.settings.starknet_private_key_file
        try:
            mode = os.stat(key_file).st_mode & 0o777 if key_file else 0
        except OSError:
            return
        if mode & 0o077:
            self.log.warning(
                "STARKNET_PRIVATE_KEY_FILE=%s is readable by others (mode %o): chmod 0400 "
                "it, owned by the gateway's user",
                key_file,
                mode,
            )

    def teardown(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        if self.chain is not None:
            self.chain.close()
            self.chain = None

    # -- start: chain, nonce, reconciliation ------------------------------------------------

    def _start(self, now: float) -> None:
        """Check the chain, read the nonce, reconcile what a previous run left submitted."""
        assert self.chain is not None
        self.chain.check_chain()
        submitted = self._ask_db(GetSubmittedTransactions())
        self.cursor = self._ask_db(GetChainCursor())
        # a transaction of ours may wait in the mempool, not counted by the node's nonce yet
        self.nonce = max([self.chain.nonce(), *(tx.nonce + 1 for tx in submitted)])
        for tx in submitted:
            self.log.info(
                "reconciling transaction %s (nonce %d, %d entries) left by a previous run",
                tx.tx_hash,
                tx.nonce,
                len(tx.entries),
            )
        if submitted:
            # the oldest first; the others follow one at a time, in nonce order
            first = submitted[0]
            self.in_flight = InFlight(
                SignedInvoke(first.tx_hash, first.nonce, first.payload),
                first.entries,
                sent_at=now - RESEND_AFTER,
                next_look=now,
                broadcasts=1,
            )
        self.ready = True
        self.batch_due = now  # entries left pending by a previous run go at once
        self._reachable()
        self.log.info("signer ready: account nonce %d", self.nonce)

    # -- boards and balances ---------------------------------------------------------------

    @handles(AccountsChanged)
    def _accounts(self, message: AccountsChanged) -> None:
        boards: dict[str, list[TokenAccount]] = {}
        by_device: dict[DeviceId, str] = {}
        for board in message.accounts:
            try:
                account = normalise_address(board.account_address)
            except ValueError as exc:
                self.error_log.warning(
                    f"address:{board.device_id}",
                    "device %s has no usable account address (%s); it is not charged",
                    board.device_id,
                    exc,
                )
                continue
            boards.setdefault(account, []).append(board)
            by_device[board.device_id] = account
        self.boards, self.by_device = boards, by_device
        self.refresh_due = True  # read on the next tick, where a node failure is handled

    def _refresh(
        self,
        accounts: Iterable[str],
        reason: str,
        tx_hash: str | None = None,
        charged: frozenset[DeviceId] = frozenset(),
    ) -> dict[str, int]:
        """Read these accounts' balances, tell their boards and the database.

        Boards in `charged` (their consumption was just accepted in `tx_hash`) are told
        with the reason `consumed`, the others with `reason`.
        """
        assert self.chain is not None
        accounts = list(accounts)
        if not accounts:
            return {}
        read = self.chain.balances(accounts, self.concurrency)
        fresh = {a: b for a, b in read.items() if isinstance(b, int)}
        failed = {a: b for a, b in read.items() if not isinstance(b, int)}
        if failed:
            account, error = next(iter(failed.items()))
            self.error_log.warning(
                "balance", "cannot read %d balances (%s: %s)", len(failed), account, error
            )
        self.counts["balance_reads"] += len(fresh)
        for account, balance in fresh.items():
            self._note_balance(account, balance)
            for board in self.boards.get(account, []):
                why = "consumed" if board.device_id in charged else reason
                tell_if_alive(board.ref, BalanceChanged(balance, why, tx_hash))
        if fresh:
            self._tell_db(RecordBalances(fresh))
        return fresh

    def _note_balance(self, account: str, balance: int) -> None:
        """Keep what the chain said; an account that could not pay may pay now."""
        self.balances[account] = balance
        if account in self.blocked and balance > self.blocked[account]:
            del self.blocked[account]
            self.batch_due = self.batch_due or self.clock()

    @handles(RefreshBalance)
    def _refresh_one(self, message: RefreshBalance) -> None:
        """A board's balance key: read its owner's balance now and answer it."""
        account = self.by_device.get(message.device_id)
        asker = next(
            (b.ref for b in self.boards.get(account or "", []) if b.device_id == message.device_id),
            None,
        )
        if account is None or asker is None or self.chain is None:
            return
        try:
            balance = self.chain.balance_of(account)
        except ChainError as exc:
            self.error_log.warning("balance", "cannot read %s's balance: %s", account, exc)
            tell_if_alive(asker, BalanceRefreshFailed(str(exc)))
            return
        self._note_balance(account, balance)
        tell_if_alive(asker, BalanceChanged(balance, "update"))
        # the owner's other boards show it too; the database keeps it
        for board in self.boards[account]:
            if board.device_id != message.device_id:
                tell_if_alive(board.ref, BalanceChanged(balance, "sync"))
        self._tell_db(RecordBalances({account: balance}))

    # -- the clock -------------------------------------------------------------------------

    @handles(LedgerChanged)
    def _ledger_changed(self, _message: LedgerChanged) -> None:
        if self.batch_due is None:
            self.batch_due = self.clock() + self.window

    @handles(SignerTick)
    def _tick(self, _message: SignerTick) -> None:
        now = self.clock()
        if now < self.retry_at:
            return
        answered = self.chain.answers if self.chain else 0
        try:
            if not self.ready:
                self._start(now)
            if self.refresh_due:
                self._refresh(self.boards, "sync")
                self.refresh_due = False
            if self.in_flight is not None:
                if now >= self.in_flight.next_look:
                    self._look(now)
            elif self.batch_due is not None and now >= self.batch_due:
                self._submit(now)
            if now >= self.next_events:
                self.next_events = now + self.event_interval
                self._poll_events()
        except ChainUnavailable as exc:
            self._unreachable(exc, now)
        except (ChainRejected, ChainReverted) as exc:
            self._failed_for_good(exc, now)
        except DbUnavailable as exc:
            delay = self.backoff.failed()
            self.retry_at = now + delay
            self.error_log.warning("db", "ledger unavailable (%s); retrying in %.0fs", exc, delay)
        else:
            self.backoff.succeeded()
            if self.chain is not None and self.chain.answers > answered:
                self._reachable()

    # -- submitting ------------------------------------------------------------------------

    def _submit(self, now: float) -> None:
        """Sign the pending entries into one multicall, record it, send it.

        If anything fails before the transaction is recorded, the batch is due again
        (after the caller's backoff): pending entries are never left without a try.
        """
        try:
            self._sign_and_send(now)
        except Exception:
            if self.in_flight is None:
                self.batch_due = now
            raise

    def _sign_and_send(self, now: float) -> None:
        assert self.chain is not None
        assert self.nonce is not None
        entries = self._ask_db(GetPendingLedger())
        plan = plan_consumes(entries, self.balances, self.blocked, self.max_calls)
        self.batch_due = None
        if not plan.calls:
            return
        calls = list(plan.calls)
        try:
            signed = self.chain.sign_consumes(_consumes(calls), self.nonce)
        except ChainReverted:
            calls = self._isolate(calls)
            if not calls:
                return
            signed = self.chain.sign_consumes(_consumes(calls), self.nonce)
        except NonceError:
            self.nonce = self.chain.nonce()
            self.batch_due = now
            return
        charged = tuple(e for call in calls for e in call.entries)
        try:
            self._ask_db(
                RecordSubmission(
                    signed.tx_hash, signed.nonce, signed.payload, tuple(e.id for e in charged)
                )
            )
        except LedgerConflict as exc:
            self.log.warning("not sending %s: %s", signed.tx_hash, exc)
            self.batch_due = now
            return
        self.in_flight = InFlight(signed, charged, sent_at=now, next_look=now + RECEIPT_POLL)
        self.nonce += 1
        self.counts["transactions"] += 1
        self.counts["consume_calls"] += len(calls)
        self.log.info(
            "consuming %d SCT from %d accounts (%d entries) in %s, nonce %d",
            sum(c.amount for c in calls),
            len(calls),
            len(charged),
            signed.tx_hash,
            signed.nonce,
        )
        if plan.more:
            self.batch_due = now
        self._broadcast(now)

    def _broadcast(self, now: float) -> None:
        """Send the transaction in flight (again); it is in the ledger already."""
        assert self.chain is not None
        assert self.in_flight is not None
        flight = self.in_flight
        try:
            self.chain.send(flight.signed.payload)
        except NonceError as exc:
            if flight.broadcasts > 1:
                # sent before: it may be in a block by now; its receipt (or the nonce) tells
                return
            # refused on its first broadcast, so never included: its entries go again
            self.log.warning("node refused %s's nonce (%s)", flight.signed.tx_hash, exc)
            self._settled("dropped", reason=str(exc))
            self.nonce = self.chain.nonce()
        except ChainRejected as exc:
            self.log.error("node refused %s: %s", flight.signed.tx_hash, exc)  # noqa: TRY400
            self._settled("dropped", reason=str(exc))
            self.nonce = self.chain.nonce()
            raise
        except ChainUnavailable:
            # maybe sent, maybe not: the receipt tells, and an unknown one is sent again
            flight.next_look = now + RECEIPT_POLL
            raise

    def _isolate(self, calls: list[ConsumeCall]) -> list[ConsumeCall]:
        """Find the calls that make the multicall revert; block or reject them."""
        assert self.chain is not None
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
        if not good and len({why for _call, why in bad}) == 1 and len(bad) > 1:
            # every call fails alike: the gateway's own problem (not authorised?), not theirs
            why = bad[0][1]
            if not is_insufficient_balance(why):
                raise ChainRejected(
                    f"every consume reverts ({why}): is the gateway's account authorised on "
                    "the SCT contract (owner, or added with addHub)?"
                )
        short = {call.account: (call, why) for call, why in bad if is_insufficient_balance(why)}
        self.counts["reverting_calls"] += len(bad)
        if short:
            fresh = self._refresh(short, "sync")
            for account, (call, why) in short.items():
                # it waits until its balance is above what it is now
                self.blocked[account] = fresh.get(account, self.balances.get(account, 0))
                self.log.warning(
                    "%s cannot pay %d SCT (%s); waiting until its balance grows",
                    account,
                    call.amount,
                    why,
                )
        for call, why in bad:
            if call.account in short:
                continue
            self.log.error(
                "the SCT contract refuses to charge %s (%s); %d ledger entries rejected",
                call.account,
                why,
                len(call.entries),
            )
            self._ask_db(RejectLedgerEntries(call.entry_ids, why))
        return good

    # -- settling --------------------------------------------------------------------------

    def _look(self, now: float) -> None:
        """Where is the transaction in flight? Settle it, or wait, or send it again."""
        assert self.chain is not None
        assert self.in_flight is not None
        flight = self.in_flight
        outcome = self.chain.outcome(flight.signed.tx_hash)
        flight.next_look = now + RECEIPT_POLL
        if outcome.status == "accepted":
            self._accepted(outcome.block_number)
        elif outcome.status == "reverted":
            self.counts["reverted"] += 1
            self.log.warning(
                "transaction %s reverted (%s); its consumes are split and tried again",
                flight.signed.tx_hash,
                outcome.reason,
            )
            self._settled("reverted", outcome.block_number, outcome.reason)
            self.nonce = self.chain.nonce()
            self.batch_due = now
        elif outcome.status == "pending" and now - flight.sent_at >= STUCK_WARNING:
            self.error_log.warning(
                "stuck",
                "transaction %s (nonce %d) has waited %.0f s for a block; new consumes wait "
                "behind it in the ledger",
                flight.signed.tx_hash,
                flight.signed.nonce,
                now - flight.sent_at,
            )
        elif outcome.status == "unknown" and now - flight.sent_at >= RESEND_AFTER:
            if self.chain.nonce() > flight.signed.nonce:
                # its nonce is used, and not by it: it can never be included now
                self.log.warning(
                    "transaction %s was never included and its nonce %d is used: dropped",
                    flight.signed.tx_hash,
                    flight.signed.nonce,
                )
                self._settled("dropped", reason="never included; nonce used")
                self.nonce = self.chain.nonce()
                self.batch_due = now
                return
            flight.broadcasts += 1
            flight.sent_at = now
            self.counts["rebroadcasts"] += 1
            self.log.info(
                "node does not know %s: sending the same transaction again",
                flight.signed.tx_hash,
            )
            self._broadcast(now)

    def _settled(self, outcome: str, block: int | None = None, reason: str | None = None):
        """A transaction that charged nothing: its entries are pending again, and due."""
        assert self.in_flight is not None
        tx_hash = self.in_flight.signed.tx_hash
        self._ask_db(SettleTransaction(tx_hash, outcome, block, reason))
        self.in_flight = None
        self.batch_due = self.clock()
        self._next_submitted()

    def _next_submitted(self) -> None:
        """After a restart, several submitted transactions may wait: take the next."""
        remaining = self._ask_db(GetSubmittedTransactions())
        if remaining:
            tx = remaining[0]
            now = self.clock()
            self.in_flight = InFlight(
                SignedInvoke(tx.tx_hash, tx.nonce, tx.payload),
                tx.entries,
                sent_at=now - RESEND_AFTER,
                next_look=now,
            )

    def _accepted(self, block: int | None) -> None:
        assert self.in_flight is not None
        flight = self.in_flight
        tx_hash = flight.signed.tx_hash
        entries = self._ask_db(SettleTransaction(tx_hash, "accepted", block)) or flight.entries
        self.in_flight = None
        self.counts["accepted"] += 1
        self.counts["sct_consumed"] += sum(e.amount for e in entries)
        self.log.info(
            "transaction %s accepted in block %s: %d SCT charged",
            tx_hash,
            block,
            sum(e.amount for e in entries),
        )
        owners = {e.device_id: normalise_address(e.account_address) for e in entries}
        fresh = self._refresh(set(owners.values()), "sync", tx_hash, frozenset(owners))
        central = self.peers.get("central")
        if central is not None:
            for device_id, account in sorted(owners.items()):
                if account in fresh:
                    tell_if_alive(central, NotifyConsumption(device_id, tx_hash, fresh[account]))
        self._next_submitted()

    # -- events ----------------------------------------------------------------------------

    def _poll_events(self) -> None:
        """Refresh the balances of known accounts that SCT events touched since the cursor."""
        assert self.chain is not None
        head = self.chain.block_number()
        if self.cursor is None:
            self.cursor = head  # a first start reads all balances anyway
            self._tell_db(SetChainCursor(head))
            return
        if head <= self.cursor:
            return
        last = min(head, self.cursor + EVENT_BLOCKS_MAX)
        events = self.chain.events(self.cursor + 1, last)
        # the boards' owners, and accounts that owe (a removed board's debt, say)
        followed = self.boards.keys() | self.blocked.keys()
        touched = {a for event in events for a in event.accounts if a in followed}
        self.counts["events"] += len(events)
        if touched:
            self._refresh(touched, "event")
        self.cursor = last
        self._tell_db(SetChainCursor(last))

    # -- helpers ---------------------------------------------------------------------------

    def _tell_db(self, message: Any) -> None:
        db = self.peers.get("db")
        if db is not None:
            tell_if_alive(db, message)

    def _ask_db(self, message: Any) -> Any:
        db = self.peers.get("db")
        if db is None:
            raise DbUnavailable("no database writer yet")
        try:
            return db.ask(message, timeout=DB_TIMEOUT)
        except (pykka.Timeout, pykka.ActorDeadError) as exc:
            raise DbUnavailable(
                f"the database writer did not answer ({type(exc).__name__})"
            ) from None
        except SQLAlchemyError as exc:
            raise DbUnavailable(str(exc).splitlines()[0][:200]) from None

    def _reachable(self) -> None:
        if self.reachable is False:
            self.log.info("Starknet node reachable again")
        self.reachable = True

    def _unreachable(self, exc: ChainError, now: float) -> None:
        self.reachable = False
        delay = self.backoff.failed()
        self.retry_at = now + delay
        self.counts["node_failures"] += 1
        self.error_log.warning("node", "%s; retrying in %.0fs", exc, delay)

    def _failed_for_good(self, exc: ChainError, now: float) -> None:
        delay = self.backoff.failed()
        self.retry_at = now + delay
        self.counts["refusals"] += 1
        self.error_log.error("refused", "%s; retrying in %.0fs", exc, delay)

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "reachable": self.reachable,
            "nonce": self.nonce,
            "accounts": len(self.boards),
            "in_flight": self.in_flight.signed.tx_hash if self.in_flight else None,
            "blocked_accounts": len(self.blocked),
            "event_cursor": self.cursor,
            **self.counts,
        }


def _consumes(calls: Iterable[ConsumeCall]) -> list[tuple[str, int]]:
    return [(call.account, call.amount) for call in calls]
