"""Helpers shared by the integration and end-to-end tests (no fixtures here)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from sqlalchemy import Engine, func, select

from estate.db.models import CommandRow, DeviceRow, ReadingRow
from estate.db.store import register_device
from estate.device_wire import TopicKind, Topics
from estate.fake_starknet import FakeStarknetNode, make_test_account
from estate.messages import GetActors, GetBoardState, GetStats, PauseReadings
from estate.mqtt_client import BrokerEndpoint

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- database ---------------------------------------------------------------------------


def register(engine: Engine, *device_ids: str, connection_type: str = "Consumer") -> dict[str, int]:
    """Register the boards; their primary keys by device id."""
    with engine.begin() as conn:
        return {d: int(register_device(conn, d, connection_type)) for d in device_ids}


def reading_rows(engine: Engine, device_pk: int | None = None) -> list[Any]:
    query = select(ReadingRow.__table__).order_by(ReadingRow.id)
    if device_pk is not None:
        query = query.where(ReadingRow.device_pk == device_pk)
    with engine.connect() as conn:
        return list(conn.execute(query))


def stored_seqs(engine: Engine) -> dict[int, list[int]]:
    """Every stored reading's seq by device pk (repeats kept, so duplicates show)."""
    seqs: dict[int, list[int]] = {}
    with engine.connect() as conn:
        for pk, seq in conn.execute(select(ReadingRow.device_pk, ReadingRow.seq)):
            seqs.setdefault(pk, []).append(seq)
    return seqs


def reading_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(ReadingRow)).scalar_one())


def device_row(engine: Engine, device_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(DeviceRow.__table__).where(DeviceRow.device_id == device_id)
        ).one_or_none()


def command_rows(engine: Engine, device_pk: int) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(CommandRow.__table__)
                .where(CommandRow.device_pk == device_pk)
                .order_by(CommandRow.id)
            )
        )


# -- MQTT -------------------------------------------------------------------------------


class RawClient:
    """A plain paho client (MQTT 3.1.1, clean session) for publishing what boards never would."""

    def __init__(self, broker_url: str, client_id: str | None = None, **will: Any) -> None:
        endpoint = BrokerEndpoint(url=broker_url, client_id="x")
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"raw-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if will:
            self.client.will_set(**will)
        self.connected = threading.Event()
        self.client.on_connect = lambda *_args: self.connected.set()
        self.client.connect(endpoint.host, endpoint.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise AssertionError(f"raw MQTT client could not connect to {broker_url}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"broker did not accept a publish to {topic}"

    def close(self) -> None:
        """A clean disconnect (no last will)."""
        self.client.disconnect()
        self.client.loop_stop()

    def die(self) -> None:
        """Drop the connection without DISCONNECT, as a board losing power: the will goes out."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def clear_retained(broker_url: str, hub: str, device_ids: Iterable[str]) -> None:
    """Remove the retained status messages the test's boards left on the broker."""
    topics = Topics(hub)
    raw = RawClient(broker_url)
    try:
        for device_id in device_ids:
            raw.publish(topics.of(device_id, TopicKind.STATUS), b"", retain=True)
    finally:
        raw.close()


# -- the gateway's actors ---------------------------------------------------------------


def supervisor_stats(gateway: Any) -> dict[str, Any]:
    return gateway.supervisor.ask(GetStats(), timeout=10)


def actor_refs(gateway: Any) -> dict[str, Any]:
    """Every actor the gateway's supervisor runs, by name (`db`, `device:H001`, ...)."""
    return {info.name: info.ref for info in gateway.supervisor.ask(GetActors(), timeout=10)}


def core_ref(gateway: Any, role: str) -> Any:
    return actor_refs(gateway)[role]


def mqtt_stats(gateway: Any) -> dict[str, Any]:
    return core_ref(gateway, "mqtt").ask(GetStats(), timeout=10)


def device_ref(gateway: Any, device_id: str) -> Any:
    return actor_refs(gateway).get(f"device:{device_id}")


# -- simulated boards -------------------------------------------------------------------


def board_state(ref: Any) -> dict[str, Any]:
    """A simulated board's state, asked of its actor."""
    return ref.ask(GetBoardState(), timeout=10)


def quiesce(boards: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Pause every board and wait for its last PUBACK: seqs the broker accepted, by device."""
    for ref in boards.values():
        ref.tell(PauseReadings(True))
    time.sleep(0.2)  # a reading already being sent
    wait_for(
        lambda: all(board_state(ref)["in_flight"] == 0 for ref in boards.values()),
        10,
        "the boards' last PUBACKs",
    )
    return {device_id: board_state(ref)["accepted"] for device_id, ref in boards.items()}


# -- the fake Starknet node ---------------------------------------------------------------

GATEWAY_ACCOUNT = make_test_account(1)
"""(address, private key, public key) of the gateway's account in the tests."""


def starknet_node(block_time: float = 0.05) -> FakeStarknetNode:
    """A started fake node where the gateway's account exists and may consume SCT."""
    address, _key, public = GATEWAY_ACCOUNT
    node = FakeStarknetNode(block_time=block_time).start()
    node.add_account(address, public)
    node.authorise(address)
    return node


def starknet_env(node: FakeStarknetNode) -> dict[str, str]:
    """The settings that point the gateway's token accounting at `node`."""
    address, key, _public = GATEWAY_ACCOUNT
    return {
        "STARKNET_RPC_URL": node.url,
        "STARKNET_ACCOUNT_ADDRESS": hex(address),
        "STARKNET_PRIVATE_KEY": hex(key),
        "SCT_CONTRACT_ADDRESS": hex(node.sct_address),
    }
