"""The gateway in this process against the real Mosquitto, on SQLite and PostgreSQL.

Simulated boards (actors/simulated_board.py) speak the firmware's protocol over real
MQTT; the database is read back with plain SQL.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest
from helpers import (
    RawClient,
    board_state,
    clear_retained,
    command_rows,
    device_ref,
    device_row,
    mqtt_stats,
    quiesce,
    reading_rows,
    register,
    stored_seqs,
    supervisor_stats,
    wait_for,
)

from actors.gateway import Gateway
from actors.simulated_board import SimulatedBoard
from estate.device_wire import TopicKind, Topics
from estate.messages import PauseReadings, PressBalanceKey

pytestmark = pytest.mark.integration

READING = {"current": 0.42, "voltage": 12.1, "update": "false", "req": "true"}


class Harness:
    """One gateway on a fresh database plus the boards a test starts."""

    def __init__(self, db_url: str, broker_url: str, hub: str, engine: Any, settings: Any):
        self.db_url, self.broker_url, self.hub = db_url, broker_url, hub
        self.engine, self.settings = engine, settings
        self.topics = Topics(hub)
        self.pks: dict[str, int] = {}
        self.gateway: Gateway | None = None
        self.boards: dict[str, pykka.ActorRef[Any]] = {}

    def start(self, *device_ids: str) -> Gateway:
        """Register the boards, start the gateway, return once it is subscribed."""
        self.pks = register(self.engine, *device_ids)
        # a retained status the gateway gets the moment its subscription is active
        probe = RawClient(self.broker_url)
        probe.publish(self.topic(device_ids[0], TopicKind.STATUS), b"offline", retain=True)
        probe.close()
        self.gateway = Gateway(self.settings).start()
        wait_for(
            lambda: mqtt_stats(self.gateway).get("received", 0) >= 1,
            15,
            "the gateway to connect and subscribe",
        )
        return self.gateway

    def board(self, device_id: str, **options: Any) -> pykka.ActorRef[Any]:
        options = {"interval": 0.1, "hello_interval": 0.5, **options}
        ref = SimulatedBoard.start(self.broker_url, self.hub, device_id, **options)
        self.boards[device_id] = ref
        return ref

    def topic(self, device_id: str, kind: TopicKind) -> str:
        return self.topics.of(device_id, kind)

    def status(self, device_id: str) -> str | None:
        row = device_row(self.engine, device_id)
        return None if row is None else row.status

    def stop(self) -> None:
        for ref in self.boards.values():
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                ref.stop(block=True, timeout=10)
        if self.gateway is not None:
            self.gateway.stop()
        clear_retained(self.broker_url, self.hub, self.pks)


@pytest.fixture
def harness(
    db_url: str,
    mosquitto_url: str,
    hub: str,
    make_settings: Callable[..., Any],
    engine_for: Callable[[str], Any],
) -> Iterator[Harness]:
    settings = make_settings(
        DATABASE_URL=db_url,
        MQTT_URL=mosquitto_url,
        DB_AUTO_MIGRATE="false",  # the fixture migrated it
        MQTT_SESSION_EXPIRY="60",  # do not leave week-long sessions on the broker
    )
    h = Harness(db_url, mosquitto_url, hub, engine_for(db_url), settings)
    try:
        yield h
    finally:
        h.stop()


def wait_streaming(ref: pykka.ActorRef[Any], readings: int, timeout: float = 15) -> None:
    wait_for(
        lambda: board_state(ref)["connected"] and len(board_state(ref)["accepted"]) >= readings,
        timeout,
        f"{readings} accepted readings",
    )


def wait_stored(h: Harness, accepted: dict[str, tuple[int, ...]], timeout: float = 15) -> None:
    """Wait until the database holds exactly the accepted readings (each once)."""
    want = {h.pks[d]: sorted(seqs) for d, seqs in accepted.items()}

    def done() -> bool:
        have = stored_seqs(h.engine)
        return all(sorted(have.get(pk, [])) == seqs for pk, seqs in want.items())

    try:
        wait_for(done, timeout, "the accepted readings in the database")
    except AssertionError:
        have = stored_seqs(h.engine)
        for device_id, pk in h.pks.items():
            if pk in want:
                stored = have.get(pk, [])
                missing = sorted(set(want[pk]) - set(stored))
                extra = sorted(set(stored) - set(want[pk]))
                dups = sorted({s for s in stored if stored.count(s) > 1})
                print(f"{device_id}: missing {missing} extra {extra} duplicated {dups}")
        raise


def test_readings_of_several_boards_are_stored_once(harness: Harness) -> None:
    ids = ("H001", "H002", "H003")
    harness.start(*ids)
    boards = {d: harness.board(d) for d in ids}
    for ref in boards.values():
        wait_streaming(ref, 12)
    accepted = quiesce(boards)
    for seqs in accepted.values():
        assert list(seqs) == list(range(1, len(seqs) + 1))
    wait_stored(harness, accepted)

    for device_id in ids:
        rows = reading_rows(harness.engine, harness.pks[device_id])
        assert [r.seq for r in rows] == list(accepted[device_id])
        for row in rows:
            assert row.boot == 0
            assert 0.3 <= row.current <= 0.6
            assert 11.9 <= row.voltage <= 12.3
            assert row.power == pytest.approx(row.current * row.voltage, rel=1e-9)
            assert row.load_on is True
        energies = [r.energy_wh for r in rows]
        # the first reading has no previous one to integrate from; every later one has
        assert energies[0] == 0.0
        assert all(e > 0 for e in energies[1:]), energies
        # ~5 W for ~0.1 s: about 0.00014 Wh each
        assert all(e < 0.01 for e in energies)

        device = device_row(harness.engine, device_id)
        assert device.status == "online"
        assert device.load_on is True
        assert device.last_seen is not None
        assert device.energy_total_wh == pytest.approx(sum(energies), rel=1e-9)
        assert device.energy_total_wh > 0
        # the handshake is recorded; keep-alives are not
        commands = command_rows(harness.engine, harness.pks[device_id])
        assert [(c.instruction, c.reason) for c in commands][:1] == [(1, "handshake")]


def test_handshake_keepalive_and_silent_boards_go_offline(harness: Harness) -> None:
    """One board streams for ~12 s: commands never 5 s apart. Two go silent: offline at ~10 s."""
    harness.start("H001", "H002", "H003")
    streaming = harness.board("H001")
    paused = harness.board("H002")
    leaving = harness.board("H003")
    for ref in (streaming, paused, leaving):
        wait_streaming(ref, 3)
    wait_for(
        lambda: all(harness.status(d) == "online" for d in ("H001", "H002", "H003")),
        5,
        "the boards online in the database",
    )
    paused.tell(PauseReadings(True))
    leaving.stop(block=True, timeout=10)  # a clean disconnect: no last will
    silent_since = time.monotonic()

    went_offline: dict[str, float] = {}

    def offline() -> bool:
        for device_id in ("H002", "H003"):
            if device_id not in went_offline and harness.status(device_id) == "offline":
                went_offline[device_id] = time.monotonic() - silent_since
        return len(went_offline) == 2

    wait_for(offline, 16, "the silent boards offline", interval=0.1)
    for device_id, after in went_offline.items():
        assert 9.0 <= after <= 13.0, f"{device_id} offline after {after:.1f}s, expected ~10s"

    # watch the streaming board's commands over at least 12 s
    first_command = board_state(streaming)["commands"][0][0]
    time.sleep(max(0.0, first_command + 12.2 - time.monotonic()))
    state = board_state(streaming)
    commands = state["commands"]
    # handshake: the first command is "<balance>,1"
    assert commands[0][1:] == (0, 1)
    assert all(instruction == 1 for _at, _balance, instruction in commands)
    times = [at for at, _balance, _instruction in commands]
    assert times[-1] - times[0] >= 7.0, f"too few commands: {times}"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) <= 5.5, f"gaps between commands: {gaps}"
    assert len(commands) >= 3
    # the streaming board never dropped back to idle and is still online
    assert state["connected"] is True
    assert harness.status("H001") == "online"


def test_last_will_marks_the_board_offline(harness: Harness) -> None:
    harness.start("H001")
    status_topic = harness.topic("H001", TopicKind.STATUS)
    board = RawClient(
        harness.broker_url,
        client_id=f"sim-{harness.hub}-H001",
        topic=status_topic,
        payload=b"offline",
        qos=1,
        retain=True,
    )
    try:
        board.publish(status_topic, b"online", retain=True)
        wait_for(lambda: harness.status("H001") == "online", 5, "H001 online")
        board.die()
        died = time.monotonic()
        wait_for(lambda: harness.status("H001") == "offline", 5, "H001 offline by its will")
        # well before the 10 s silence rule could have done it
        assert time.monotonic() - died < 5
    finally:
        board.die()


def test_balance_key_gets_instruction_3(harness: Harness) -> None:
    harness.start("H001")
    board = harness.board("H001")
    wait_streaming(board, 3)
    board.tell(PressBalanceKey())

    def answered() -> bool:
        state = board_state(board)
        return state["update"] is False and any(c[2] == 3 for c in state["commands"])

    wait_for(answered, 5, "instruction 3 and the update flag cleared")
    commands = board_state(board)["commands"]
    assert [c[1:] for c in commands if c[2] == 3][:1] == [(0, 3)]
    wait_for(
        lambda: any(
            (c.instruction, c.reason) == (3, "update")
            for c in command_rows(harness.engine, harness.pks["H001"])
        ),
        5,
        "the balance answer recorded in the database",
    )


def test_bad_input_is_counted_never_stored(harness: Harness) -> None:
    gateway = harness.start("H001")
    telemetry = harness.topic("H001", TopicKind.TELEMETRY)
    big = json.dumps({**READING, "pad": "x" * 2048}).encode()
    assert len(big) > 2048
    raw = RawClient(harness.broker_url)
    try:
        raw.publish(telemetry, b"this is not json {")
        raw.publish(telemetry, json.dumps({"current": 0.4, "update": "false"}).encode())
        raw.publish(telemetry, json.dumps({**READING, "current": 150.0}).encode())
        raw.publish(telemetry, json.dumps({**READING, "voltage": -3.0}).encode())
        raw.publish(telemetry, big)
        raw.publish(telemetry, json.dumps({**READING, "voltage": "12.1"}).encode())
        raw.publish(telemetry, b"[1, 2]")
        raw.publish(harness.topic("NOPE", TopicKind.TELEMETRY), json.dumps(READING).encode())
        raw.publish(harness.topic("NOPE", TopicKind.HELLO), b'{"device_id": "NOPE"}')
        raw.publish(harness.topic("NOPE", TopicKind.STATUS), b"online")
        # and then a good reading: the gateway still works, and the bad ones went first
        raw.publish(telemetry, json.dumps({**READING, "seq": 1}).encode())
    finally:
        raw.close()

    wait_for(lambda: reading_rows(harness.engine), 10, "the good reading stored")
    stats = wait_for(
        lambda: (s := mqtt_stats(gateway))["acked"] == s["received"] and s,
        5,
        "every message acknowledged",
    )
    assert stats["rejected"] == {
        "not_json": 1,
        "missing_field": 1,
        "out_of_range": 2,
        "too_large": 1,
        "bad_value": 1,
        "not_object": 1,
        "unknown_device": 3,
    }
    assert stats["connected"] is True
    assert stats["received"] == 12  # the probe, ten bad ones, the good one

    rows = reading_rows(harness.engine)
    assert [(r.device_pk, r.seq, r.current, r.voltage) for r in rows] == [
        (harness.pks["H001"], 1, 0.42, 12.1)
    ]
    assert math.isclose(rows[0].power, 0.42 * 12.1)
    # an unknown device has no actor and no row
    assert device_row(harness.engine, "NOPE") is None
    sup = supervisor_stats(gateway)
    assert sup["devices"] == 1
    assert {a for a in sup["actors"] if a.startswith("device:")} == {"device:H001"}
    assert all(sup["actors"].values())
    assert sup["restarts"] == {}
    assert device_ref(gateway, "NOPE") is None
    device_actors = [
        ref for ref in pykka.ActorRegistry.get_by_class_name("DeviceActor") if ref.is_alive()
    ]
    assert len(device_actors) == 1


def test_crashed_device_actor_is_restarted_and_loses_nothing(harness: Harness) -> None:
    gateway = harness.start("H001", "H002")
    boards = {d: harness.board(d) for d in ("H001", "H002")}
    for ref in boards.values():
        wait_streaming(ref, 5)
    old = device_ref(gateway, "H001")
    assert old is not None

    # Slow the actor down so that readings queue in its mailbox behind the crash: those
    # die with it, unacknowledged, and must still reach the database.
    def slow_clock() -> float:
        time.sleep(0.15)
        return time.monotonic()

    old.proxy().clock = slow_clock
    time.sleep(0.8)
    old.tell("not a message any actor handles")  # an unknown message type: TypeError
    time.sleep(0.3)  # more readings queue behind it
    crashed_at = len(board_state(boards["H001"])["accepted"])

    wait_for(lambda: not old.is_alive(), 10, "the device actor to crash")
    new = wait_for(
        lambda: (ref := device_ref(gateway, "H001")) is not None and ref != old and ref,
        10,
        "the supervisor to restart the device actor",
    )
    assert new.is_alive()
    sup = supervisor_stats(gateway)
    assert sup["restarts"] == {"device:H001": 1}
    assert all(sup["actors"].values())
    assert sup["devices"] == 2

    # readings keep being stored after the restart
    pk = harness.pks["H001"]
    wait_for(
        lambda: max(stored_seqs(harness.engine).get(pk, [0])) > crashed_at + 10,
        10,
        "new readings stored after the restart",
    )
    accepted = quiesce(boards)
    wait_stored(harness, accepted)
    assert all(r.boot == 0 for r in reading_rows(harness.engine))
