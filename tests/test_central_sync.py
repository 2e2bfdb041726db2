"""The gateway with a (fake) central: sync, removal, activation, outage, shutdown."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import actor_refs, core_ref, device_row, register, supervisor_stats, wait_for

from actors.gateway import Gateway
from actors.simulated_board import SimulatedBoard
from estate.fake_central import FakeCentral
from estate.messages import (
    DeviceActivityChanged,
    GetBoardState,
    GetStats,
    PauseReadings,
    SyncNow,
)
from estate.mqtt_client import BrokerEndpoint, make_client
from estate.types import DeviceId

pytestmark = pytest.mark.integration

API_KEY = "hub-key-for-tests"


def central_device(central_id: int, device_id: str) -> dict[str, Any]:
    return {
        "id": central_id,
        "device_id": device_id,
        "connection_type": "Consumer",
        "account_address": f"0x{central_id:x}",
    }


@pytest.fixture
def central(hub: str) -> Iterator[FakeCentral]:
    fake = FakeCentral(api_key=API_KEY, hub=hub).start()
    fake.set_devices([central_device(7, "H001"), central_device(8, "H002")])
    yield fake
    fake.stop()


@pytest.fixture
def start_gateway(
    db_url: str, mosquitto_url: str, make_settings: Callable[..., Any]
) -> Iterator[Callable[..., Gateway]]:
    gateways: list[Gateway] = []

    def start(central_url: str) -> Gateway:
        settings = make_settings(
            DATABASE_URL=db_url,
            MQTT_URL=mosquitto_url,
            CENTRAL_URL=central_url,
            CENTRAL_API_KEY=API_KEY,
        )
        gateways.append(Gateway(settings).start())
        return gateways[-1]

    yield start
    for gateway in gateways:
        gateway.stop()


def device_actors(gateway: Gateway) -> set[str]:
    return {a for a in supervisor_stats(gateway)["actors"] if a.startswith("device:")}


def test_sync_upserts_devices_and_removes_the_others(
    central: FakeCentral, start_gateway: Callable[..., Gateway], engine_for: Any, db_url: str
) -> None:
    engine = engine_for(db_url)
    register(engine, "H009")  # known locally, unknown to the central
    gateway = start_gateway(central.url)
    wait_for(
        lambda: device_actors(gateway) == {"device:H001", "device:H002"}, 10, "synced actors"
    )
    h001 = device_row(engine, "H001")
    assert (h001.central_id, h001.account_address) == (7, "0x" + "7".rjust(64, "0"))
    assert device_row(engine, "H009").status == "removed"

    central.set_devices([central_device(7, "H001")])
    core_ref(gateway, "central").tell(SyncNow())
    wait_for(lambda: device_actors(gateway) == {"device:H001"}, 10, "H002's actor stopped")
    assert device_row(engine, "H002").status == "removed"


def test_central_down_at_start_runs_on_cached_devices_then_syncs(
    central: FakeCentral, start_gateway: Callable[..., Gateway], engine_for: Any, db_url: str
) -> None:
    register(engine_for(db_url), "H001")
    central.down()
    gateway = start_gateway(central.url)
    wait_for(lambda: device_actors(gateway) == {"device:H001"}, 10, "the cached device's actor")
    assert core_ref(gateway, "central").ask(GetStats())["reachable"] is False
    central.up()
    wait_for(
        lambda: device_actors(gateway) == {"device:H001", "device:H002"},
        15,
        "the sync once the central is back",
    )


def test_handshake_activates_and_silence_deactivates(
    central: FakeCentral,
    start_gateway: Callable[..., Gateway],
    mosquitto_url: str,
    hub: str,
) -> None:
    gateway = start_gateway(central.url)
    wait_for(lambda: "device:H001" in device_actors(gateway), 10, "H001's actor")
    board = SimulatedBoard.start(mosquitto_url, hub, "H001", interval=0.2)
    wait_for(lambda: central.calls_to("activate_device"), 10, "activate_device")
    assert central.calls_to("activate_device") == [{"device_id": "H001"}]
    board.tell(PauseReadings(True))
    wait_for(lambda: central.calls_to("deactivate_device"), 15, "deactivate_device")
    assert central.calls_to("deactivate_device") == [{"device_id": "H001"}]
    board.stop()


def test_flaps_while_the_central_is_down_collapse_to_the_last_state(
    central: FakeCentral, start_gateway: Callable[..., Gateway]
) -> None:
    gateway = start_gateway(central.url)
    wait_for(lambda: "device:H001" in device_actors(gateway), 10, "H001's actor")
    api = core_ref(gateway, "central")
    central.down()
    for active in (True, False, True, False, True):
        api.tell(DeviceActivityChanged(DeviceId("H001"), active))
    api.tell(DeviceActivityChanged(DeviceId("H002"), True))
    wait_for(lambda: api.ask(GetStats())["pending_activations"] == 2, 5, "two pending")
    central.up()
    wait_for(lambda: api.ask(GetStats())["pending_activations"] == 0, 15, "drained")
    assert central.calls_to("activate_device") == [{"device_id": "H001"}, {"device_id": "H002"}]
    assert central.calls_to("deactivate_device") == []


def test_shutdown_tells_the_boards_and_the_central(
    central: FakeCentral,
    start_gateway: Callable[..., Gateway],
    mosquitto_url: str,
    hub: str,
) -> None:
    gateway = start_gateway(central.url)
    wait_for(lambda: "device:H001" in device_actors(gateway), 10, "H001's actor")
    board = SimulatedBoard.start(mosquitto_url, hub, "H001", interval=0.2)
    wait_for(lambda: board.ask(GetBoardState())["connected"], 10, "the handshake")
    gateway.stop()
    assert central.calls_to("shutdown") == [None]
    wait_for(
        lambda: board.ask(GetBoardState())["commands"][-1][2] == 0, 5, "instruction 0 (idle)"
    )
    board.stop()



def test_central_commands_reach_the_board_through_the_gateway(
    central: FakeCentral,
    start_gateway: Callable[..., Gateway],
    mosquitto_url: str,
    hub: str,
) -> None:
    """No UPLINK_MQTT_URL: the central's commands come over the boards' broker."""
    gateway = start_gateway(central.url)
    wait_for(lambda: "uplink" in actor_refs(gateway), 10, "the uplink connection")
    board = SimulatedBoard.start(mosquitto_url, hub, "H001", interval=0.2)
    wait_for(lambda: board.ask(GetBoardState())["connected"], 10, "the handshake")
    listener = make_listener(mosquitto_url, f"{hub}/power/7")
    was_on = board.ask(GetBoardState())["load_on"]

    def uplink_ready() -> bool:
        stats = actor_refs(gateway)["uplink"].ask(GetStats())
        return bool(stats["subscribed"]) and stats["routes"] == 2

    wait_for(uplink_ready, 10, "the uplink subscribed with both devices' routes")
    publish(mosquitto_url, f"{hub}/commands", {"device": 7, "instruction": 2})
    wait_for(lambda: board.ask(GetBoardState())["load_on"] != was_on, 6, "the toggle")
    publish(mosquitto_url, f"{hub}/commands", {"device": 7, "command": "stream"})
    wait_for(lambda: len(listener.messages) >= 2, 10, "two power messages")
    power = json.loads(listener.messages[-1])
    assert set(power) == {"timestamp", "power"}
    listener.stop()
    board.stop()


class make_listener:  # noqa: N801  (used like a function)
    """Collects the payloads published on one topic."""

    def __init__(self, broker_url: str, topic: str) -> None:
        self.messages: list[bytes] = []
        endpoint = BrokerEndpoint(url=broker_url, client_id=f"listen-{topic}", persistent=False)
        self.client = make_client(endpoint)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, 1)
        self.client.on_message = lambda _c, _u, m: self.messages.append(bytes(m.payload))
        self.client.connect(endpoint.host, endpoint.port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker_url: str, topic: str, body: dict[str, Any]) -> None:
    endpoint = BrokerEndpoint(url=broker_url, client_id=f"central-{topic}", persistent=False)
    client = make_client(endpoint)
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    client.publish(topic, json.dumps(body).encode(), qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
