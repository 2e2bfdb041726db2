"""Commands from the central over the uplink broker (PROTOCOL section 3).

Unit tests of the wire format and of the board's power stream (plain calls), then the
gateway in this process: boards on the machine's Mosquitto, the central's uplink on a
private Mosquitto (a different broker), simulated boards speaking the firmware's
protocol, and a raw client playing the central.
"""

from __future__ import annotations

import contextlib
import json
import queue
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pykka
import pytest
from helpers import RawClient, board_state, clear_retained, command_rows, wait_for
from hypothesis import given
from hypothesis import strategies as st

from actors.gateway import Gateway
from actors.simulated_board import SimulatedBoard
from actors.testing import DeviceHarness, gateway_uplink
from estate.board import Board, PublishPower, StreamChanged, StreamRefused
from estate.db.store import register_device
from estate.device_wire import BoardReading, Instruction
from estate.messages import DeviceRecord, GetStats
from estate.mosquitto import MosquittoProcess
from estate.types import CentralId, DeviceId, DevicePk
from estate.uplink_wire import (
    BadCommand,
    InstructDevice,
    StreamAction,
    StreamCommand,
    UplinkTopics,
    format_power,
    parse_command,
)

# -- the wire format -------------------------------------------------------------------


def test_the_three_commands_of_the_protocol_parse() -> None:
    assert parse_command(b'{"device": 7, "instruction": 2}') == InstructDevice(
        CentralId(7), Instruction.TOGGLE
    )
    assert parse_command(b'{"device": 7, "command": "stream"}') == StreamCommand(
        CentralId(7), StreamAction.STREAM
    )
    assert parse_command(b'{"command": "stop", "device": 7}') == StreamCommand(
        CentralId(7), StreamAction.STOP
    )


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"this is not json {", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"stream"', "not_object"),
        (b"7", "not_object"),
        (b'{"device": 7}', "unknown_command"),
        (b'{"device": 7, "command": "reboot"}', "unknown_command"),
        (b'{"device": 7, "command": ["stream"]}', "unknown_command"),
        (b'{"device": 7, "instruction": 2, "command": "stream"}', "unknown_command"),
        (b'{"device": 7, "instruction": 2, "extra": 1}', "unknown_command"),
        (b'{"instruction": 2}', "bad_value"),
        (b'{"device": "7", "instruction": 2}', "bad_value"),
        (b'{"device": true, "instruction": 2}', "bad_value"),
        (b'{"device": -1, "instruction": 2}', "bad_value"),
        (b'{"device": 7.5, "instruction": 2}', "bad_value"),
        (b'{"device": 7, "instruction": 4}', "bad_value"),
        (b'{"device": 7, "instruction": -1}', "bad_value"),
        (b'{"device": 7, "instruction": "2"}', "bad_value"),
        (b'{"device": 7, "instruction": 2.0}', "bad_value"),
        (b'{"device": 7, "instruction": null}', "bad_value"),
    ],
)
def test_anything_else_is_a_bad_command_of_a_kind(payload: bytes, kind: str) -> None:
    with pytest.raises(BadCommand) as caught:
        parse_command(payload)
    assert caught.value.kind == kind


def test_a_bad_value_names_its_field() -> None:
    with pytest.raises(BadCommand) as caught:
        parse_command(b'{"device": 7, "instruction": 9}')
    assert "$.instruction" in caught.value.detail
    with pytest.raises(BadCommand) as caught:
        parse_command(b'{"instruction": 1}')
    assert "required field missing @ $.device" in caught.value.detail


@given(st.integers(0, 2**63 - 1), st.sampled_from(list(Instruction)))
def test_instructions_round_trip(device: int, instruction: Instruction) -> None:
    payload = json.dumps({"device": device, "instruction": int(instruction)}).encode()
    assert parse_command(payload) == InstructDevice(CentralId(device), instruction)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
COMMANDISH = st.fixed_dictionaries(
    {"device": JSON},
    optional={"instruction": JSON, "command": JSON | st.sampled_from(["stream", "stop"])},
)


@given(JSON | COMMANDISH)
def test_no_json_document_raises_anything_but_bad_command(document: object) -> None:
    with contextlib.suppress(BadCommand):
        command = parse_command(json.dumps(document).encode())
        assert isinstance(command, InstructDevice | StreamCommand)


@given(st.binary(max_size=64))
def test_no_bytes_raise_anything_but_bad_command(payload: bytes) -> None:
    with contextlib.suppress(BadCommand):
        parse_command(payload)


def test_power_messages_carry_an_iso_utc_timestamp_and_watts() -> None:
    at = datetime(2026, 12, 4, 17, 11, 31, 120_000, tzinfo=UTC)
    document = json.loads(format_power(5.0789, at))
    assert document == {"timestamp": "2026-12-04T17:11:31.120Z", "power": 5.08}
    local = at.astimezone(UTC).replace(tzinfo=None)  # naive means UTC
    assert json.loads(format_power(0.0, local))["timestamp"] == "2026-12-04T17:11:31.120Z"
    assert UplinkTopics("estate").power(7) == "estate/power/7"
    assert UplinkTopics("estate").commands == "estate/commands"
    with pytest.raises(ValueError, match="finite"):
        format_power(float("nan"), at)


# -- the board's power stream (plain calls) ----------------------------------------------


def streaming_board(central_id: int | None = 7) -> Board:
    record = DeviceRecord(
        pk=DevicePk(1),
        device_id=DeviceId("H001"),
        connection_type="Consumer",
        central_id=None if central_id is None else CentralId(central_id),
    )
    return Board(record)


def read(board: Board, now: float, current: float = 0.42, voltage: float = 12.1) -> None:
    at = datetime(2026, 12, 4, tzinfo=UTC) + timedelta(seconds=now)
    board.reading(BoardReading(current=current, voltage=voltage), "d", False, at, now)


def powers(board: Board, start: float, end: float) -> dict[float, PublishPower]:
    """What each 1 s tick from `start` to `end` published, by tick time."""
    sent = {}
    for now in range(int(start), int(end) + 1):
        read(board, now - 0.5)
        for effect in board.tick(float(now)):
            if isinstance(effect, PublishPower):
                sent[float(now)] = effect
    return sent


def test_a_stream_publishes_the_latest_power_every_3_ticks() -> None:
    board = streaming_board()
    read(board, 0.0, current=0.5, voltage=12.0)
    effects = board.start_stream(0.0)
    assert effects[0] == StreamChanged(True, "asked by the central")
    assert isinstance(effects[1], PublishPower)
    assert effects[1].power == pytest.approx(6.0)
    assert effects[1].at == datetime(2026, 12, 4, tzinfo=UTC)
    sent = powers(board, 1, 30)
    assert [b - a for a, b in pairwise([0.0, *sent])] == [3.0] * len(sent)
    assert all(p.power == pytest.approx(0.42 * 12.1) for p in sent.values())
    # each value is the reading's own time, not the time it was sent
    assert all(p.at == datetime(2026, 12, 4, tzinfo=UTC) + timedelta(seconds=t - 0.5)
               for t, p in sent.items())
    assert board.snapshot()["streaming"] is True
    assert board.start_stream(31.0) == []  # already on: nothing changes


def test_stop_ends_the_stream() -> None:
    board = streaming_board()
    read(board, 0.0)
    board.start_stream(0.0)
    assert board.stop_stream() == [StreamChanged(False, "stopped by the central")]
    assert powers(board, 1, 20) == {}
    assert board.stop_stream() == []


def test_the_stream_ends_when_the_board_goes_offline() -> None:
    board = streaming_board()
    read(board, 0.0)
    board.start_stream(0.0)
    assert StreamChanged(False, "the board went offline") in board.tick(10.0)
    assert not board.streaming
    read(board, 11.0)  # back online: the central must ask again
    assert all(not isinstance(e, PublishPower) for s in range(12, 30) for e in board.tick(s))

    board = streaming_board()
    read(board, 0.0)
    board.start_stream(0.0)
    assert StreamChanged(False, "the board went offline") in board.status(False, 1.0)


def test_no_stream_without_a_central_id_or_while_offline() -> None:
    board = streaming_board(central_id=None)
    read(board, 0.0)
    assert board.start_stream(0.0) == [StreamRefused("the board has no central id")]
    assert not board.streaming
    offline = streaming_board()
    assert offline.start_stream(0.0) == [StreamRefused("the board is offline")]


def test_a_stream_without_a_reading_yet_waits_for_one() -> None:
    board = streaming_board()
    board.hello(0.0)
    assert board.start_stream(0.0) == [StreamChanged(True, "asked by the central")]
    assert [e for s in (1, 2, 3) for e in board.tick(float(s)) if isinstance(e, PublishPower)] == []
    read(board, 3.5)
    assert any(isinstance(e, PublishPower) for e in board.tick(4.0))


def test_the_device_actor_publishes_the_stream_through_its_uplink_peer() -> None:
    with DeviceHarness("H001", hub="h", central_id=7) as device:
        device.hello()
        device.reading(current=0.5, voltage=12.0, seq=1)
        device.start_stream()
        for _ in range(6):
            device.advance(1.0)
            device.tick()
        device.stop_stream()
        device.advance(1.0)
        device.tick()
        published = device.uplink_published()
        assert [(m.topic, m.qos) for m in published] == [("h/power/7", 0)] * 3
        assert json.loads(published[0].payload)["power"] == 6.0
        assert device.state()["streaming"] is False


def test_a_device_actor_without_central_id_ignores_stream() -> None:
    with DeviceHarness("H001") as device:
        device.hello()
        device.reading(current=0.5, voltage=12.0, seq=1)
        device.start_stream()
        device.advance(5.0)
        device.tick()
        assert device.uplink_published() == []
        assert device.state()["streaming"] is False


# -- the gateway with an uplink on a separate broker -------------------------------------


@pytest.fixture(scope="module")
def uplink_broker() -> Iterator[MosquittoProcess]:
    """The central's broker: a private Mosquitto, not the boards' one."""
    broker = MosquittoProcess().start()
    try:
        yield broker
    finally:
        broker.stop()


class Central:
    """A raw client on the uplink broker playing the central: publishes commands, hears power."""

    def __init__(self, url: str, hub: str) -> None:
        self.topics = UplinkTopics(hub)
        self.raw = RawClient(url)
        self.power: queue.Queue[tuple[float, str, dict[str, Any]]] = queue.Queue()
        subscribed = queue.Queue[bool]()
        self.raw.client.on_message = lambda _c, _u, m: self.power.put(
            (time.monotonic(), m.topic, json.loads(m.payload))
        )
        self.raw.client.on_subscribe = lambda *_args: subscribed.put(True)
        self.raw.client.subscribe(f"{hub}/power/+", qos=1)
        subscribed.get(timeout=10)

    def send(self, document: Any) -> None:
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.raw.publish(self.topics.commands, payload, qos=1)

    def close(self) -> None:
        self.raw.close()


class UplinkHarness:
    """A gateway (boards on the machine's Mosquitto) plus an uplink on another broker."""

    def __init__(self, settings: Any, engine: Any, broker_url: str, uplink_url: str) -> None:
        self.settings, self.engine = settings, engine
        self.broker_url, self.uplink_url = broker_url, uplink_url
        self.hub = settings.hub_name
        self.gateway: Gateway | None = None
        self.uplink: pykka.ActorRef[Any] | None = None
        self.boards: dict[str, pykka.ActorRef[Any]] = {}
        self.central: Central | None = None
        self.pks: dict[str, int] = {}

    def start(self, devices: dict[str, int | None]) -> None:
        """Register the boards (device id -> central id), start the gateway and its uplink."""
        with self.engine.begin() as conn:
            for device_id, central_id in devices.items():
                pk = register_device(conn, device_id, "Consumer", None, central_id)
                self.pks[device_id] = int(pk)
        self.gateway = Gateway(self.settings).start()
        self.uplink = gateway_uplink(self.gateway, devices=len(devices))
        self.central = Central(self.uplink_url, self.hub)

    def board(self, device_id: str) -> pykka.ActorRef[Any]:
        ref = SimulatedBoard.start(
            self.broker_url, self.hub, device_id, interval=0.5, hello_interval=0.5
        )
        self.boards[device_id] = ref
        wait_for(lambda: board_state(ref)["connected"], 15, f"{device_id} connected")
        return ref

    def stats(self) -> dict[str, Any]:
        assert self.uplink is not None
        return self.uplink.ask(GetStats(), timeout=10)

    def stop(self) -> None:
        if self.central is not None:
            self.central.close()
        for ref in self.boards.values():
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                ref.stop(block=True, timeout=10)
        if self.gateway is not None:
            self.gateway.stop()
        clear_retained(self.broker_url, self.hub, self.pks)


@pytest.fixture
def uplink_harness(
    sqlite_url: str,
    mosquitto_url: str,
    uplink_broker: MosquittoProcess,
    make_settings: Callable[..., Any],
    engine_for: Callable[[str], Any],
) -> Iterator[UplinkHarness]:
    assert uplink_broker.url != mosquitto_url
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        MQTT_URL=mosquitto_url,
        UPLINK_MQTT_URL=uplink_broker.url,
        DB_AUTO_MIGRATE="false",
        MQTT_SESSION_EXPIRY="60",
    )
    h = UplinkHarness(settings, engine_for(sqlite_url), mosquitto_url, uplink_broker.url)
    try:
        yield h
    finally:
        h.stop()


@pytest.mark.integration
def test_a_toggle_from_the_central_reaches_the_board_within_a_keepalive_period(
    uplink_harness: UplinkHarness,
) -> None:
    h = uplink_harness
    h.start({"H001": 7, "H002": 8})
    board, other = h.board("H001"), h.board("H002")
    before = board_state(board)
    assert before["load_on"] is True
    assert h.central is not None

    sent_at = time.monotonic()
    h.central.send({"device": 7, "instruction": 2})
    state = wait_for(
        lambda: (s := board_state(board))["load_on"] is False and s,
        h.settings.keepalive_interval,
        "the toggle at the board within one keep-alive period",
    )
    toggles = [c for c in state["commands"] if c[2] == Instruction.TOGGLE]
    assert len(toggles) == 1
    assert toggles[0][0] - sent_at < h.settings.keepalive_interval
    assert not [c for c in board_state(other)["commands"] if c[2] == Instruction.TOGGLE]
    stats = h.stats()
    assert stats["instructions"] == 1
    assert stats["connected"] is True
    assert stats["broker"] == h.uplink_url  # the private broker, not the boards' one
    assert stats["rejected"] == {}
    wait_for(
        lambda: any(
            (r.instruction, r.reason) == (2, "central")
            for r in command_rows(h.engine, h.pks["H001"])
        ),
        5,
        "the central's toggle recorded in the database",
    )
    # the board reports its new load state; the gateway follows
    wait_for(lambda: board_state(board)["load_on"] is False, 5, "the load to stay off")


@pytest.mark.integration
def test_stream_publishes_power_about_every_3_seconds_until_stop(
    uplink_harness: UplinkHarness,
) -> None:
    h = uplink_harness
    h.start({"H001": 7})
    h.board("H001")
    central = h.central
    assert central is not None
    time.sleep(1.0)  # a few readings in
    central.send({"device": 7, "command": "stream"})
    messages = [central.power.get(timeout=10) for _ in range(4)]
    central.send({"device": 7, "command": "stop"})
    stopped_at = time.monotonic()

    assert {topic for _, topic, _ in messages} == {f"{h.hub}/power/7"}
    gaps = [b[0] - a[0] for a, b in pairwise(messages)]
    assert all(2.0 <= gap <= 4.0 for gap in gaps), gaps
    for _, _, document in messages:
        assert set(document) == {"timestamp", "power"}
        # a simulated board with its load on: 0.3-0.6 A at 11.9-12.3 V
        assert 3.5 <= document["power"] <= 7.4, document
        assert document["timestamp"].endswith("Z")
        at = datetime.fromisoformat(document["timestamp"])
        assert at.utcoffset() == timedelta(0)
        assert abs((datetime.now(UTC) - at).total_seconds()) < 15

    late = []
    with contextlib.suppress(queue.Empty):
        while True:
            late.append(central.power.get(timeout=5.0))
    # at most one value that was on its way when `stop` arrived
    assert all(t - stopped_at < 0.5 for t, _, _ in late), late
    stats = h.stats()
    assert (stats["stream_starts"], stats["stream_stops"]) == (1, 1)
    assert stats["published"] >= 4


@pytest.mark.integration
def test_bad_commands_are_counted_and_never_fatal(uplink_harness: UplinkHarness) -> None:
    h = uplink_harness
    h.start({"H001": 7})
    board = h.board("H001")
    central = h.central
    assert central is not None
    for bad in (
        b"this is not json {",
        b"[1, 2]",
        {"device": 7, "command": "reboot"},
        {"device": 7, "what": 1},
        {"device": 99, "instruction": 2},
        {"device": 99, "command": "stream"},
        {"device": 7, "instruction": 9},
        {"device": "7", "instruction": 2},
    ):
        central.send(bad)
    central.send({"device": 7, "instruction": 2})  # and a good one: it still works
    wait_for(lambda: h.stats()["received"] == 9, 10, "every command handled")
    stats = h.stats()
    assert stats["rejected"] == {
        "not_json": 1,
        "not_object": 1,
        "unknown_command": 2,
        "unknown_device": 2,
        "bad_value": 2,
    }
    assert stats["instructions"] == 1
    assert h.uplink is not None
    assert h.uplink.is_alive()
    wait_for(lambda: board_state(board)["load_on"] is False, 5, "the good toggle at the board")


@pytest.mark.integration
def test_a_board_registered_without_central_id_has_no_route(
    uplink_harness: UplinkHarness,
) -> None:
    h = uplink_harness
    h.start({"H001": 7, "L001": None})
    assert h.central is not None
    assert h.stats()["routes"] == 1
    h.central.send({"device": 0, "command": "stream"})  # no central id is 0 either
    wait_for(lambda: h.stats().get("received", 0) == 1, 10, "the command handled")
    assert h.stats()["rejected"] == {"unknown_device": 1}


@pytest.mark.integration
def test_the_uplink_resubscribes_after_its_broker_restarts(
    sqlite_url: str,
    mosquitto_url: str,
    make_settings: Callable[..., Any],
    engine_for: Callable[[str], Any],
) -> None:
    broker = MosquittoProcess().start()
    settings = make_settings(
        DATABASE_URL=sqlite_url, MQTT_URL=mosquitto_url, DB_AUTO_MIGRATE="false",
        MQTT_SESSION_EXPIRY="60", UPLINK_MQTT_URL=broker.url,
    )
    h = UplinkHarness(settings, engine_for(sqlite_url), mosquitto_url, broker.url)
    try:
        h.start({"H001": 7})
        board = h.board("H001")
        assert h.central is not None
        h.central.close()
        h.central = None
        broker.restart(down=0.5)
        wait_for(lambda: h.stats()["connects"] == 2 and h.stats()["subscribed"], 20,
                 "the uplink to reconnect and subscribe again")
        h.central = Central(broker.url, h.hub)
        h.central.send({"device": 7, "instruction": 2})
        wait_for(lambda: board_state(board)["load_on"] is False, 5, "the toggle after restart")
    finally:
        h.stop()
        broker.stop()
