"""DeviceActor: one per known board; a thin shell around `estate.board.Board`."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import pykka

from actors.base import EstateActor, handles
from estate.board import (
    DEFAULT_POLICY,
    DEFAULT_TIMING,
    ActivityChanged,
    Board,
    BoardPolicy,
    BoardTiming,
    CutOffChanged,
    Effect,
    PublishPower,
    Repeat,
    RequestBalance,
    SendCommand,
    StateChanged,
    Store,
    StreamChanged,
    StreamRefused,
)
from estate.device_wire import TopicKind, Topics, format_command
from estate.messages import (
    AckMessages,
    AckToken,
    BalanceChanged,
    BalanceRefreshFailed,
    BoardSaidHello,
    BoardSentReading,
    BoardStatusChanged,
    DeviceActivityChanged,
    DeviceRecord,
    GetDeviceState,
    PeersChanged,
    PublishMessage,
    RecordCommand,
    RecordCutOff,
    RecordDeviceState,
    RefreshBalance,
    SendInstruction,
    StartPowerStream,
    StopPowerStream,
    Tick,
)
from estate.uplink_wire import UplinkTopics, format_power

__all__ = ["DeviceActor"]

POWER_QOS = 0
"""QoS of the live power stream to the central.

Each value is superseded by the next one 3 s later: a lost value costs nothing, while
QoS 1 would have paho queue stale values during an uplink outage and deliver them late
in a burst, and would double the packets for a value nobody needs twice.
"""


class DeviceActor(EstateActor):
    """Owns one board's state; never blocks. Talks to the `mqtt` and `db` peers by tell.

    While the central's live power stream is on (StartPowerStream, from the uplink), it
    publishes the board's latest power to `{hub}/power/{central_id}` about every 3 s
    through the `uplink` peer, driven by the 1 s Tick. StopPowerStream ends the stream,
    and so does the board going offline (silence or its `offline` status); a restart of
    this actor ends it too (the central asks again). A board without a central id cannot
    stream: the request is logged and ignored.

    With token accounting (`policy.tokens`) it asks the `signer` peer for the balance
    when the owner presses the balance key (RefreshBalance), tells the board each
    BalanceChanged, and records a prepaid cut-off in the `db` peer (RecordCutOff).
    """

    kind = "device"

    def __init__(
        self,
        record: DeviceRecord,
        topics: Topics,
        peers: PeersChanged,
        timing: BoardTiming = DEFAULT_TIMING,
        supervisor: pykka.ActorRef[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy: BoardPolicy = DEFAULT_POLICY,
    ) -> None:
        super().__init__(f"device:{record.device_id}", supervisor)
        self.board = Board(record, timing, policy)
        self.command_topic = topics.of(record.device_id, TopicKind.COMMAND)
        central_id, uplink_topics = record.central_id, UplinkTopics(topics.hub)
        self.power_topic = None if central_id is None else uplink_topics.power(central_id)
        self.peers = dict(peers.peers)
        self.clock = clock

    @handles(BoardSaidHello)
    def _hello(self, _message: BoardSaidHello) -> None:
        self._apply(self.board.hello(self.clock()))

    @handles(BoardSentReading)
    def _reading(self, message: BoardSentReading) -> None:
        effects = self.board.reading(
            message.reading, message.digest, message.dup, message.received_at, self.clock()
        )
        self._apply(effects, message.ack)

    @handles(BoardStatusChanged)
    def _status(self, message: BoardStatusChanged) -> None:
        self._apply(self.board.status(message.online, self.clock()))

    @handles(Tick)
    def _tick(self, _message: Tick) -> None:
        self._apply(self.board.tick(self.clock()))

    @handles(SendInstruction)
    def _instruct(self, message: SendInstruction) -> None:
        self._apply(self.board.instruct(message.instruction, message.reason, self.clock()))

    @handles(StartPowerStream)
    def _start_stream(self, _message: StartPowerStream) -> None:
        self._apply(self.board.start_stream(self.clock()))

    @handles(StopPowerStream)
    def _stop_stream(self, _message: StopPowerStream) -> None:
        self._apply(self.board.stop_stream())

    @handles(BalanceChanged)
    def _balance_changed(self, message: BalanceChanged) -> None:
        self._apply(self.board.balance_changed(message.balance, message.reason, self.clock()))

    @handles(BalanceRefreshFailed)
    def _balance_refresh_failed(self, message: BalanceRefreshFailed) -> None:
        self.log.warning(
            "%s: balance refresh failed: %s", self.board.record.device_id, message.reason
        )
        self._apply(self.board.balance_refresh_failed(self.clock()))

    @handles(GetDeviceState)
    def _state(self, _message: GetDeviceState) -> dict[str, object]:
        return self.board.snapshot()

    def _apply(self, effects: list[Effect], ack: AckToken | None = None) -> None:
        now = datetime.now(UTC)
        pk = self.board.record.pk
        for effect in effects:
            if isinstance(effect, Store):
                self._tell("db", attrs.evolve(effect.reading, ack=ack))
            elif isinstance(effect, SendCommand):
                payload = format_command(effect.balance, effect.instruction)
                self._tell("mqtt", PublishMessage(self.command_topic, payload))
                if effect.reason != "keepalive":
                    self._tell(
                        "db",
                        RecordCommand(pk, now, effect.balance, effect.instruction, effect.reason),
                    )
            elif isinstance(effect, StateChanged):
                self.log.info("%s is %s", self.board.record.device_id, effect.status)
                self._tell("db", RecordDeviceState(pk, effect.status, effect.load_on, now))
            elif isinstance(effect, Repeat) and ack is not None:
                self._tell("mqtt", AckMessages((ack,)))
            elif isinstance(effect, ActivityChanged) and "central" in self.peers:
                self._tell(
                    "central", DeviceActivityChanged(self.board.record.device_id, effect.active)
                )
            elif isinstance(effect, RequestBalance):
                self._request_balance()
            elif isinstance(effect, CutOffChanged):
                self.log.info(
                    "%s: load %s",
                    self.board.record.device_id,
                    "cut off (no tokens)" if effect.cut_off else "no longer cut off",
                )
                self._tell("db", RecordCutOff(pk, effect.cut_off))
            elif isinstance(effect, PublishPower):
                self._publish_power(effect)
            elif isinstance(effect, StreamChanged):
                self.log.info(
                    "%s: power stream %s (%s)",
                    self.board.record.device_id,
                    "on" if effect.streaming else "off",
                    effect.reason,
                )
            elif isinstance(effect, StreamRefused):
                self.log.warning(
                    "%s: power stream not started: %s", self.board.record.device_id, effect.reason
                )

    def _request_balance(self) -> None:
        if "signer" not in self.peers:
            self.log.warning(
                "%s: no signer to refresh the balance; answering the cached one", self.name
            )
            self._apply(self.board.balance_refresh_failed(self.clock()))
            return
        self._tell("signer", RefreshBalance(self.board.record.device_id))

    def _publish_power(self, effect: PublishPower) -> None:
        if self.power_topic is None or "uplink" not in self.peers:
            # no uplink connection (yet): end the stream rather than fail the board
            self._apply(self.board.stop_stream("no uplink connection"))
            return
        payload = format_power(effect.power, effect.at)
        self._tell("uplink", PublishMessage(self.power_topic, payload, qos=POWER_QOS))

    def _tell(self, role: str, message: Any) -> None:
        ref = self.peers.get(role)
        if ref is None:
            raise LookupError(f"{self.name} has no {role!r} peer")
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            self.log.warning(
                "%s: %s is restarting; %s lost", self.name, role, type(message).__name__
            )
