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
    DEFAULT_TIMING,
    Board,
    BoardTiming,
    Effect,
    SendCommand,
    StateChanged,
    Store,
)
from estate.device_wire import TopicKind, Topics, format_command
from estate.messages import (
    AckToken,
    BoardSaidHello,
    BoardSentReading,
    BoardStatusChanged,
    DeviceRecord,
    GetDeviceState,
    PeersChanged,
    PublishMessage,
    RecordCommand,
    RecordDeviceState,
    SendInstruction,
    Tick,
)

__all__ = ["DeviceActor"]


class DeviceActor(EstateActor):
    """Owns one board's state; never blocks. Talks to the `mqtt` and `db` peers by tell."""

    kind = "device"

    def __init__(
        self,
        record: DeviceRecord,
        topics: Topics,
        peers: PeersChanged,
        timing: BoardTiming = DEFAULT_TIMING,
        supervisor: pykka.ActorRef[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(f"device:{record.device_id}", supervisor)
        self.board = Board(record, timing)
        self.command_topic = topics.of(record.device_id, TopicKind.COMMAND)
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
