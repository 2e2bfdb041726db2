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
    "DEFAULT_POLICY",
    "DEFAULT_TIMING",
    "ActivityChanged",
    "Board",
    "BoardPolicy",
    "BoardTiming",
    "CutOffChanged",
    "Effect",
    "PublishPower",
    "Repeat",
    "RequestBalance",
    "SendCommand",
    "StateChanged",
    "Store",
    "StreamChanged",
    "StreamRefused",
]

RECENT_MESSAGES = 256
"""How many recent `(seq, digest)` pairs a board remembers to recognise repeats."""

UPDATE_ANSWER_INTERVAL = 2.0
"""Seconds between two answers to a board whose `update` flag stays set."""


@attrs.frozen
class BoardTiming:
    keepalive_interval: float = 5.0
    offline_after: float = 10.0
    integration_max_gap: float = 5.0
    tick: float = 1.0
    """How often `tick` is called; keep-alives go out early enough not to miss a period."""
    power_stream_interval: float = 3.0
    """Seconds between two power values of a live stream to the central (PROTOCOL 3)."""


@attrs.frozen
class BoardPolicy:
    """What the gateway does with the board's SCT balance."""

    tokens: bool = False
    """Token accounting is on (a StarknetSigner exists): the balance key refreshes it."""
    prepaid_cutoff: bool = True
    """With `tokens`: switch a consumer's load off at a balance of 0, on again when it grows."""
    toggle_settle: float = 5.0
    """Seconds to wait for a reading showing that a toggle took effect before toggling again."""
    refresh_timeout: float = 5.0
    """Seconds to wait for a refreshed balance before answering the board with the cached one."""


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


@attrs.frozen
class Repeat:
    """A message already handled (same `seq` and payload): acknowledge it, store nothing."""


@attrs.frozen
class ActivityChanged:
    """The board became connected (completed the handshake) or stopped being so."""

    active: bool


@attrs.frozen
class PublishPower:
    """Send the central one value of the live power stream: `power` W, measured `at`."""

    power: float
    at: datetime


@attrs.frozen
class StreamChanged:
    """The live power stream started or ended, and why."""

    streaming: bool
    reason: str


@attrs.frozen
class StreamRefused:
    """A stream was asked for and cannot be given (no central id, board offline)."""

    reason: str


@attrs.frozen
class RequestBalance:
    """Ask the StarknetSigner for the owner's balance now (answered by `balance_changed`)."""


@attrs.frozen
class CutOffChanged:
    """The gateway switched the load off for want of tokens (True), or that ended (False)."""

    cut_off: bool


Effect = (
    SendCommand
    | Store
    | StateChanged
    | ActivityChanged
    | PublishPower
    | StreamChanged
    | StreamRefused
    | Repeat
    | RequestBalance
    | CutOffChanged
)

DEFAULT_TIMING = BoardTiming()
DEFAULT_POLICY = BoardPolicy()


@attrs.define
class Board:
    """A board's connection, readings, energy and balance. Times: `now` is monotonic seconds.

    With `policy.tokens` the balance key asks for a fresh balance (RequestBalance) and is
    answered when it comes (`balance_changed`), or with the cached balance after
    `refresh_timeout`. With `prepaid_cutoff` too, a consumer's load is toggled off while
    the balance is 0 or less (`cut_off`), and on again once it grows, if the gateway
    switched it off. The rules act on a balance read on chain since the actor started (not
    the cached one) and on the `req` of a reading since the board connected; after a
    toggle they wait for a reading showing it, or `toggle_settle` seconds.
    """

    record: DeviceRecord
    timing: BoardTiming = DEFAULT_TIMING
    policy: BoardPolicy = DEFAULT_POLICY
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
    balance_refresh_since: float | None = None
    """When the pending balance refresh was asked for (None: none is pending)."""
    cut_off: bool = False
    readings: int = 0
    duplicates: int = 0
    commands: int = 0
    streaming: bool = False
    last_power_sent: float | None = None
    _energy: EnergyIntegrator = attrs.field(init=False)
    _recent: dict[tuple[int, str], None] = attrs.field(init=False, factory=dict)
    _load_seen: bool = attrs.field(init=False, default=False)
    """A reading since the board connected showed the load state."""
    _balance_read: bool = attrs.field(init=False, default=False)
    """The balance was read on chain since this actor started (the cached one may be stale)."""
    _toggle: tuple[float, bool] | None = attrs.field(init=False, default=None)
    """The last toggle not yet seen to take effect: when, and the load state it brings."""

    def __attrs_post_init__(self) -> None:
        record = self.record
        self.balance, self.load_on = record.balance, record.load_on
        self.boot, self.last_seq = record.boot, record.last_seq
        self.energy_total_wh = record.energy_total_wh
        self.cut_off = record.load_cut_off
        # a board the database says is online must be heard from, or it goes offline
        self.online = record.status == "online"
        self._energy = EnergyIntegrator(self.timing.integration_max_gap)
        if record.last_reading_at is not None:
            self._energy.add(record.last_reading_at, record.last_power)
            self.last_reading_at = record.last_reading_at

    # -- inputs ----------------------------------------------------------------------------

    def hello(self, now: float) -> list[Effect]:
        """The board is idle and asks to be connected: answer `<balance>,1`."""
        effects = self._heard(now)
        effects.append(self._command(Instruction.PERSIST, "handshake", now))
        return effects + self._connect()

    def reading(
        self, reading: BoardReading, digest: str, dup: bool, received_at: datetime, now: float
    ) -> list[Effect]:
        """A telemetry message: store it, integrate its energy, answer its `update` flag."""
        effects = self._heard(now) + self._connect()
        if reading.seq is not None and (reading.seq, digest) in self._recent:
            self.duplicates += 1
            return [*effects, Repeat()]
        redelivered = self._track_boot(reading.seq, digest, dup)
        at = reading.ts or received_at
        energy = 0.0 if redelivered else self._energy.add(at, reading.power)
        if redelivered:
            self.duplicates += 1
        else:
            self.readings += 1
            self.energy_total_wh += energy
            self.last_reading, self.last_reading_at = reading, at
        if reading.req is not None and not redelivered:
            self.load_on, self._load_seen = reading.req, True
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
        if redelivered:
            return effects
        if reading.update:
            effects += self._update_key(now)
        return effects + self._prepaid(now)

    def balance_changed(self, balance: int, reason: str, now: float) -> list[Effect]:
        """The owner's balance as read on chain: tell the board, then apply the cut-off.

        A pending refresh (the balance key) or a consumption is answered with
        instruction 3; any other change goes out at once with instruction 1.
        """
        old, self.balance, self._balance_read = self.balance, balance, True
        effects: list[Effect] = []
        if self.balance_refresh_since is not None or reason == "consumed":
            effects += self._answer_update(reason, now)
        elif self.connected and balance != old:
            effects.append(self._command(Instruction.PERSIST, "balance", now))
        return effects + self._prepaid(now)

    def balance_refresh_failed(self, now: float) -> list[Effect]:
        """The balance could not be read: answer a pending balance key with the cached one."""
        if self.balance_refresh_since is None:
            return []
        return self._answer_update("update (cached balance)", now)

    def status(self, online: bool, now: float) -> list[Effect]:
        """The board's retained status (`offline` is its last will)."""
        if online:
            return self._heard(now)
        return self._went_offline()

    def tick(self, now: float) -> list[Effect]:
        """Mark a silent board offline; keep a connected board alive; stream its power."""
        if self.online and self.last_heard is None:
            self.last_heard = now  # online in the database: the silence counts from now
        heard = self.last_heard
        if self.online and heard is not None and now - heard >= self.timing.offline_after:
            return self._went_offline()
        effects: list[Effect] = []
        since = self.balance_refresh_since
        if since is not None and now - since >= self.policy.refresh_timeout:
            effects += self._answer_update("update (cached balance)", now)
        if self.connected and self._keepalive_due(now):
            effects.append(self._command(Instruction.PERSIST, "keepalive", now))
        if self.streaming and self._power_due(now):
            effects.extend(self._power(now))
        return effects

    def start_stream(self, now: float) -> list[Effect]:
        """The central asks for the live power stream: the latest power about every 3 s.

        The stream runs until `stop_stream` or until the board goes offline (silence,
        or its `offline` status); the central must ask again after that. It needs the
        board's central id (the topic is `{hub}/power/{central_id}`): a board registered
        only locally cannot stream. Starting a running stream changes nothing.
        """
        if self.record.central_id is None:
            return [StreamRefused("the board has no central id")]
        if not self.online:
            return [StreamRefused("the board is offline")]
        if self.streaming:
            return []
        self.streaming, self.last_power_sent = True, None
        return [StreamChanged(True, "asked by the central"), *self._power(now)]

    def stop_stream(self, reason: str = "stopped by the central") -> list[Effect]:
        """End the live power stream (nothing if none runs)."""
        if not self.streaming:
            return []
        self.streaming = False
        return [StreamChanged(False, reason)]

    def instruct(self, instruction: Instruction, reason: str, now: float) -> list[Effect]:
        """A command asked for from outside (the central, the REPL, the shutdown).

        After instruction 0 the board is idle: no keep-alive until it says hello again.
        """
        command = self._command(instruction, reason, now)
        if instruction is Instruction.DISCONNECT and self.connected:
            self.connected = False
            return [command, ActivityChanged(False)]
        return [command]

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
            "central_id": self.record.central_id,
            "streaming": self.streaming,
            "cut_off": self.cut_off,
            "balance_refresh_pending": self.balance_refresh_since is not None,
        }

    # -- rules -----------------------------------------------------------------------------

    def _heard(self, now: float) -> list[Effect]:
        self.last_heard = now
        if self.online:
            return []
        self.online = True
        return [StateChanged("online", self.load_on)]

    def _connect(self) -> list[Effect]:
        if self.connected:
            return []
        self.connected, self._load_seen = True, False
        return [ActivityChanged(True)]

    def _went_offline(self) -> list[Effect]:
        effects: list[Effect] = [ActivityChanged(False)] if self.connected else []
        effects += self.stop_stream("the board went offline")
        self.connected, self.balance_refresh_since = False, None
        self._energy.reset()
        if not self.online:
            return effects
        self.online = False
        return [StateChanged("offline", self.load_on), *effects]

    def _track_boot(self, seq: int | None, digest: str, dup: bool) -> bool:
        """Follow the board's `seq`; True when this message may be stored already.

        (A `(seq, digest)` among the last RECENT_MESSAGES never gets here: it is a
        repeat, the board's or the broker's retransmission, flagged `dup` or not.) A
        `seq` that does not grow is a redelivery when the broker flags it `dup` (after
        a gateway restart), and a reboot of the board (a new boot) when it does not.
        """
        if seq is None:
            return False
        if self.last_seq is not None and seq <= self.last_seq:
            if dup:
                return True
            self.boot += 1
            self._energy.reset()
        self.last_seq = seq
        self._recent[(seq, digest)] = None
        if len(self._recent) > RECENT_MESSAGES:
            del self._recent[next(iter(self._recent))]
        return False

    def _keepalive_due(self, now: float) -> bool:
        if self.last_command is None:
            return True
        return now - self.last_command + self.timing.tick > self.timing.keepalive_interval

    def _power_due(self, now: float) -> bool:
        last = self.last_power_sent
        interval, tick = self.timing.power_stream_interval, self.timing.tick
        return last is None or now - last + tick / 2 >= interval

    def _power(self, now: float) -> list[Effect]:
        """The latest reading's power, once there is one (a stream never invents a value)."""
        if self.last_reading is None or self.last_reading_at is None:
            return []
        self.last_power_sent = now
        return [PublishPower(self.last_reading.power, self.last_reading_at)]

    def _update_answer_due(self, now: float) -> bool:
        last = self.last_update_answer
        return last is None or now - last >= UPDATE_ANSWER_INTERVAL

    def _update_key(self, now: float) -> list[Effect]:
        """The `update` flag: answer 3 at once, or with tokens ask for the balance first."""
        if self.balance_refresh_since is not None or not self._update_answer_due(now):
            return []
        self.last_update_answer = now
        if not self.policy.tokens:
            return [self._command(Instruction.BALANCE_UPDATED, "update", now)]
        self.balance_refresh_since = now
        return [RequestBalance()]

    def _answer_update(self, reason: str, now: float) -> list[Effect]:
        """Instruction 3 with the balance (to a connected board); the refresh is over."""
        self.balance_refresh_since = None
        if not self.connected:
            return []
        self.last_update_answer = now
        return [self._command(Instruction.BALANCE_UPDATED, reason, now)]

    def _prepaid(self, now: float) -> list[Effect]:
        """The prepaid cut-off: a consumer's load is off while the balance is 0 or less."""
        policy = self.policy
        applies = policy.tokens and policy.prepaid_cutoff and self.connected
        known = self._load_seen and self._balance_read
        if not (applies and self.record.connection_type == "Consumer" and known):
            return []
        if self._toggling(now):
            return []
        if self.balance <= 0:
            if not self.load_on:
                return []
            return [self._toggle_load("prepaid cut-off", now), *self._set_cut_off(True)]
        if not self.cut_off:
            return []  # a load the gateway did not switch off is not its to switch on
        if self.load_on:
            return self._set_cut_off(False)
        return [self._toggle_load("balance restored", now)]

    def _toggling(self, now: float) -> bool:
        """A toggle was sent and no reading shows it yet, within `toggle_settle` seconds."""
        if self._toggle is None:
            return False
        at, load_on = self._toggle
        if self.load_on is load_on or now - at >= self.policy.toggle_settle:
            self._toggle = None
            return False
        return True

    def _toggle_load(self, reason: str, now: float) -> SendCommand:
        self._toggle = (now, not self.load_on)
        return self._command(Instruction.TOGGLE, reason, now)

    def _set_cut_off(self, cut_off: bool) -> list[Effect]:
        if self.cut_off is cut_off:
            return []
        self.cut_off = cut_off
        return [CutOffChanged(cut_off)]

    def _command(self, instruction: Instruction, reason: str, now: float) -> SendCommand:
        self.last_command = now
        self.commands += 1
        return SendCommand(instruction, self.balance, reason)
