"""The StarknetSigner against the fake Starknet node (real JSON-RPC, signatures checked)
and the real DbWriter on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pykka
import pytest
from helpers import GATEWAY_ACCOUNT, register, starknet_env, wait_for
from sqlalchemy import Engine, select
from starknet_py.hash.selector import get_selector_from_name
from test_store import reading

from actors.db_writer import DbWriter
from actors.starknet_signer import StarknetSigner
from actors.testing import Recorder
from estate.config import Settings
from estate.db.models import ChainTransactionRow, DeviceRow, LedgerEntryRow
from estate.db.store import Charging, write_batch
from estate.fake_starknet import FakeStarknetNode, make_test_account
from estate.messages import (
    AccountsChanged,
    BalanceChanged,
    GetRecorded,
    GetStats,
    LedgerChanged,
    NotifyConsumption,
    PeersChanged,
    RefreshBalance,
    TokenAccount,
)
from estate.sct_contract import normalise_address
from estate.starknet_client import StarknetChain
from estate.types import DeviceId, DevicePk

pytestmark = pytest.mark.integration

GATEWAY, GATEWAY_KEY, _PUBLIC = GATEWAY_ACCOUNT
CONSUME = get_selector_from_name("consume")


def owner(n: int) -> str:
    return normalise_address(0x1000 + n)


class Rig:
    """A fake node, a DbWriter on a fresh database, a signer, and Recorders as boards."""

    def __init__(self, node: FakeStarknetNode, engine: Engine, settings: Settings) -> None:
        self.node, self.engine, self.settings = node, engine, settings
        self.pks: dict[str, DevicePk] = {}
        self.accounts: dict[str, str] = {}
        self.boards: dict[str, pykka.ActorRef[Any]] = {}
        self.central = Recorder.start("central")
        self.db: pykka.ActorRef[Any] | None = None
        self.signer: pykka.ActorRef[Any] | None = None
        self.seq = 0

    def add_boards(self, count: int, balance: int = 10) -> list[str]:
        ids = [f"H{len(self.pks) + i + 1:03}" for i in range(count)]
        pks = register(self.engine, *ids)
        with self.engine.begin() as conn:
            for i, device_id in enumerate(ids):
                account = owner(len(self.accounts) + i + 1)
                conn.execute(
                    DeviceRow.__table__.update()
                    .where(DeviceRow.id == pks[device_id])
                    .values(account_address=account)
                )
                self.accounts[device_id] = account
                if balance:
                    self.node.mint(account, balance)
        self.pks.update({d: DevicePk(pk) for d, pk in pks.items()})
        for device_id in ids:
            self.boards[device_id] = Recorder.start(f"board:{device_id}")
        return ids

    def start(self) -> None:
        charging = Charging(self.settings.wh_per_token)
        self.db = DbWriter.start(self.settings.database_url, charging=charging)
        self.start_signer()

    def start_signer(self) -> None:
        assert self.db is not None
        peers = PeersChanged({"db": self.db, "central": self.central})
        self.signer = StarknetSigner.start(self.settings, peers=peers)
        self.db.tell(PeersChanged({"signer": self.signer}))
        self.tell_accounts()
        wait_for(lambda: self.stats()["ready"], 10, "the signer to be ready")

    def tell_accounts(self) -> None:
        assert self.signer is not None
        accounts = tuple(
            TokenAccount(DeviceId(d), self.pks[d], self.accounts[d], self.boards[d])
            for d in self.pks
        )
        self.signer.tell(AccountsChanged(accounts))

    def stop_signer(self) -> None:
        assert self.signer is not None
        self.signer.stop(timeout=10)

    def stats(self) -> dict[str, Any]:
        assert self.signer is not None
        return self.signer.ask(GetStats(), timeout=10)

    def consume(self, device_id: str, tokens: int = 1) -> None:
        """Store readings worth `tokens` tokens of energy for the board (charged at once)."""
        self.seq += 1
        wh = self.settings.wh_per_token * tokens
        stored = reading(self.pks[device_id], self.seq, seq=self.seq, energy_wh=wh)
        with self.engine.begin() as conn:
            write_batch(conn, [stored], charging=Charging(self.settings.wh_per_token))
        assert self.signer is not None
        self.signer.tell(LedgerChanged())

    def statuses(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(LedgerEntryRow.status, LedgerEntryRow.amount)).all()
        counts: dict[str, int] = {}
        for status, amount in rows:
            counts[status] = counts.get(status, 0) + amount
        return counts

    def recorded(self, device_id: str) -> list[Any]:
        return list(self.boards[device_id].ask(GetRecorded(), timeout=5))

    def balances_told(self, device_id: str, reason: str | None = None) -> list[int]:
        return [
            m.balance
            for m in self.recorded(device_id)
            if isinstance(m, BalanceChanged) and (reason is None or m.reason == reason)
        ]


@pytest.fixture
def make_rig(
    node: FakeStarknetNode,
    db_url: str,
    engine_for: Callable[[str], Engine],
    make_settings: Callable[..., Settings],
) -> Callable[..., Rig]:
    def make(**env: str) -> Rig:
        defaults = {
            "DATABASE_URL": db_url,
            **starknet_env(node),
            "STARKNET_BATCH_WINDOW": "0.3",
            "STARKNET_EVENT_POLL_INTERVAL": "0.2",
            "WH_PER_TOKEN": "10",
        }
        settings = make_settings(**{**defaults, **env})
        return Rig(node, engine_for(db_url), settings)

    return make


def test_consumes_are_accepted_in_one_signed_multicall(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig()
    boards = rig.add_boards(3, balance=10)
    rig.start()
    wait_for(lambda: all(rig.balances_told(d, "sync") for d in boards), 10, "balances at start")
    for device_id in boards:
        rig.consume(device_id)
    rig.consume(boards[0], tokens=2)
    wait_for(lambda: rig.statuses() == {"accepted": 5}, 15, "the consumes to be accepted")

    (tx,) = node.transactions  # the fake checked its hash and signature
    assert tx.sender == GATEWAY
    assert [(selector, list(data)) for _to, selector, data in tx.calls] == [
        (CONSUME, [int(rig.accounts[boards[0]], 16), 3, 0]),
        (CONSUME, [int(rig.accounts[boards[1]], 16), 1, 0]),
        (CONSUME, [int(rig.accounts[boards[2]], 16), 1, 0]),
    ]
    assert [node.balance_of(rig.accounts[d]) for d in boards] == [7, 9, 9]
    tx_hash = f"0x{tx.hash:064x}"
    wait_for(lambda: rig.balances_told(boards[0], "consumed") == [7], 10, "the board told")
    consumed = [m for m in rig.recorded(boards[1]) if isinstance(m, BalanceChanged)][-1]
    assert (consumed.balance, consumed.reason, consumed.tx_hash) == (9, "consumed", tx_hash)
    notes = wait_for(
        lambda: [m for m in rig.central.ask(GetRecorded()) if isinstance(m, NotifyConsumption)],
        10,
        "the central told",
    )
    assert sorted((n.device_id, n.tx_hash, n.balance) for n in notes) == [
        (boards[0], tx_hash, 7),
        (boards[1], tx_hash, 9),
        (boards[2], tx_hash, 9),
    ]
    wait_for(
        lambda: _device_balances(rig.engine) == {boards[0]: 7, boards[1]: 9, boards[2]: 9},
        10,
        "the balances stored",
    )


def test_consumes_within_a_window_go_in_one_transaction(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig(STARKNET_BATCH_WINDOW="1.0")
    boards = rig.add_boards(5, balance=100)
    rig.start()
    for _ in range(4):
        for device_id in boards:
            rig.consume(device_id)
    wait_for(lambda: rig.statuses() == {"accepted": 20}, 15, "20 consumes accepted")
    assert node.invoke_count == 1
    assert len(node.transactions[0].calls) == 5


def test_a_restart_between_submission_and_acceptance_charges_once(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig()
    (board,) = rig.add_boards(1, balance=10)
    rig.start()
    node.pause_blocks()
    rig.consume(board, tokens=2)
    wait_for(lambda: rig.statuses() == {"submitted": 2}, 10, "the consume submitted")
    rig.stop_signer()
    node.resume_blocks()
    rig.start_signer()
    wait_for(lambda: rig.statuses() == {"accepted": 2}, 15, "the consume reconciled")
    assert node.balance_of(rig.accounts[board]) == 8
    assert len({tx.hash for tx in node.transactions}) == 1


def test_a_transaction_the_node_lost_is_sent_again_unchanged(
    make_rig: Callable[..., Rig], node: FakeStarknetNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("estate.settlement.RESEND_AFTER", 0.5)
    rig = make_rig()
    (board,) = rig.add_boards(1, balance=10)
    rig.start()
    node.lose_next_invoke()
    rig.consume(board)
    wait_for(lambda: rig.statuses() == {"accepted": 1}, 15, "the lost consume accepted")
    lost, resent = node.transactions
    assert lost.lost
    assert not resent.lost
    assert lost.hash == resent.hash  # the very same signed transaction
    assert node.balance_of(rig.accounts[board]) == 9
    assert rig.stats()["rebroadcasts"] == 1


def test_an_account_that_cannot_pay_is_isolated_and_the_others_charged(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig(STARKNET_EVENT_POLL_INTERVAL="3600")
    a, b, c = rig.add_boards(3, balance=5)
    rig.start()
    wait_for(lambda: rig.balances_told(b, "sync") == [5], 10, "balances at start")
    node.transfer(rig.accounts[b], owner(99), 5)  # unseen by the signer: no event poll
    for device_id in (a, b, c):
        rig.consume(device_id)
    wait_for(lambda: rig.statuses() == {"accepted": 2, "pending": 1}, 15, "a and c charged")
    (tx,) = node.transactions
    assert [data[0] for _to, _selector, data in tx.calls] == [
        int(rig.accounts[a], 16),
        int(rig.accounts[c], 16),
    ]
    stats = rig.stats()
    assert stats["accounts_owing"] == 1
    assert stats["reverting_calls"] == 1
    assert rig.balances_told(b, "sync")[-1] == 0  # its board learns it has nothing left

    node.mint(rig.accounts[b], 3)
    assert rig.signer is not None
    rig.signer.tell(RefreshBalance(DeviceId(b)))  # its owner pressed the balance key
    wait_for(lambda: rig.statuses() == {"accepted": 3}, 15, "b charged once it can pay")
    assert node.balance_of(rig.accounts[b]) == 2
    assert node.invoke_count == 2


def test_a_multicall_that_reverts_on_chain_is_split_and_retried(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig(STARKNET_EVENT_POLL_INTERVAL="3600")
    a, b = rig.add_boards(2, balance=5)
    rig.start()
    node.pause_blocks()
    rig.consume(a)
    rig.consume(b)
    wait_for(lambda: rig.statuses() == {"submitted": 2}, 10, "the multicall submitted")
    node.transfer(rig.accounts[b], owner(99), 5)  # b is drained before the block
    node.resume_blocks()
    wait_for(lambda: rig.statuses() == {"accepted": 1, "pending": 1}, 15, "a charged again")
    with rig.engine.connect() as conn:
        outcomes = conn.execute(
            select(ChainTransactionRow.status).order_by(ChainTransactionRow.nonce)
        ).scalars()
        assert list(outcomes) == ["reverted", "accepted"]
    assert node.balance_of(rig.accounts[a]) == 4
    assert node.balance_of(rig.accounts[b]) == 0


def test_the_ledger_drains_after_the_node_was_down(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig()
    boards = rig.add_boards(3, balance=10)
    rig.start()
    node.down()
    for device_id in boards:
        rig.consume(device_id)
    wait_for(lambda: rig.stats().get("node_failures", 0) >= 1, 10, "the signer to notice")
    assert rig.statuses() == {"pending": 3}
    node.up()
    wait_for(lambda: rig.statuses() == {"accepted": 3}, 30, "the ledger to drain")
    assert [node.balance_of(rig.accounts[d]) for d in boards] == [9, 9, 9]
    assert rig.stats()["reachable"] is True


def test_balances_follow_transfer_and_mint_events(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig()
    a, b = rig.add_boards(2, balance=4)
    rig.start()
    wait_for(lambda: rig.balances_told(a, "sync") == [4], 10, "balances at start")
    wait_for(lambda: rig.stats()["event_cursor"] is not None, 10, "the event cursor")
    node.transfer(rig.accounts[a], rig.accounts[b], 3)
    wait_for(lambda: rig.balances_told(b, "event") == [7], 10, "b told of the transfer")
    assert rig.balances_told(a, "event") == [1]
    node.mint(rig.accounts[a], 5)
    wait_for(lambda: rig.balances_told(a, "event") == [1, 6], 10, "a told of the mint")
    wait_for(lambda: _device_balances(rig.engine) == {a: 6, b: 7}, 10, "the balances stored")


def test_a_balance_key_refresh_answers_the_board(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig(STARKNET_EVENT_POLL_INTERVAL="3600")
    (board,) = rig.add_boards(1, balance=4)
    rig.start()
    node.mint(rig.accounts[board], 2)
    assert rig.signer is not None
    rig.signer.tell(RefreshBalance(DeviceId(board)))
    wait_for(lambda: rig.balances_told(board, "update") == [6], 10, "the board answered")


def _device_balances(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(DeviceRow.device_id, DeviceRow.balance)).all()
    return dict(rows)


def test_an_account_that_can_pay_part_pays_that_part(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig(STARKNET_EVENT_POLL_INTERVAL="3600")
    (board,) = rig.add_boards(1, balance=5)
    rig.start()
    wait_for(lambda: rig.balances_told(board, "sync") == [5], 10, "balance at start")
    node.transfer(rig.accounts[board], owner(99), 3)  # 2 left, unseen by the signer
    for _ in range(3):
        rig.consume(board)
    wait_for(lambda: rig.statuses() == {"accepted": 2, "pending": 1}, 20, "2 of 3 charged")
    assert node.balance_of(rig.accounts[board]) == 0
    # its board learns it is at 0 (and a consumer at 0 is cut off)
    wait_for(lambda: rig.balances_told(board)[-1] == 0, 10, "the board told of 0")


def test_a_gateway_not_authorised_rejects_nothing(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    outsider, key, public = make_test_account(7)
    node.add_account(outsider, public)  # an account the SCT does not know as a hub
    rig = make_rig(STARKNET_ACCOUNT_ADDRESS=hex(outsider), STARKNET_PRIVATE_KEY=hex(key))
    (board,) = rig.add_boards(1, balance=10)
    rig.start()
    rig.consume(board)
    wait_for(lambda: rig.stats().get("refusals", 0) >= 1, 15, "the refusal noticed")
    assert rig.statuses() == {"pending": 1}
    assert node.invoke_count == 0
    node.authorise(outsider)  # the operator fixes it: the consume goes through
    wait_for(lambda: rig.statuses() == {"accepted": 1}, 90, "charged once authorised")


def test_a_nonce_used_by_another_client_is_read_again(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig()
    (board,) = rig.add_boards(1, balance=10)
    rig.start()
    rig.consume(board)
    wait_for(lambda: rig.statuses() == {"accepted": 1}, 15, "a first consume")
    # the owner's wallet uses the gateway's account meanwhile
    other = StarknetChain(node.url, hex(GATEWAY), hex(GATEWAY_KEY), hex(node.sct_address))
    try:
        other.send(other.sign_consumes([(rig.accounts[board], 1)], other.nonce()).payload)
        assert node.wait_until_included()
    finally:
        other.close()
    rig.consume(board)
    wait_for(lambda: rig.statuses() == {"accepted": 2}, 30, "charged after the nonce error")
    assert node.balance_of(rig.accounts[board]) == 7
    assert rig.stats().get("nonce_errors", 0) >= 1


def test_a_lost_transaction_the_node_refuses_again_is_replaced_and_charged_once(
    make_rig: Callable[..., Rig], node: FakeStarknetNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("estate.settlement.RESEND_AFTER", 0.5)
    rig = make_rig()
    (board,) = rig.add_boards(1, balance=10)
    rig.start()
    node.lose_next_invoke()
    rig.consume(board)
    wait_for(lambda: node.invoke_count == 1, 10, "the lost transaction")
    node.gas_prices["l2_gas"] *= 10  # its bounds are too low now: sending it again fails
    wait_for(lambda: rig.statuses() == {"accepted": 1}, 20, "the replacement accepted")
    assert node.balance_of(rig.accounts[board]) == 9
    lost, replacement = node.transactions
    assert lost.nonce == replacement.nonce
    assert lost.hash != replacement.hash
    assert rig.stats()["replacements"] == 1


def test_the_central_is_told_after_a_restart_what_it_missed(
    make_rig: Callable[..., Rig], node: FakeStarknetNode
) -> None:
    rig = make_rig()
    (board,) = rig.add_boards(1, balance=10)
    rig.start()
    rig.consume(board)
    wait_for(lambda: rig.statuses() == {"accepted": 1}, 15, "a consume accepted")
    (first,) = wait_for(lambda: _notes(rig), 10, "the central told")
    # the central never confirmed it (no MarkNotified): a restarted signer tells it again
    rig.stop_signer()
    rig.start_signer()
    wait_for(lambda: len(_notes(rig)) == 2, 15, "the central told again")
    again = _notes(rig)[1]
    assert (again.device_id, again.tx_hash, again.entry_ids) == (
        first.device_id,
        first.tx_hash,
        first.entry_ids,
    )


def _notes(rig: Rig) -> list[NotifyConsumption]:
    return [m for m in rig.central.ask(GetRecorded()) if isinstance(m, NotifyConsumption)]
