"""MqttConnection: owns the paho client to the boards' broker, its session and its acks."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import pykka

from actors.base import handles, tell_if_alive
from actors.broker_client import BrokerClientActor
from estate.device_wire import (
    BadInput,
    TopicKind,
    Topics,
    parse_reading,
    parse_status,
    payload_digest,
)
from estate.logs import RateLimitedLog
from estate.messages import (
    AckMessages,
    AckToken,
    BoardSaidHello,
    BoardSentReading,
    BoardStatusChanged,
    GetStats,
    MqttConnected,
    MqttMessageReceived,
    PublishMessage,
    Reconnect,
    RoutesChanged,
)
from estate.mqtt_client import BrokerEndpoint
from estate.types import DeviceId

__all__ = ["MqttConnection"]



class MqttConnection(BrokerClientActor):
    """The boards' broker: subscribes to every board's topics, validates and routes them.

    Telemetry is acknowledged only when the DbWriter says its transaction committed;
    everything else (hello, status, bad input) is acknowledged once handled.
    """

    kind = "mqtt"
    manual_ack = True

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        topics: Topics,
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "mqtt",
    ) -> None:
        super().__init__(endpoint, name, supervisor)
        self.topics = topics
        self.routes: dict[DeviceId, pykka.ActorRef[Any]] | None = None  # None: not yet known
        # Held messages are unacknowledged, so the broker's in-flight window bounds them.
        # Readings for a device whose actor is restarting:
        self.unrouted: deque[tuple[DeviceId, Any]] = deque()
        # a resumed session delivers before the devices are loaded: hold, do not reject
        self.early: deque[MqttMessageReceived] = deque()
        self.rejected: Counter[str] = Counter()
        self.bad_log = RateLimitedLog(self.log)

    # -- connection state ------------------------------------------------------------------

    @handles(MqttConnected)
    def _connected(self, event: MqttConnected) -> None:
        self.connected, self.generation = True, event.generation
        self._subscribe()
        self.counts["connects"] += 1
        self.log.info(
            "connected to %s (session %s)",
            self.broker,
            "resumed" if event.session_present else "new",
        )

    def _subscribe(self) -> None:
        """Subscribe once connected and the known devices are loaded, so none is rejected."""
        if self.client is not None and self.connected and self.routes is not None:
            self.client.subscribe([(topic, 1) for topic in self.topics.inbound_filters])

    @handles(Reconnect)
    def _reconnect(self, _message: Reconnect) -> None:
        """Drop and re-open the connection, so the broker redelivers what is unacknowledged."""
        if self.client is not None:
            # a fresh client: paho's reconnect() would race its network thread, and no
            # acknowledgement meant for the old connection can reach the new one
            self.log.warning("reconnecting to have unacknowledged messages redelivered")
            self.connected = False
            self.teardown()
            self.setup()

    # -- inbound ---------------------------------------------------------------------------

    @handles(MqttMessageReceived)
    def _received(self, message: MqttMessageReceived) -> None:
        if self.routes is None:
            self.early.append(message)
            return
        self.counts["received"] += 1
        try:
            device_id, kind = self.topics.parse(message.topic)
            event = self._event(device_id, kind, message)
        except BadInput as bad:
            self.rejected[bad.kind] += 1
            self.bad_log.warning(bad.kind, "rejected %s: %s", message.topic, bad.detail)
            self._ack(message.ack)
            return
        self._route(device_id, event)
        if not isinstance(event, BoardSentReading):
            self._ack(message.ack)

    def _event(self, device_id: DeviceId, kind: TopicKind, message: MqttMessageReceived) -> Any:
        """The message for the device's actor; BadInput if the device or payload is wrong."""
        if self.routes is None or device_id not in self.routes:
            raise BadInput("unknown_device", f"{device_id!r} is not a known device")
        if kind is TopicKind.HELLO:
            return BoardSaidHello(device_id, message.received_at)
        if kind is TopicKind.STATUS:
            return BoardStatusChanged(device_id, parse_status(message.payload), message.received_at)
        return BoardSentReading(
            device_id=device_id,
            reading=parse_reading(message.payload),
            digest=payload_digest(message.payload),
            dup=message.dup,
            received_at=message.received_at,
            ack=message.ack,
        )

    def _route(self, device_id: DeviceId, event: Any) -> None:
        assert self.routes is not None
        if not tell_if_alive(self.routes[device_id], event):
            self.counts["held_for_restart"] += 1
            self.unrouted.append((device_id, event))

    @handles(RoutesChanged)
    def _routes_changed(self, message: RoutesChanged) -> None:
        first = self.routes is None
        self.routes = dict(message.routes)
        if first:
            self._subscribe()
            early, self.early = list(self.early), deque()
            for received in early:
                self._received(received)
        held, self.unrouted = list(self.unrouted), deque()
        for device_id, event in held:
            if device_id in self.routes:
                self._route(device_id, event)
            elif isinstance(event, BoardSentReading) and event.ack is not None:
                self._ack(event.ack)  # the device was removed: nothing will store it

    # -- outbound --------------------------------------------------------------------------

    @handles(PublishMessage)
    def _publish(self, message: PublishMessage) -> None:
        assert self.client is not None
        self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        self.counts["published"] += 1

    @handles(AckMessages)
    def _ack_committed(self, message: AckMessages) -> None:
        for token in message.tokens:
            self._ack(token)

    def _ack(self, token: AckToken | None) -> None:
        if token is None or self.client is None:
            return
        if token.generation != self.generation or not self.connected:
            self.counts["acks_dropped"] += 1  # that connection is gone: the broker redelivers
            return
        self.client.ack(token.mid, 1)
        self.counts["acked"] += 1

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "broker": self.broker,
            **self.counts,
            "rejected": dict(self.rejected),
            "unrouted": len(self.unrouted),
        }
