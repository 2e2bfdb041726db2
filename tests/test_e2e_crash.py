"""`estate run` as a process, SIGKILLed mid-stream: no accepted reading is lost or doubled.

The boards run in this process, so they outlive the gateway: every reading the broker
acknowledged to a board must end up in the database exactly once, whatever the gateway
had received, stored or acknowledged when it died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from helpers import (
    GATEWAY_ACCOUNT,
    clear_retained,
    reading_count,
    register,
    starknet_env,
    starknet_node,
    stored_seqs,
    wait_for,
)
from sqlalchemy import func, select, update

from actors.simulated_board import SimulatedBoard
from estate.db.models import ChainTransactionRow, DeviceRow, LedgerEntryRow, ReadingRow
from estate.messages import GetBoardState, PauseReadings
from estate.sct_contract import normalise_address

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

BOARDS = 10
INTERVAL = 0.1
"""10 boards at 10 readings/s: ~100 readings/s, so a few seconds' outage queues a few
hundred on the broker, well under Mosquitto's max_queued_messages (1,000)."""


class GatewayProcess:
    """`estate run` in a subprocess, its output in a log file."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.log_path = cwd / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        with self.log_path.open("ab") as log:
            log.write(f"---- run {self.runs} ----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "estate.cli", "run"],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: no flush, no acknowledgement, no MQTT DISCONNECT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture
def gateway_process(
    pg_url: str, mosquitto_url: str, hub: str, tmp_path: Path
) -> Iterator[GatewayProcess]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "DATABASE_"))},
        "DATABASE_URL": pg_url,
        "MQTT_URL": mosquitto_url,
        "HUB_NAME": hub,
        "MQTT_CLIENT_ID": f"gw-{hub}",
        "MQTT_SESSION_EXPIRY": "300",  # long enough to survive the kills, not to linger
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    process = GatewayProcess(env, tmp_path)
    try:
        yield process
    finally:
        process.cleanup()


def _state(ref: pykka.ActorRef[Any]) -> dict[str, Any]:
    return ref.ask(GetBoardState(), timeout=10)


def _readings_grow(engine: Any, gateway: GatewayProcess, by: int, timeout: float) -> None:
    start = reading_count(engine)

    def grown() -> bool:
        assert gateway.alive(), f"the gateway exited:\n{gateway.log_tail()}"
        return reading_count(engine) >= start + by

    wait_for(grown, timeout, f"{by} more readings stored", interval=0.1)


def test_sigkill_mid_stream_loses_and_doubles_nothing(
    gateway_process: GatewayProcess,
    pg_url: str,
    mosquitto_url: str,
    hub: str,
    engine_for: Any,
) -> None:
    engine = engine_for(pg_url)
    ids = [f"E{n:03d}" for n in range(1, BOARDS + 1)]
    pks = register(engine, *ids)
    gateway = gateway_process
    boards: dict[str, pykka.ActorRef[Any]] = {}
    try:
        gateway.start()
        for device_id in ids:
            boards[device_id] = SimulatedBoard.start(
                mosquitto_url, hub, device_id, interval=INTERVAL, hello_interval=0.5
            )
        _readings_grow(engine, gateway, 200, 30)

        for _kill in range(2):
            gateway.kill()
            time.sleep(1.0)
            gateway.start()
            # it resumes its session, stores the backlog and keeps up with the boards
            _readings_grow(engine, gateway, 300, 30)
            time.sleep(1.0)

        for ref in boards.values():
            ref.tell(PauseReadings(True))
        time.sleep(0.3)
        wait_for(
            lambda: all(_state(ref)["in_flight"] == 0 for ref in boards.values()),
            10,
            "the boards' last PUBACKs",
        )
        states = {device_id: _state(ref) for device_id, ref in boards.items()}
        for device_id, state in states.items():
            # nothing was lost between board and broker, and no board fell back to idle
            assert sorted(state["accepted"]) == list(range(1, state["seq"] + 1)), device_id
        want = {pks[d]: sorted(s["accepted"]) for d, s in states.items()}
        total = sum(len(seqs) for seqs in want.values())
        assert total > 600  # the stream really ran through both restarts

        def all_stored() -> bool:
            assert gateway.alive(), f"the gateway exited:\n{gateway.log_tail()}"
            have = stored_seqs(engine)
            return all(sorted(set(have.get(pk, []))) == seqs for pk, seqs in want.items())

        try:
            wait_for(all_stored, 30, "every accepted reading in the database", interval=0.2)
        except AssertionError:
            have = stored_seqs(engine)
            for device_id, pk in pks.items():
                missing = sorted(set(want[pk]) - set(have.get(pk, [])))
                if missing:
                    print(f"{device_id}: {len(missing)} missing, e.g. {missing[:20]}")
            print(gateway.log_tail())
            raise

        # exactly once: no (device, seq) twice, nothing the boards did not send
        with engine.connect() as conn:
            doubled = conn.execute(
                select(ReadingRow.device_pk, ReadingRow.seq, func.count())
                .group_by(ReadingRow.device_pk, ReadingRow.seq)
                .having(func.count() > 1)
            ).all()
            boots = conn.execute(select(ReadingRow.boot).distinct()).scalars().all()
        assert doubled == []
        assert {pk: sorted(s) for pk, s in stored_seqs(engine).items()} == want
        assert reading_count(engine) == total
        assert boots == [0], "a redelivery was taken for a board's reboot"

        assert gateway.terminate(timeout=10) == 0, gateway.log_tail()
    finally:
        for ref in boards.values():
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                ref.stop(block=True, timeout=10)
        gateway.cleanup()
        clear_retained(mosquitto_url, hub, ids)


def _ledger(engine: Any) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(LedgerEntryRow.status, func.sum(LedgerEntryRow.amount)).group_by(
                LedgerEntryRow.status
            )
        ).all()
    return {status: int(amount) for status, amount in rows}


def test_sigkill_with_a_consume_in_flight_charges_it_once(
    gateway_process: GatewayProcess,
    pg_url: str,
    mosquitto_url: str,
    hub: str,
    engine_for: Any,
) -> None:
    engine = engine_for(pg_url)
    account = GATEWAY_ACCOUNT[0]
    owners = {f"K{n:03d}": normalise_address(0xA000 + n) for n in range(1, 4)}
    pks = register(engine, *owners)
    with engine.begin() as conn:
        for device_id, owner in owners.items():
            conn.execute(
                update(DeviceRow)
                .where(DeviceRow.id == pks[device_id])
                .values(account_address=owner)
            )
    node = starknet_node()
    for owner in owners.values():
        node.mint(owner, 1000)
    gateway = gateway_process
    gateway.env.update(
        **starknet_env(node),
        STARKNET_BATCH_WINDOW="0.5",
        WH_PER_TOKEN="0.002",  # about a token a second a board
    )
    boards: dict[str, pykka.ActorRef[Any]] = {}
    try:
        gateway.start()
        for device_id in owners:
            boards[device_id] = SimulatedBoard.start(
                mosquitto_url, hub, device_id, interval=INTERVAL, hello_interval=0.5
            )
        wait_for(lambda: _ledger(engine).get("accepted", 0) >= 3, 30, "consumes accepted")

        # a transaction sent, not in a block yet, when the gateway dies
        node.pause_blocks()
        sent = node.invoke_count
        wait_for(lambda: node.invoke_count > sent, 30, "a transaction in flight")
        assert _ledger(engine).get("submitted", 0) >= 1
        gateway.kill()
        node.resume_blocks()
        gateway.start()
        wait_for(lambda: _ledger(engine).get("accepted", 0) >= 12, 60, "charging again")

        for ref in boards.values():
            ref.tell(PauseReadings(True))

        def settled() -> bool:
            assert gateway.alive(), f"the gateway exited:\n{gateway.log_tail()}"
            ledger = _ledger(engine)
            return ledger.get("pending", 0) == ledger.get("submitted", 0) == 0

        wait_for(settled, 60, "every consume settled", interval=0.2)
        time.sleep(1.5)  # the last readings' entries
        wait_for(settled, 60, "every consume settled", interval=0.2)
        with engine.connect() as conn:
            charged = dict(
                conn.execute(
                    select(LedgerEntryRow.account_address, func.sum(LedgerEntryRow.amount))
                    .where(LedgerEntryRow.status == "accepted")
                    .group_by(LedgerEntryRow.account_address)
                ).all()
            )
            used_nonces = conn.execute(
                select(func.count()).where(ChainTransactionRow.status.in_(["accepted", "reverted"]))
            ).scalar_one()
        # exactly once: what the chain took is what the ledger says it charged
        assert {a: 1000 - node.balance_of(a) for a in owners.values()} == charged
        assert node.nonce_of(account) == used_nonces
        assert gateway.terminate(timeout=10) == 0, gateway.log_tail()
    finally:
        for ref in boards.values():
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                ref.stop(block=True, timeout=10)
        gateway.cleanup()
        node.stop()
        clear_retained(mosquitto_url, hub, list(owners))
