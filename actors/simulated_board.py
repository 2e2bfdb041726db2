"""SimulatedBoard: behaves like the estate firmware over real MQTT, for tests and demos.

Idle, it says hello every `hello_interval` seconds; once a `<balance>,1` arrives it
sends a reading every `interval` seconds (with `seq` counting from 1); it obeys
instructions 0-3 and drops to idle after `idle_after` seconds without a command. Its
last will is a retained `offline` status. It keeps the `seq` of every reading the
broker acknowledged (`accepted`), so tests can check that none is lost.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import paho.mqtt.client as mqtt

from actors.base import EstateActor, Ticker, handles, tell_if_alive
from estate.device_wire import Instruction, TopicKind, Topics
from estate.messages import (
    GetBoardState,
    PauseReadings,
    PressBalanceKey,
    SetLoad,
    SimCommandArrived,
    SimConnected,
    SimPublishAcked,
    SimTick,
)
from estate.mqtt_client import BrokerEndpoint, make_client

__all__ = ["SimulatedBoard"]


class SimulatedBoard(EstateActor):
    """One simulated board with its own MQTT connection."""

    kind = "simboard"

    def __init__(
        self,
        broker_url: str,
        hub: str,
        device_id: str,
        interval: float = 1.0,
        hello_interval: float = 2.0,
        idle_after: float = 10.0,
        load_on: bool = True,
        protocol: str = "3.1.1",
        seed: int | None = None,
    ) -> None:
        super().__init__(f"simboard:{device_id}")
        self.device_id = device_id
        self.topics = Topics(hub)
        self.endpoint = BrokerEndpoint(
            url=broker_url, client_id=f"sim-{hub}-{device_id}", protocol=protocol, persistent=False
        )
        self.interval, self.hello_interval, self.idle_after = interval, hello_interval, idle_after
        self.random = random.Random(seed if seed is not None else device_id)
        self.load_on = load_on
        self.update = False
        self.paused = False
        self.connected = False
        self.mqtt_up = False
        self.balance: int | None = None
        self.seq = 0
        self.last_command = 0.0
        self.last_hello = 0.0
        self.last_reading = 0.0
        self.in_flight: dict[int, int] = {}
        self.early_acks: set[int] = set()
        self.accepted: list[int] = []
        self.commands: list[tuple[float, int, int]] = []
        self.client: mqtt.Client | None = None
        self.ticker: Ticker | None = None

    def setup(self) -> None:
        ref = self.actor_ref
        client = make_client(self.endpoint)
        status = self.topics.of(self.device_id, TopicKind.STATUS)
        client.will_set(status, b"offline", qos=1, retain=True)
        client.on_connect = lambda _c, _u, _f, reason, _p: (
            None if reason.is_failure else tell_if_alive(ref, SimConnected())
        )
        client.on_message = lambda _c, _u, m: tell_if_alive(
            ref, SimCommandArrived(bytes(m.payload), time.monotonic())
        )
        client.on_publish = lambda _c, _u, mid, _r, _p: tell_if_alive(ref, SimPublishAcked(mid))
        client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=10)
        client.loop_start()
        self.client = client
        self.ticker = Ticker(ref, SimTick(), min(self.interval, self.hello_interval) / 2).start()

    def teardown(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        if self.client is not None:
            self.client.disconnect()  # a clean disconnect: no last will
            self.client.loop_stop()
            self.client = None

    @handles(SimConnected)
    def _mqtt_up(self, _message: SimConnected) -> None:
        assert self.client is not None
        self.mqtt_up = True
        self.client.subscribe(self.topics.of(self.device_id, TopicKind.COMMAND), qos=1)
        self.client.publish(
            self.topics.of(self.device_id, TopicKind.STATUS), b"online", qos=1, retain=True
        )

    @handles(SimTick)
    def _tick(self, _message: SimTick) -> None:
        now = time.monotonic()
        if not self.mqtt_up or self.client is None:
            return
        if self.connected and now - self.last_command > self.idle_after:
            self.connected = False  # the gateway went quiet: back to idle
        if not self.connected:
            if now - self.last_hello >= self.hello_interval:
                self.last_hello = now
                payload = json.dumps({"device_id": self.device_id}).encode()
                self.client.publish(self.topics.of(self.device_id, TopicKind.HELLO), payload, 1)
            return
        if not self.paused and now - self.last_reading >= self.interval:
            self.last_reading = now
            self._send_reading()

    def _send_reading(self) -> None:
        assert self.client is not None
        self.seq += 1
        current = round(self.random.uniform(0.3, 0.6), 2) if self.load_on else 0.0
        reading = {
            "current": current,
            "voltage": round(self.random.uniform(11.9, 12.3), 2),
            "update": "true" if self.update else "false",
            "req": "true" if self.load_on else "false",
            "seq": self.seq,
        }
        info = self.client.publish(
            self.topics.of(self.device_id, TopicKind.TELEMETRY), json.dumps(reading).encode(), 1
        )
        if info.mid in self.early_acks:
            self.early_acks.discard(info.mid)
            self.accepted.append(self.seq)
        else:
            self.in_flight[info.mid] = self.seq

    @handles(SimPublishAcked)
    def _acked(self, message: SimPublishAcked) -> None:
        seq = self.in_flight.pop(message.mid, None)
        if seq is not None:
            self.accepted.append(seq)
        else:
            self.early_acks.add(message.mid)  # PUBACK before publish() returned

    @handles(SimCommandArrived)
    def _command(self, message: SimCommandArrived) -> None:
        try:
            balance_text, instruction_text = message.payload.decode().strip().split(",")
            balance, instruction = int(balance_text), Instruction(int(instruction_text))
        except ValueError:
            self.log.warning("%s: malformed command %r", self.device_id, message.payload)
            return
        self.commands.append((message.at, balance, int(instruction)))
        self.last_command, self.balance = message.at, balance
        if instruction is Instruction.DISCONNECT:
            self.connected = False
        elif instruction is Instruction.PERSIST:
            self.connected = True
        elif instruction is Instruction.TOGGLE:
            self.load_on = not self.load_on
        elif instruction is Instruction.BALANCE_UPDATED:
            self.update = False

    @handles(PressBalanceKey)
    def _press(self, _message: PressBalanceKey) -> None:
        self.update = True

    @handles(SetLoad)
    def _set_load(self, message: SetLoad) -> None:
        self.load_on = message.on

    @handles(PauseReadings)
    def _pause(self, message: PauseReadings) -> None:
        self.paused = message.paused

    @handles(GetBoardState)
    def _state(self, _message: GetBoardState) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "mqtt_up": self.mqtt_up,
            "connected": self.connected,
            "balance": self.balance,
            "load_on": self.load_on,
            "update": self.update,
            "seq": self.seq,
            "accepted": tuple(self.accepted),
            "in_flight": len(self.in_flight),
            "commands": tuple(self.commands),
        }
