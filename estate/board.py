"""One board's state machine, as plain logic: inputs in, effects out.

The DeviceActor feeds it what the board said and the passing of time, and carries
out the effects it returns (publish a command, store a reading, record a state).
"""

from __future__ import annotations

from datetime import datetime

import attrs

from estate.device_wire import BoardReading, Instruction
from estate.energy import EnergyIntegrator
from estate.messages import DeviceRecord, StoreReading

__all__ = [
    "DEFAULT_TIMING",
    "Board",
    "BoardTiming",
    "Effect",
    "SendCommand",
    "StateChanged",
    "Store",
]

UPDATE_ANSWER_INTERVAL = 2.0
"""Seconds between two answers to a board whose `update` flag stays set."""


@attrs.frozen
class BoardTiming:
    keepalive_interval: float = 5.0
    offline_after: float = 10.0
    integration_max_gap: float = 5.0
    tick: float = 1.0
    """How often `tick` is called; keep-alives go out early enough not to miss a period."""


@attrs.frozen
class SendCommand:
    instruction: Instruction
    balance: int
    reason: str


@attrs.frozen
class Store:
    reading: StoreReading


@attrs.frozen
class StateChanged:
    status: str
    load_on: bool | None


Effect = SendCommand | Store | StateChanged

DEFAULT_TIMING = BoardTiming()


@attrs.define
class Board:
    """A board's connection, readings, energy and balance. Times: `now` is monotonic seconds."""

    record: DeviceRecord
    timing: BoardTiming = DEFAULT_TIMING
    online: bool = False
    connected: bool = False
    balance: int = 0
    load_on: bool | None = None
    boot: int = 0
    last_seq: int | None = None
    energy_total_wh: float = 0.0
    last_reading: BoardReading | None = None
    last_reading_at: datetime | None = None
    last_heard: float | None = None
    last_command: float | None = None
    last_update_answer: float | None = None
    readings: int = 0
    duplicates: int = 0
    commands: int = 0
    _energy: EnergyIntegrator = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        record = self.record
        self.balance, self.load_on = record.balance, record.load_on
        self.boot, self.last_seq = record.boot, record.last_seq
        self.energy_total_wh = record.energy_total_wh
        self._energy = EnergyIntegrator(self.timing.integration_max_gap)
        if record.last_reading_at is not None:
            self._energy.add(record.last_reading_at, record.last_power)
            self.last_reading_at = record.last_reading_at

    # -- inputs ----------------------------------------------------------------------------

    def hello(self, now: float) -> list[Effect]:
        """The board is idle and asks to be connected: answer `<balance>,1`."""
        effects = self._heard(now)
        self.connected = True
        return [*effects, self._command(Instruction.PERSIST, "handshake", now)]

    def reading(
        self, reading: BoardReading, digest: str, dup: bool, received_at: datetime, now: float
    ) -> list[Effect]:
        """A telemetry message: store it, integrate its energy, answer its `update` flag."""
        effects = self._heard(now)
        self.connected = True
        redelivered = self._track_boot(reading.seq, dup)
        at = reading.ts or received_at
        energy = 0.0 if redelivered else self._energy.add(at, reading.power)
        if redelivered:
            self.duplicates += 1
        else:
            self.readings += 1
            self.energy_total_wh += energy
            self.last_reading, self.last_reading_at = reading, at
        if reading.req is not None and reading.req != self.load_on and not redelivered:
            self.load_on = reading.req
        effects.append(
            Store(
                StoreReading(
                    device_pk=self.record.pk,
                    boot=self.boot,
                    seq=reading.seq,
                    digest=digest,
                    ts=at,
                    received_at=received_at,
                    voltage=reading.voltage,
                    current=reading.current,
                    power=reading.power,
                    energy_wh=energy,
                    load_on=reading.req,
                    current_1=reading.current_1,
                    voltage_1=reading.voltage_1,
                )
            )
        )
        if reading.update and not redelivered and self._update_answer_due(now):
            self.last_update_answer = now
            effects.append(self._command(Instruction.BALANCE_UPDATED, "update", now))
        return effects

    def status(self, online: bool, now: float) -> list[Effect]:
        """The board's retained status (`offline` is its last will)."""
        if online:
            return self._heard(now)
        return self._went_offline()

    def tick(self, now: float) -> list[Effect]:
        """Mark a silent board offline; keep a connected board alive."""
        heard = self.last_heard
        if self.online and heard is not None and now - heard >= self.timing.offline_after:
            return self._went_offline()
        if self.connected and self._keepalive_due(now):
            return [self._command(Instruction.PERSIST, "keepalive", now)]
        return []

    def instruct(self, instruction: Instruction, reason: str, now: float) -> list[Effect]:
        """A command asked for from outside (the central, the REPL)."""
        return [self._command(instruction, reason, now)]

    def balance_changed(self, balance: int, now: float) -> list[Effect]:
        """A new on-chain balance: tell the board with instruction 3."""
        self.balance = balance
        return [self._command(Instruction.BALANCE_UPDATED, "balance", now)]

    def snapshot(self) -> dict[str, object]:
        """The state as plain values, for the REPL and tests."""
        last = self.last_reading
        return {
            "device_id": self.record.device_id,
            "connection_type": self.record.connection_type,
            "status": "online" if self.online else "offline",
            "connected": self.connected,
            "balance": self.balance,
            "load_on": self.load_on,
            "boot": self.boot,
            "last_seq": self.last_seq,
            "last_reading_at": self.last_reading_at,
            "last_power": last.power if last else None,
            "energy_total_wh": self.energy_total_wh,
            "readings": self.readings,
            "duplicates": self.duplicates,
            "commands": self.commands,
        }

    # -- rules -----------------------------------------------------------------------------

    def _heard(self, now: float) -> list[Effect]:
        self.last_heard = now
        if self.online:
            return []
        self.online = True
        return [StateChanged("online", self.load_on)]

    def _went_offline(self) -> list[Effect]:
        self.connected = False
        self._energy.reset()
        if not self.online:
            return []
        self.online = False
        return [StateChanged("offline", self.load_on)]

    def _track_boot(self, seq: int | None, dup: bool) -> bool:
        """Follow the board's `seq`; True when this looks like a redelivered message.

        A `seq` that does not grow is a redelivery when the broker flags it `dup`, and
        otherwise a reboot of the board, which starts a new boot.
        """
        if seq is None:
            return False
        if self.last_seq is not None and seq <= self.last_seq:
            if dup:
                return True
            self.boot += 1
            self._energy.reset()
        self.last_seq = seq
        return False

    def _keepalive_due(self, now: float) -> bool:
        if self.last_command is None:
            return True
        return now - self.last_command + self.timing.tick > self.timing.keepalive_interval

    def _update_answer_due(self, now: float) -> bool:
        last = self.last_update_answer
        return last is None or now - last >= UPDATE_ANSWER_INTERVAL

    def _command(self, instruction: Instruction, reason: str, now: float) -> SendCommand:
        self.last_command = now
        self.commands += 1
        return SendCommand(instruction, self.balance, reason)
