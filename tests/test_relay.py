"""Relay of stored readings to the (fake) central through the durable outbox."""

from __future__ import annotations

import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import core_ref, register, wait_for
from sqlalchemy import select

from actors.gateway import Gateway
from actors.simulated_board import SimulatedBoard
from estate.central_wire import iso_utc
from estate.db.models import DeviceRow, ReadingRow
from estate.fake_central import FakeCentral
from estate.messages import GetBoardState, GetHealthAddress, GetStats, PauseReadings

pytestmark = pytest.mark.integration

API_KEY = "hub-key-for-tests"
BOARDS = ("H001", "H002")


@pytest.fixture
def central(hub: str) -> Iterator[FakeCentral]:
    fake = FakeCentral(api_key=API_KEY, hub=hub).start()
    fake.set_devices(
        [
            {"id": n, "device_id": d, "connection_type": "Consumer", "account_address": "0x1"}
            for n, d in enumerate(BOARDS, start=1)
        ]
    )
    yield fake
    fake.stop()


@pytest.fixture
def engine(db_url: str, engine_for: Any) -> Any:
    return engine_for(db_url)


@pytest.fixture
def gateway_factory(
    db_url: str, mosquitto_url: str, make_settings: Callable[..., Any], engine_for: Any
) -> Iterator[Callable[[str], Gateway]]:
    register(engine_for(db_url), *BOARDS)
    started: list[Gateway] = []

    def start(central_url: str) -> Gateway:
        settings = make_settings(
            DATABASE_URL=db_url,
            MQTT_URL=mosquitto_url,
            CENTRAL_URL=central_url,
            CENTRAL_API_KEY=API_KEY,
            RELAY_BATCH_MAX="50",
            RELAY_BATCH_AGE="0.5",
        )
        started.append(Gateway(settings).start())
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def relayed(central: FakeCentral) -> Counter[tuple[str, str, float, float]]:
    """What the central received, as a multiset (two readings may share a receive time)."""
    return Counter((r["device_id"], r["ts"], r["voltage"], r["current"]) for r in central.readings)


def stored(engine: Any) -> Counter[tuple[str, str, float, float]]:
    """What the gateway stored, in the same form."""
    query = select(DeviceRow.device_id, ReadingRow.ts, ReadingRow.voltage, ReadingRow.current)
    with engine.connect() as conn:
        rows = conn.execute(query.join(DeviceRow, DeviceRow.id == ReadingRow.device_pk))
        return Counter((d, iso_utc(ts), v, c) for d, ts, v, c in rows)


def outbox_metric(gateway: Gateway, name: str) -> float:
    """A gauge of the gateway's /metrics."""
    address = core_ref(gateway, "health").ask(GetHealthAddress(), timeout=10)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def stream_then_pause(boards: list[Any], readings: int) -> dict[str, int]:
    wait_for(
        lambda: all(len(b.ask(GetBoardState())["accepted"]) >= readings for b in boards),
        30,
        f"{readings} readings from each board",
    )
    for board in boards:
        board.tell(PauseReadings(True))
    return {b.ask(GetBoardState())["device_id"]: b.ask(GetBoardState())["seq"] for b in boards}


def test_every_reading_reaches_the_central_once_despite_an_outage(
    central: FakeCentral,
    gateway_factory: Callable[[str], Gateway],
    mosquitto_url: str,
    hub: str,
    engine: Any,
) -> None:
    gateway = gateway_factory(central.url)
    boards = [SimulatedBoard.start(mosquitto_url, hub, d, interval=0.05) for d in BOARDS]
    wait_for(lambda: len(central.readings) >= 20, 20, "the first relayed readings")
    central.fail_with(500)
    wait_for(
        lambda: core_ref(gateway, "central").ask(GetStats()).get("relay_failures", 0) >= 1,
        15,
        "a failed relay",
    )
    central.down()
    sent = stream_then_pause(boards, 150)
    assert outbox_metric(gateway, "estate_relay_outbox_readings") > 0
    assert outbox_metric(gateway, "estate_relay_lag_seconds") > 0
    central.fail_with(None)
    central.up()
    total = sum(sent.values())
    wait_for(lambda: len(central.readings) >= total, 60, f"{total} relayed readings")
    wait_for(
        lambda: outbox_metric(gateway, "estate_relay_outbox_readings") == 0, 10, "empty outbox"
    )
    assert relayed(central) == stored(engine), "a reading relayed twice or lost"
    assert sum(relayed(central).values()) == total
    for device_id in BOARDS:  # order kept per device
        times = [r["ts"] for r in central.readings if r["device_id"] == device_id]
        assert times == sorted(times)
    for board in boards:
        board.stop()


def test_a_central_without_readings_endpoint_keeps_them_for_later(
    central: FakeCentral,
    gateway_factory: Callable[[str], Gateway],
    mosquitto_url: str,
    hub: str,
    engine: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    central.set_readings_endpoint(False)
    gateway = gateway_factory(central.url)
    boards = [SimulatedBoard.start(mosquitto_url, hub, d, interval=0.1) for d in BOARDS]
    sent = stream_then_pause(boards, 20)
    wait_for(lambda: "no /readings endpoint" in caplog.text, 15, "the warning")
    assert caplog.text.count("no /readings endpoint") == 1
    assert central.readings == []
    gateway.stop()

    central.set_readings_endpoint(True)  # the central is upgraded; the gateway restarts
    gateway_factory(central.url)
    total = sum(sent.values())
    wait_for(lambda: len(central.readings) >= total, 30, f"{total} relayed readings")
    assert relayed(central) == stored(engine)
    assert sum(relayed(central).values()) == total
    for board in boards:
        board.stop()


def test_a_token_that_expires_mid_run_is_renewed_and_nothing_is_lost(
    central: FakeCentral,
    gateway_factory: Callable[[str], Gateway],
    mosquitto_url: str,
    hub: str,
    engine: Any,
) -> None:
    central.token_ttl = 3.0
    gateway_factory(central.url)
    boards = [SimulatedBoard.start(mosquitto_url, hub, d, interval=0.1) for d in BOARDS]
    sent = stream_then_pause(boards, 60)  # about 6 s: the token expires twice meanwhile
    central.revoke_tokens()  # and one is refused outright: reconnect and retry once
    total = sum(sent.values())
    wait_for(lambda: len(central.readings) >= total, 30, f"{total} relayed readings")
    assert relayed(central) == stored(engine)
    assert sum(relayed(central).values()) == total
    assert len(central.calls_to("connect")) >= 3
    for board in boards:
        board.stop()
