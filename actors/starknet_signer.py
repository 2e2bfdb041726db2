"""StarknetSigner: the only holder of the gateway account's key and nonce (PROTOCOL section 4).

A thin shell over `estate.settlement.Settlement` (the rules live there). It follows
the SCT balance of every board's owner (at start, after each device load, when SCT
events touch the account, when a board's balance key asks) and tells each
DeviceActor; it settles the durable ledger in multicalls and, once one is accepted,
tells the boards charged (`"<balance>,3"`), the database and the central.

It asks only the DbWriter (below it), always with a timeout, and tells everyone else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import pykka
from sqlalchemy.exc import SQLAlchemyError

from actors.base import EstateActor, Ticker, handles, tell_if_alive
from estate.config import Settings
from estate.db.ledger import LedgerEntry, Submission
from estate.logs import RateLimitedLog
from estate.messages import (
    AccountsChanged,
    BalanceChanged,
    BalanceRefreshFailed,
    GetChainCursor,
    GetPendingLedger,
    GetStats,
    GetSubmissions,
    GetUnnotified,
    LedgerChanged,
    NotifyConsumption,
    PeersChanged,
    RecordBalances,
    RecordReplacement,
    RecordSubmission,
    RefreshBalance,
    RejectLedgerEntries,
    SetChainCursor,
    SettleNonce,
    SignerTick,
    TokenAccount,
)
from estate.sct_contract import normalise_address
from estate.settlement import BalancesRead, Charged, DbUnavailable, Effect, Settlement
from estate.starknet_client import ChainError, SignedInvoke, StarknetChain
from estate.types import DeviceId

__all__ = ["StarknetSigner", "chain_from_settings"]

TICK = 0.25
DB_TIMEOUT = 45.0
"""Seconds an ask of the DbWriter may take (longer than SQLite's 30 s busy timeout)."""


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


class DbLedger:
    """The ledger port of the settlement: asks the DbWriter, with a timeout."""

    def __init__(self, db: Callable[[], pykka.ActorRef[Any] | None], sender: str) -> None:
        self.db, self.sender = db, sender
        self.cursor_name = f"sct:{sender[-28:]}"
        """The event cursor is the gateway account's own (another gateway has its own)."""

    def _ask(self, message: Any) -> Any:
        db = self.db()
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

    def pending(self, skip_accounts: frozenset[str]) -> tuple[LedgerEntry, ...]:
        return self._ask(GetPendingLedger(skip_accounts=skip_accounts))

    def submissions(self) -> tuple[Submission, ...]:
        return self._ask(GetSubmissions(self.sender))

    def record_submission(self, signed: SignedInvoke, entry_ids: tuple[int, ...]) -> None:
        self._ask(
            RecordSubmission(self.sender, signed.tx_hash, signed.nonce, signed.payload, entry_ids)
        )

    def record_replacement(self, signed: SignedInvoke) -> None:
        self._ask(RecordReplacement(self.sender, signed.tx_hash, signed.nonce, signed.payload))

    def settle(
        self,
        nonce: int,
        outcome: str,
        tx_hash: str | None = None,
        block: int | None = None,
        reason: str | None = None,
    ) -> tuple[LedgerEntry, ...]:
        return self._ask(SettleNonce(self.sender, nonce, outcome, tx_hash, block, reason))

    def reject(self, entry_ids: tuple[int, ...], reason: str) -> None:
        self._ask(RejectLedgerEntries(entry_ids, reason))

    def cursor(self) -> int | None:
        return self._ask(GetChainCursor(self.cursor_name))

    def set_cursor(self, block: int) -> None:
        db = self.db()
        if db is not None:
            tell_if_alive(db, SetChainCursor(self.cursor_name, block))

    def unnotified(self, settled_before: datetime) -> tuple[LedgerEntry, ...]:
        return self._ask(GetUnnotified(settled_before))


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
        self.settlement: Settlement | None = None
        self.ledger: DbLedger | None = None
        self.ticker: Ticker | None = None
        self.boards: dict[str, list[TokenAccount]] = {}
        self.by_device: dict[DeviceId, str] = {}
        self.told_unnotified = False
        self.started_at = datetime.now(UTC)
        self.error_log = RateLimitedLog(self.log, interval=30.0)

    def setup(self) -> None:
        self._check_key_file()
        chain = self.chain_factory(self.settings)
        self.ledger = DbLedger(lambda: self.peers.get("db"), chain.account_address)
        self.settlement = Settlement(
            chain,
            self.ledger,
            window=self.settings.starknet_batch_window,
            max_calls=self.settings.starknet_batch_max_calls,
            concurrency=self.settings.starknet_balance_concurrency,
            event_interval=self.settings.starknet_event_poll_interval,
            clock=self.clock,
        )
        self.log.info(
            "token accounting on: %s, account %s, SCT %s, chain %s",
            chain.rpc_url,
            chain.account_address,
            chain.sct_address,
            chain.chain,
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
        if self.settlement is not None:
            self.settlement.chain.close()
            self.settlement = None

    # -- messages --------------------------------------------------------------------------

    @handles(AccountsChanged)
    def _accounts(self, message: AccountsChanged) -> None:
        boards: dict[str, list[TokenAccount]] = {}
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
        self.boards = boards
        self.by_device = {b.device_id: a for a, owned in boards.items() for b in owned}
        assert self.settlement is not None
        self.settlement.follow(boards)

    @handles(LedgerChanged)
    def _ledger_changed(self, _message: LedgerChanged) -> None:
        assert self.settlement is not None
        self.settlement.ledger_changed()

    @handles(RefreshBalance)
    def _refresh_one(self, message: RefreshBalance) -> None:
        """A board's balance key: read its owner's balance now and answer it."""
        assert self.settlement is not None
        account = self.by_device.get(message.device_id)
        if account is None:
            return
        asker = next(b.ref for b in self.boards[account] if b.device_id == message.device_id)
        try:
            balance = self.settlement.read_balance(account)
        except ChainError as exc:
            self.error_log.warning("balance", "cannot read %s's balance: %s", account, exc)
            tell_if_alive(asker, BalanceRefreshFailed(str(exc)))
            return
        tell_if_alive(asker, BalanceChanged(balance, "update"))
        self._tell_boards(BalancesRead({account: balance}, "sync"), skip=message.device_id)

    @handles(SignerTick)
    def _tick(self, _message: SignerTick) -> None:
        assert self.settlement is not None
        self._apply(self.settlement.tick())
        if self.settlement.ready and not self.told_unnotified and "central" in self.peers:
            self._tell_unnotified()

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        assert self.settlement is not None
        return self.settlement.stats()

    # -- effects ---------------------------------------------------------------------------

    def _apply(self, effects: Iterable[Effect]) -> None:
        balances: dict[str, int] = {}
        for effect in effects:
            if isinstance(effect, BalancesRead):
                balances.update(effect.balances)
                self._tell_boards(effect)
                self._tell_db(RecordBalances(effect.balances))
            elif isinstance(effect, Charged):
                self._notify(effect.tx_hash, effect.entries, balances)

    def _tell_boards(self, read: BalancesRead, skip: DeviceId | None = None) -> None:
        for account, balance in read.balances.items():
            for board in self.boards.get(account, []):
                if board.device_id != skip:
                    reason = "consumed" if board.device_id in read.charged else read.reason
                    tell_if_alive(board.ref, BalanceChanged(balance, reason, read.tx_hash))

    def _notify(
        self, tx_hash: str, entries: Iterable[LedgerEntry], balances: dict[str, int]
    ) -> None:
        """Tell the central of each board's consumption in `tx_hash`, with its new balance."""
        central = self.peers.get("central")
        if central is None:
            return
        by_device: dict[DeviceId, list[LedgerEntry]] = {}
        for entry in entries:
            by_device.setdefault(entry.device_id, []).append(entry)
        for device_id, mine in sorted(by_device.items()):
            balance = balances.get(normalise_address(mine[0].account_address))
            if balance is None:
                continue  # not read: told after a restart, from the ledger
            ids = tuple(e.id for e in mine)
            tell_if_alive(central, NotifyConsumption(device_id, tx_hash, balance, ids))

    def _tell_unnotified(self) -> None:
        """Consumptions accepted before a restart that the central was not told of."""
        assert self.ledger is not None
        assert self.settlement is not None
        try:
            entries = self.ledger.unnotified(self.started_at)
        except DbUnavailable:
            return  # again on the next tick
        self.told_unnotified = True
        if not entries:
            return
        owners = {normalise_address(e.account_address) for e in entries}
        try:
            balances = self.settlement.chain.balances(owners)
        except ChainError:
            self.told_unnotified = False
            return
        known = {a: b for a, b in balances.items() if isinstance(b, int)}
        by_tx: dict[str, list[LedgerEntry]] = {}
        for entry in entries:
            by_tx.setdefault(entry.tx_hash or "", []).append(entry)
        for tx_hash, mine in by_tx.items():
            self._notify(tx_hash, mine, known)
        self.log.info("telling the central of %d earlier consumptions", len(entries))

    def _tell_db(self, message: Any) -> None:
        db = self.peers.get("db")
        if db is not None:
            tell_if_alive(db, message)
