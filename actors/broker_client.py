"""The base of the actors that own one paho client (the boards' broker, the uplink).

`PahoBridge` is paho's side: its callbacks run on paho's network thread and only
turn paho's events into our messages and tell the actor. `BrokerClientActor` owns
the client: it connects in the background (paho retries with backoff), logs a
refused connection or a lost one, and leaves subscribing and routing to subclasses.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import pykka

from actors.base import EstateActor, handles, tell_if_alive
from estate.config import mask_url
from estate.messages import (
    AckToken,
    MqttConnected,
    MqttDisconnected,
    MqttMessageReceived,
    MqttSubscribed,
)
from estate.mqtt_client import BrokerEndpoint, connect_async, make_client

__all__ = ["REFUSED", "BrokerClientActor", "PahoBridge"]

REFUSED = "refused: "
"""Prefix of the reason of a CONNACK that refused us (bad credentials, not authorised...)."""


class PahoBridge:
    """Paho's callbacks: convert to our messages and tell the actor, nothing else.

    `generation` changes on every (re)connection, so acknowledgements meant for an
    earlier connection are never sent on a later one. With `manual_ack`, each QoS 1
    message carries the token to acknowledge it with; otherwise paho acknowledges on
    receipt.
    """

    def __init__(self, ref: pykka.ActorRef[Any], manual_ack: bool) -> None:
        self.ref, self.manual_ack = ref, manual_ack
        self.generation = 0

    def on_connect(self, _client: Any, _data: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            tell_if_alive(self.ref, MqttDisconnected(self.generation, f"{REFUSED}{reason}"))
            return
        self.generation = time.monotonic_ns()
        tell_if_alive(self.ref, MqttConnected(self.generation, bool(flags.session_present)))

    def on_disconnect(self, _client: Any, _data: Any, _flags: Any, reason: Any, _p: Any) -> None:
        tell_if_alive(self.ref, MqttDisconnected(self.generation, str(reason)))

    def on_subscribe(self, _client: Any, _data: Any, _mid: int, reasons: Any, _p: Any) -> None:
        granted = all(not reason.is_failure for reason in reasons)
        tell_if_alive(self.ref, MqttSubscribed(self.generation, granted))

    def on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        wants_ack = self.manual_ack and message.qos > 0
        tell_if_alive(
            self.ref,
            MqttMessageReceived(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                dup=bool(message.dup),
                received_at=datetime.now(UTC),
                ack=AckToken(self.generation, message.mid) if wants_ack else None,
            ),
        )


class BrokerClientActor(EstateActor):
    """Owns one paho client to `endpoint`; subclasses subscribe and handle messages."""

    manual_ack = False

    def __init__(
        self, endpoint: BrokerEndpoint, name: str, supervisor: pykka.ActorRef[Any] | None
    ) -> None:
        super().__init__(name, supervisor)
        self.endpoint = endpoint
        self.broker = mask_url(endpoint.url)  # for logs and stats: never the password
        self.client: mqtt.Client | None = None
        self.connected = False
        self.generation = -1
        self.counts: Counter[str] = Counter()

    def setup(self) -> None:
        bridge = PahoBridge(self.actor_ref, self.manual_ack)
        client = make_client(self.endpoint, manual_ack=self.manual_ack)
        client.on_connect = bridge.on_connect
        client.on_disconnect = bridge.on_disconnect
        client.on_subscribe = bridge.on_subscribe
        client.on_message = bridge.on_message
        connect_async(client, self.endpoint)
        client.loop_start()
        self.client = client
        self.log.info("connecting to %s as %s", self.broker, self.endpoint.client_id)

    def teardown(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    @handles(MqttDisconnected)
    def _disconnected(self, event: MqttDisconnected) -> None:
        if event.reason.startswith(REFUSED):
            # paho retries with backoff (1 s doubling to 30 s): one line per attempt at most
            self.counts["refused"] += 1
            self.log.warning(
                "connection to %s as %s %s; retrying",
                self.broker,
                self.endpoint.client_id,
                event.reason,
            )
        elif self.connected:
            self.log.warning("disconnected from %s: %s; reconnecting", self.broker, event.reason)
        self.connected = False
        self.lost_connection()

    def lost_connection(self) -> None:
        """What a subclass forgets when the connection goes (its subscriptions...)."""

    @handles(MqttSubscribed)
    def _subscribed(self, event: MqttSubscribed) -> None:
        """The broker answered a subscription (subclasses that care override this)."""
