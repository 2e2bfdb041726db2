"""Token accounting through the whole gateway: a simulated consumer board over the real
Mosquitto, PostgreSQL, and the fake Starknet node (real JSON-RPC, signatures checked)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from helpers import (
    GATEWAY_ACCOUNT,
    board_state,
    clear_retained,
    core_ref,
    device_row,
    register,
    starknet_env,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select, update
from test_repl import ReplClient

from actors.gateway import Gateway
from actors.simulated_board import SimulatedBoard
from estate.db.models import DeviceRow, LedgerEntryRow
from estate.device_wire import Instruction
from estate.fake_central import FakeCentral
from estate.fake_starknet import FakeStarknetNode
from estate.messages import GetHealthAddress, PressBalanceKey, SetLoad
from estate.sct_contract import normalise_address
from estate.status import fetch_status

pytestmark = pytest.mark.integration

GATEWAY_KEY = GATEWAY_ACCOUNT[1]
OWNER = normalise_address(0xB0B)


class TokenRig:
    def __init__(self, engine: Engine, broker_url: str, hub: str) -> None:
        self.engine, self.broker_url, self.hub = engine, broker_url, hub
        self.gateway: Gateway | None = None
        self.board: pykka.ActorRef[Any] | None = None
        self.device_ids: list[str] = []

    def start(self, settings: Any, connection_type: str = "Consumer") -> pykka.ActorRef[Any]:
        self.device_ids = ["H001"]
        (pk,) = register(self.engine, "H001", connection_type=connection_type).values()
        with self.engine.begin() as conn:
            conn.execute(update(DeviceRow).where(DeviceRow.id == pk).values(account_address=OWNER))
        self.gateway = Gateway(settings).start()
        self.board = SimulatedBoard.start(
            self.broker_url, self.hub, "H001", interval=0.1, hello_interval=0.5
        )
        return self.board

    def state(self) -> dict[str, Any]:
        assert self.board is not None
        return board_state(self.board)

    def ledger(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(LedgerEntryRow.status, func.sum(LedgerEntryRow.amount)).group_by(
                    LedgerEntryRow.status
                )
            ).all()
        return {status: int(amount) for status, amount in rows}

    def stop(self) -> None:
        if self.board is not None:
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                self.board.stop(block=True, timeout=10)
        if self.gateway is not None:
            self.gateway.stop()
        clear_retained(self.broker_url, self.hub, self.device_ids)


@pytest.fixture
def rig(
    pg_url: str,
    mosquitto_url: str,
    hub: str,
    engine_for: Callable[[str], Engine],
    node: FakeStarknetNode,  # stopped after the gateway
) -> Iterator[TokenRig]:
    r = TokenRig(engine_for(pg_url), mosquitto_url, hub)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def token_settings(
    pg_url: str, mosquitto_url: str, node: FakeStarknetNode, make_settings: Callable[..., Any]
) -> Callable[..., Any]:
    def make(**env: str) -> Any:
        defaults = {
            "DATABASE_URL": pg_url,
            "MQTT_URL": mosquitto_url,
            "DB_AUTO_MIGRATE": "false",
            "MQTT_SESSION_EXPIRY": "60",
            **starknet_env(node),
            "STARKNET_BATCH_WINDOW": "0.3",
            "STARKNET_EVENT_POLL_INTERVAL": "0.3",
            # about 5 W every 0.1 s: a token every 1 to 2 s
            "WH_PER_TOKEN": "0.002",
        }
        return make_settings(**{**defaults, **env})

    return make


def toggles(state: dict[str, Any], balance: int | None = None) -> int:
    return sum(
        1
        for _at, b, instruction in state["commands"]
        if instruction == Instruction.TOGGLE and (balance is None or b == balance)
    )


def test_prepaid_cut_off_switches_the_load_off_at_0_and_on_after_a_transfer(
    rig: TokenRig, node: FakeStarknetNode, token_settings: Callable[..., Any]
) -> None:
    node.mint(OWNER, 2)
    rig.start(token_settings())
    wait_for(lambda: rig.state()["balance"] == 2, 15, "the board to show its balance")

    # it consumes its 2 tokens; at 0 the gateway switches its load off
    wait_for(lambda: not rig.state()["load_on"], 30, "the load switched off at 0")
    state = rig.state()
    assert state["balance"] == 0
    assert toggles(state) == 1, state["commands"]
    assert node.balance_of(OWNER) == 0
    wait_for(lambda: device_row(rig.engine, "H001").load_cut_off, 5, "the cut-off stored")

    # switched on by hand while at 0: switched off again
    assert rig.board is not None
    rig.board.tell(SetLoad(True))
    wait_for(lambda: toggles(rig.state()) == 2, 15, "the load switched off again")
    wait_for(lambda: not rig.state()["load_on"], 5, "the load off")

    # someone sends the owner tokens: the balance grows, the load comes back on
    node.mint(normalise_address(0xCAFE), 5)
    node.transfer(normalise_address(0xCAFE), OWNER, 5)
    wait_for(lambda: rig.state()["load_on"], 15, "the load switched back on")
    assert toggles(rig.state()) == 3
    wait_for(lambda: device_row(rig.engine, "H001").load_cut_off is False, 10, "cut-off over")

    # what it used while switched on by hand at 0 is charged once it can pay
    ledger = rig.ledger()
    assert ledger.get("accepted", 0) >= 2
    wait_for(
        lambda: node.balance_of(OWNER) == 2 + 5 - rig.ledger().get("accepted", 0),
        15,
        "the chain to match the ledger",
    )


def test_the_balance_key_refreshes_the_balance_from_the_chain(
    rig: TokenRig, node: FakeStarknetNode, token_settings: Callable[..., Any]
) -> None:
    node.mint(OWNER, 50)
    board = rig.start(token_settings(WH_PER_TOKEN="1000"))
    wait_for(lambda: rig.state()["balance"] == 50, 15, "the board to show its balance")
    node.mint(OWNER, 7)  # not yet seen: events are polled every 0.3 s, the key is faster
    board.tell(PressBalanceKey())
    wait_for(lambda: not rig.state()["update"], 10, "the update flag cleared")
    answers = [(b, i) for _at, b, i in rig.state()["commands"] if i == 3]
    assert answers
    assert answers[-1] == (57, 3)


def test_producers_are_not_charged(
    rig: TokenRig, node: FakeStarknetNode, token_settings: Callable[..., Any]
) -> None:
    node.mint(OWNER, 2)
    rig.start(token_settings(), connection_type="Producer")
    wait_for(lambda: len(rig.state()["accepted"]) >= 30, 20, "30 readings")
    assert rig.ledger() == {}
    assert node.balance_of(OWNER) == 2
    assert rig.state()["load_on"] is True


def test_without_starknet_settings_energy_is_stored_and_nobody_charged(
    rig: TokenRig,
    pg_url: str,
    mosquitto_url: str,
    make_settings: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        DATABASE_URL=pg_url,
        MQTT_URL=mosquitto_url,
        DB_AUTO_MIGRATE="false",
        MQTT_SESSION_EXPIRY="60",
        WH_PER_TOKEN="0.001",
    )
    with caplog.at_level(logging.INFO, logger="estate"):
        rig.start(settings)
        wait_for(lambda: device_row(rig.engine, "H001").energy_total_wh > 0.005, 20, "energy")
    assert rig.ledger() == {}
    assert device_row(rig.engine, "H001").charge_wh == 0.0
    said = [r for r in caplog.records if "token accounting off" in r.getMessage()]
    assert len(said) == 1
    assert rig.state()["load_on"] is True


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_and_metrics_show_the_ledger_and_the_node(
    rig: TokenRig, node: FakeStarknetNode, token_settings: Callable[..., Any]
) -> None:
    node.mint(OWNER, 100)
    rig.start(token_settings())
    assert rig.gateway is not None
    address = core_ref(rig.gateway, "health").ask(GetHealthAddress(), timeout=10)

    def metric(name: str, **labels: str) -> float:
        status, body = _get(f"http://{address}/metrics")
        assert status == 200
        return next(
            (
                sample.value
                for family in text_string_to_metric_families(body.decode())
                for sample in family.samples
                if sample.name == name and sample.labels == labels
            ),
            0.0,
        )

    wait_for(lambda: metric("estate_ledger_sct", state="accepted") >= 2, 30, "2 SCT charged")
    assert metric("estate_starknet_reachable") == 1
    assert metric("estate_starknet_transactions_total") >= 1
    status, body = _get(f"http://{address}/healthz")
    assert (status, json.loads(body)["checks"]["starknet"]) == (200, "ok")
    summary = fetch_status(address).summary().splitlines()
    assert "  checks: supervisor, broker, database, starknet ok" in summary
    assert any(line.startswith("  tokens: ") and "SCT charged" in line for line in summary)

    node.down()
    wait_for(lambda: _get(f"http://{address}/healthz")[0] == 503, 30, "/healthz to say 503")
    checks = json.loads(_get(f"http://{address}/healthz")[1])["checks"]
    assert "unreachable" in checks["starknet"]
    assert checks["broker"] == checks["database"] == "ok"
    node.up()
    wait_for(lambda: _get(f"http://{address}/healthz")[0] == 200, 90, "/healthz to recover")


def test_the_repl_shows_the_ledger_and_never_the_private_key(
    rig: TokenRig, node: FakeStarknetNode, token_settings: Callable[..., Any]
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="repl-", dir="/tmp"))
    socket_path = str(folder / "repl.sock")
    try:
        node.mint(OWNER, 100)
        rig.start(token_settings(REPL_SOCKET=socket_path))
        wait_for(lambda: rig.ledger().get("accepted", 0) >= 1, 30, "a consume accepted")
        client = ReplClient.unix(socket_path)
        try:
            outputs = {line: client.run(line) for line in ("ledger()", "stats()", "settings")}
        finally:
            client.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert "'accepted'" in outputs["ledger()"]
    assert "'nonce'" in outputs["ledger()"]
    assert "starknet_private_key='***'" in outputs["settings"]
    for line, output in outputs.items():
        for secret in (hex(GATEWAY_KEY), hex(GATEWAY_KEY)[2:], str(GATEWAY_KEY)):
            assert secret not in output, f"{line!r} showed the private key"


def test_synced_boards_are_charged_and_the_central_told_even_after_an_outage(
    rig: TokenRig, node: FakeStarknetNode, token_settings: Callable[..., Any], hub: str
) -> None:
    central = FakeCentral(api_key="hub-key", hub=hub).start()
    try:
        central.set_devices(
            [{"id": 7, "device_id": "H001", "connection_type": "Consumer",
              "account_address": "0xB0B"}]
        )  # fmt: skip
        node.mint(OWNER, 100)
        rig.gateway = Gateway(
            token_settings(CENTRAL_URL=central.url, CENTRAL_API_KEY="hub-key")
        ).start()
        rig.device_ids = ["H001"]
        rig.board = SimulatedBoard.start(
            rig.broker_url, hub, "H001", interval=0.1, hello_interval=0.5
        )
        wait_for(lambda: rig.state()["balance"] == 100, 15, "the balance read after the sync")
        first = wait_for(
            lambda: central.calls_to("token_consumption"), 30, "the central told"
        )[0]
        hashes = {f"0x{tx.hash:064x}" for tx in node.transactions}
        assert first["device_id"] == "H001"
        assert first["tx_hash"] in hashes
        assert 0 < first["balance"] < 100

        central.down()
        told = len(central.calls_to("token_consumption"))
        wait_for(lambda: len(node.transactions) >= len(hashes) + 2, 30, "two more consumes")
        central.up()
        wait_for(
            lambda: len(central.calls_to("token_consumption")) >= told + 2,
            60,
            "the waiting notifications delivered",
        )
        notes = central.calls_to("token_consumption")
        assert len({n["tx_hash"] for n in notes}) == len(notes)  # each consumption once

        def marked() -> int:
            with rig.engine.connect() as conn:
                return conn.execute(
                    select(func.count()).where(LedgerEntryRow.notified_at.is_not(None))
                ).scalar_one()

        # the ledger knows the central has them (not told again after a restart)
        wait_for(lambda: marked() >= len(notes), 10, "the notifications marked")
        assert [n["balance"] for n in notes] == sorted(
            (n["balance"] for n in notes), reverse=True
        )
    finally:
        rig.stop()
        rig.gateway = rig.board = None
        central.stop()
