"""UplinkConnection: owns the paho client to the central's broker (PROTOCOL section 3).

It subscribes to `{hub}/commands`, validates each command and routes it by the
device's CENTRAL id to its DeviceActor: an instruction (0-3) as
`SendInstruction(..., reason="central")`, which the actor sends to its board at
once, and `stream` / `stop` as StartPowerStream / StopPowerStream. It publishes
what the device actors ask it to (their `{hub}/power/{id}` stream).

The session is a clean one: commands the central sends while the gateway is away
are not delivered later (a toggle replayed hours late would switch a load nobody
meant to switch), and the subscription is renewed on every (re)connection.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import paho.mqtt.client as mqtt
import pykka

from actors.base import handles, tell_if_alive
from actors.broker_client import BrokerClientActor
from estate.config import Settings
from estate.logs import RateLimitedLog
from estate.messages import (
    CentralRoutesChanged,
    GetStats,
    MqttConnected,
    MqttMessageReceived,
    MqttSubscribed,
    PublishMessage,
    SendInstruction,
    StartPowerStream,
    StopPowerStream,
)
from estate.mqtt_client import BrokerEndpoint
from estate.types import CentralId
from estate.uplink_wire import (
    BadCommand,
    CentralCommand,
    InstructDevice,
    StreamAction,
    UplinkTopics,
    parse_command,
)

__all__ = ["UplinkConnection", "uplink_endpoint"]

COMMAND_QOS = 1
"""QoS of the subscription to `{hub}/commands`: a command is not lost between brokers."""

MAX_HELD = 1000
"""Commands held for a device actor that is restarting (or before the routes are known)."""

def uplink_endpoint(settings: Settings, boards_url: str, url: str | None = None) -> BrokerEndpoint:
    """The gateway's session on the central's broker.

    `url` (default UPLINK_MQTT_URL) or, when neither is set, the boards' broker with
    the boards' TLS files. Its own client id (`<MQTT_CLIENT_ID>-uplink`), so that it
    can share a broker with the boards' connection; MQTT 3.1.1, which every cloud
    broker speaks (no MQTT 5 feature is needed here); a clean session.
    """
    uplink_url = url or settings.uplink_mqtt_url
    if uplink_url is None:
        uplink_url = boards_url
        tls = (
            settings.mqtt_ca_file,
            settings.mqtt_cert_file,
            settings.mqtt_key_file,
            settings.mqtt_tls_insecure,
        )
    else:
        tls = (
            settings.uplink_mqtt_ca_file,
            settings.uplink_mqtt_cert_file,
            settings.uplink_mqtt_key_file,
            settings.uplink_mqtt_tls_insecure,
        )
    ca_file, cert_file, key_file, insecure = tls
    return BrokerEndpoint(
        url=uplink_url,
        client_id=f"{settings.client_id}-uplink",
        protocol="3.1.1",
        keepalive=settings.mqtt_keepalive,
        persistent=False,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        tls_insecure=insecure,
    )


class UplinkConnection(BrokerClientActor):
    """The central's broker: commands in, routed by central id; power streams out.

    Bad input (not JSON, not an object, unknown command, bad value, unknown device)
    is counted by kind and logged at most once per 10 s per kind; it never stops the
    actor.
    """

    kind = "uplink"

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        hub: str,
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "uplink",
    ) -> None:
        super().__init__(endpoint, name, supervisor)
        self.topics = UplinkTopics(hub)
        self.routes: dict[CentralId, pykka.ActorRef[Any]] | None = None  # None: not yet known
        self.held: deque[tuple[CentralId, Any]] = deque(maxlen=MAX_HELD)
        self.subscribing = False
        self.subscribed = False  # the broker granted `{hub}/commands` on this connection
        self.rejected: Counter[str] = Counter()
        self.bad_log = RateLimitedLog(self.log)

    # -- connection state ------------------------------------------------------------------

    @handles(MqttConnected)
    def _connected(self, event: MqttConnected) -> None:
        self.connected, self.generation = True, event.generation
        self.subscribing = self.subscribed = False
        self.counts["connects"] += 1
        self.log.info("connected to %s", self.broker)
        self._subscribe()

    def _subscribe(self) -> None:
        """Subscribe once connected and the routes are known, so no command is refused."""
        if self.client is None or not self.connected or self.routes is None or self.subscribing:
            return
        self.client.subscribe(self.topics.commands, qos=COMMAND_QOS)
        self.subscribing = True

    @handles(MqttSubscribed)
    def _subscribed(self, event: MqttSubscribed) -> None:
        if event.generation != self.generation:
            return  # an answer on a connection that is gone
        self.subscribed = event.granted
        if event.granted:
            self.log.info("subscribed to %s", self.topics.commands)
        else:
            self.counts["subscribe_refused"] += 1
            self.log.error(
                "%s refused the subscription to %s (not authorised?)",
                self.broker,
                self.topics.commands,
            )

    def lost_connection(self) -> None:
        self.subscribing = self.subscribed = False

    # -- commands --------------------------------------------------------------------------

    @handles(MqttMessageReceived)
    def _received(self, message: MqttMessageReceived) -> None:
        self.counts["received"] += 1
        try:
            command = self._command(message)
        except BadCommand as bad:
            self.rejected[bad.kind] += 1
            self.bad_log.warning(bad.kind, "rejected central command: %s", bad)
            return
        if isinstance(command, InstructDevice):
            event: Any = SendInstruction(command.instruction, reason="central")
            self.counts["instructions"] += 1
        elif command.command is StreamAction.STREAM:
            event = StartPowerStream()
            self.counts["stream_starts"] += 1
        else:
            event = StopPowerStream()
            self.counts["stream_stops"] += 1
        self._route(command.device, event)

    def _command(self, message: MqttMessageReceived) -> CentralCommand:
        """The valid command of a known device; BadCommand otherwise."""
        if message.topic != self.topics.commands:
            raise BadCommand("bad_topic", f"not subscribed to {message.topic!r}")
        command = parse_command(message.payload)
        if self.routes is None or command.device not in self.routes:
            raise BadCommand("unknown_device", f"no device has central id {command.device}")
        return command

    def _route(self, central_id: CentralId, event: Any) -> None:
        assert self.routes is not None
        if not tell_if_alive(self.routes[central_id], event):
            self.counts["held_for_restart"] += 1
            self.held.append((central_id, event))

    @handles(CentralRoutesChanged)
    def _routes_changed(self, message: CentralRoutesChanged) -> None:
        self.routes = dict(message.routes)
        self._subscribe()
        held, self.held = list(self.held), deque(maxlen=MAX_HELD)
        for central_id, event in held:
            if central_id in self.routes:
                self._route(central_id, event)
            else:
                self.counts["dropped_device_gone"] += 1

    # -- outbound --------------------------------------------------------------------------

    @handles(PublishMessage)
    def _publish(self, message: PublishMessage) -> None:
        if self.client is None or not self.connected:
            self.counts["publish_dropped"] += 1  # a live value: worthless once late
            return
        info = self.client.publish(
            message.topic, message.payload, qos=message.qos, retain=message.retain
        )
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.counts["published"] += 1
        else:
            self.counts["publish_dropped"] += 1

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "subscribed": self.subscribed,
            "broker": self.broker,
            "routes": None if self.routes is None else len(self.routes),
            **self.counts,
            "rejected": dict(self.rejected),
            "held": len(self.held),
        }
