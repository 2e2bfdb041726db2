"""Driving a DeviceActor in-process with messages, no broker and no database.

For the project's tests and for users testing their own estate logic:

    with DeviceHarness("H001", balance=5) as board:
        board.hello()
        board.reading(current=0.42, voltage=12.1, seq=1)
        board.advance(5); board.tick()
        assert board.commands() == ["5,1", "5,1"]

With token accounting the balance key goes to the `signer` peer, and its answer is
told back by hand:

    with DeviceHarness("H001", balance=5, policy=BoardPolicy(tokens=True)) as board:
        board.hello()
        board.reading(current=0.42, voltage=12.1, seq=1, update=True)
        assert board.signer_messages() == [RefreshBalance("H001")]
        board.balance(4, reason="update")
        assert board.commands() == ["5,1", "4,3"]
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pykka

from actors.base import EstateActor
from actors.device import DeviceActor
from actors.introspection import Introspection
from estate.board import DEFAULT_POLICY, DEFAULT_TIMING, BoardPolicy, BoardTiming
from estate.device_wire import BoardReading, Instruction, Topics, payload_digest
from estate.messages import (
    AckToken,
    BalanceChanged,
    BalanceRefreshFailed,
    BoardSaidHello,
    BoardSentReading,
    BoardStatusChanged,
    DeviceRecord,
    GetDeviceState,
    GetRecorded,
    GetStats,
    PeersChanged,
    PublishMessage,
    RecordCommand,
    RecordCutOff,
    RecordDeviceState,
    SendInstruction,
    StartPowerStream,
    StopPowerStream,
    StoreReading,
    Tick,
)
from estate.types import CentralId, DeviceId, DevicePk

__all__ = ["DeviceHarness", "ManualClock", "Recorder", "gateway_uplink"]

ASK_TIMEOUT = 5.0


class Recorder(EstateActor):
    """A stand-in peer that keeps every message it is told."""

    kind = "recorder"

    def __init__(self, name: str = "recorder") -> None:
        super().__init__(name)
        self.received: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, GetRecorded):
            return tuple(self.received)
        self.received.append(message)
        return None


class ManualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class DeviceHarness:
    """One DeviceActor wired to Recorder peers (`mqtt`, `db`, `uplink`, `signer`), with a
    manual clock."""

    def __init__(
        self,
        device_id: str = "H001",
        connection_type: str = "Consumer",
        balance: int = 0,
        hub: str = "estate",
        timing: BoardTiming = DEFAULT_TIMING,
        central_id: int | None = None,
        policy: BoardPolicy = DEFAULT_POLICY,
        load_cut_off: bool = False,
    ) -> None:
        self.record = DeviceRecord(
            pk=DevicePk(1),
            device_id=DeviceId(device_id),
            connection_type=connection_type,
            central_id=None if central_id is None else CentralId(central_id),
            balance=balance,
            load_cut_off=load_cut_off,
        )
        self.topics, self.timing, self.policy = Topics(hub), timing, policy
        self.clock = ManualClock()
        self._mid = 0
        self.mqtt: pykka.ActorRef[Any] | None = None
        self.db: pykka.ActorRef[Any] | None = None
        self.uplink: pykka.ActorRef[Any] | None = None
        self.signer: pykka.ActorRef[Any] | None = None
        self.device: pykka.ActorRef[Any] | None = None

    def __enter__(self) -> DeviceHarness:
        self.mqtt, self.db = Recorder.start("mqtt"), Recorder.start("db")
        self.uplink, self.signer = Recorder.start("uplink"), Recorder.start("signer")
        roles = {"mqtt": self.mqtt, "db": self.db, "uplink": self.uplink, "signer": self.signer}
        self.device = DeviceActor.start(
            self.record,
            self.topics,
            PeersChanged(roles),
            self.timing,
            clock=self.clock,
            policy=self.policy,
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        for ref in (self.device, self.mqtt, self.db, self.uplink, self.signer):
            if ref is not None and ref.is_alive():
                ref.stop()

    # -- what the board says ---------------------------------------------------------------

    def _ask(self, message: Any) -> Any:
        assert self.device is not None, "use DeviceHarness as a context manager"
        return self.device.ask(message, timeout=ASK_TIMEOUT)

    def _tell_and_wait(self, message: Any) -> None:
        assert self.device is not None, "use DeviceHarness as a context manager"
        self.device.tell(message)
        self._ask(GetDeviceState())  # the mailbox is in order: this returns after `message`

    def hello(self) -> None:
        self._tell_and_wait(BoardSaidHello(self.record.device_id, datetime.now(UTC)))

    def reading(
        self,
        current: float,
        voltage: float,
        seq: int | None = None,
        update: bool = False,
        req: bool | None = True,
        dup: bool = False,
        at: datetime | None = None,
    ) -> AckToken:
        """A telemetry message; returns the ack token the DbWriter would acknowledge."""
        self._mid += 1
        ack = AckToken(generation=1, mid=self._mid)
        reading = BoardReading(current=current, voltage=voltage, update=update, req=req, seq=seq)
        digest = payload_digest(repr(reading).encode())
        received_at = at or datetime.now(UTC)
        self._tell_and_wait(
            BoardSentReading(self.record.device_id, reading, digest, dup, received_at, ack)
        )
        return ack

    def status(self, online: bool) -> None:
        self._tell_and_wait(BoardStatusChanged(self.record.device_id, online, datetime.now(UTC)))

    def tick(self) -> None:
        self._tell_and_wait(Tick())

    def advance(self, seconds: float) -> None:
        """Let time pass (then call `tick` to let the actor notice)."""
        self.clock.advance(seconds)

    def instruct(self, instruction: int, reason: str = "test") -> None:
        self._tell_and_wait(SendInstruction(Instruction(instruction), reason))

    def start_stream(self) -> None:
        self._tell_and_wait(StartPowerStream())

    def stop_stream(self) -> None:
        self._tell_and_wait(StopPowerStream())

    # -- what the signer says --------------------------------------------------------------

    def balance(self, n: int, reason: str = "sync", tx_hash: str | None = None) -> None:
        """The owner's balance as the StarknetSigner read it on chain."""
        self._tell_and_wait(BalanceChanged(n, reason, tx_hash))

    def refresh_failed(self, reason: str = "test") -> None:
        self._tell_and_wait(BalanceRefreshFailed(reason))

    # -- what the actor did ----------------------------------------------------------------

    def uplink_published(self) -> list[PublishMessage]:
        """What the actor asked the uplink to publish (its power stream)."""
        assert self.uplink is not None
        return list(self.uplink.ask(GetRecorded(), timeout=ASK_TIMEOUT))

    def signer_messages(self) -> list[Any]:
        """What the actor told the signer (RefreshBalance)."""
        assert self.signer is not None
        return list(self.signer.ask(GetRecorded(), timeout=ASK_TIMEOUT))

    def state(self) -> dict[str, Any]:
        return self._ask(GetDeviceState())

    def published(self) -> list[PublishMessage]:
        assert self.mqtt is not None
        return list(self.mqtt.ask(GetRecorded(), timeout=ASK_TIMEOUT))

    def commands(self) -> list[str]:
        """The payloads sent to the board, as text without the newline."""
        return [m.payload.decode().strip() for m in self.published()]

    def _written(self, kind: type) -> list[Any]:
        assert self.db is not None
        return [m for m in self.db.ask(GetRecorded(), timeout=ASK_TIMEOUT) if isinstance(m, kind)]

    def stored(self) -> list[StoreReading]:
        return self._written(StoreReading)

    def recorded_commands(self) -> list[RecordCommand]:
        return self._written(RecordCommand)

    def recorded_states(self) -> list[RecordDeviceState]:
        return self._written(RecordDeviceState)

    def recorded_cut_offs(self) -> list[RecordCutOff]:
        return self._written(RecordCutOff)


# -- the uplink beside a running gateway --------------------------------------------------


def gateway_uplink(
    gateway: Any, devices: int = 0, timeout: float = 15.0
) -> pykka.ActorRef[Any]:
    """The gateway's own UplinkConnection, once `devices` device actors run and the
    uplink has its routes and its subscription to `{hub}/commands` (so that a command
    published now is not missed). The gateway starts and stops it (with CENTRAL_URL or
    UPLINK_MQTT_URL set)."""
    introspection = Introspection(gateway.supervisor, timeout=timeout)

    def ready() -> pykka.ActorRef[Any] | None:
        refs = {info.name: info.ref for info in introspection.actor_infos()}
        uplink = refs.get("uplink")
        if uplink is None or sum(n.startswith("device:") for n in refs) < devices:
            return None
        stats = uplink.ask(GetStats(), timeout=timeout)
        return uplink if stats["subscribed"] and stats["routes"] is not None else None

    return _wait(ready, timeout, "the gateway's uplink, subscribed, with its routes")


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return value
