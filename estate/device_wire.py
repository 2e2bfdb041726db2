"""The boards' MQTT wire format (PROTOCOL section 1): topics, readings, commands.

One cattrs converter validates a board's JSON reading; every failure becomes a
`BadInput` whose `kind` is the counter it is reported under.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from datetime import UTC, datetime

import attrs
import cattrs

from estate.types import DeviceId

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "BadInput",
    "BoardReading",
    "Instruction",
    "TopicKind",
    "Topics",
    "format_command",
    "parse_reading",
    "parse_status",
    "payload_digest",
]

MAX_PAYLOAD_BYTES = 1024
MAX_ABS_CURRENT = 100.0
MAX_VOLTAGE = 1000.0


class BadInput(ValueError):
    """A message from a board that is not stored; `kind` names the counter."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Instruction(enum.IntEnum):
    """What a command tells a board (PROTOCOL section 1)."""

    DISCONNECT = 0
    PERSIST = 1
    TOGGLE = 2
    BALANCE_UPDATED = 3


class TopicKind(enum.StrEnum):
    HELLO = "hello"
    TELEMETRY = "telemetry"
    STATUS = "status"
    COMMAND = "command"


@attrs.frozen
class Topics:
    """The topics of one hub."""

    hub: str

    @property
    def inbound_filters(self) -> tuple[str, ...]:
        """What the gateway subscribes to: every board's hello, telemetry and status."""
        kinds = (TopicKind.HELLO, TopicKind.TELEMETRY, TopicKind.STATUS)
        return tuple(f"{self.hub}/devices/+/{kind}" for kind in kinds)

    def of(self, device_id: str, kind: TopicKind) -> str:
        return f"{self.hub}/devices/{device_id}/{kind}"

    def parse(self, topic: str) -> tuple[DeviceId, TopicKind]:
        """`(device_id, kind)` of an inbound topic; BadInput("bad_topic") otherwise."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != self.hub or parts[1] != "devices" or not parts[2]:
            raise BadInput("bad_topic", f"topic {topic!r} is not {self.hub}/devices/ID/KIND")
        try:
            kind = TopicKind(parts[3])
        except ValueError:
            raise BadInput("bad_topic", f"topic {topic!r} has an unknown kind") from None
        if kind is TopicKind.COMMAND:
            raise BadInput("bad_topic", f"topic {topic!r} is the gateway's own command topic")
        return DeviceId(parts[2]), kind


@attrs.frozen
class BoardReading:
    """One validated reading as a board sent it."""

    current: float
    voltage: float
    update: bool = False
    req: bool | None = None
    ts: datetime | None = None
    seq: int | None = None
    current_1: float | None = None
    voltage_1: float | None = None

    @property
    def power(self) -> float:
        return self.current * self.voltage


def _number(value: object, _type: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, not {value!r}")
    return float(value)


def _flag(value: object, _type: type) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f'must be "true" or "false", not {value!r}')


def _timestamp(value: object, _type: type) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or not 0 <= value < 32503680000:
            raise ValueError(f"must be epoch seconds, not {value!r}")
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"must be ISO 8601 or epoch seconds, not {value!r}") from None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    raise TypeError(f"must be ISO 8601 or epoch seconds, not {value!r}")


def _seq(value: object, _type: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"must be a non-negative integer, not {value!r}")
    return value


def _board_converter() -> cattrs.Converter:
    converter = cattrs.Converter(detailed_validation=True)
    converter.register_structure_hook(float, _number)
    converter.register_structure_hook(bool, _flag)
    converter.register_structure_hook(datetime, _timestamp)
    converter.register_structure_hook(int, _seq)
    return converter


_BOARD = _board_converter()


def _why(exc: BaseException, _type: object) -> str:
    return str(exc)


def parse_reading(payload: bytes) -> BoardReading:
    """Validate a telemetry payload; raise BadInput naming what was wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BadInput("too_large", f"{len(payload)} bytes, at most {MAX_PAYLOAD_BYTES}")
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadInput("not_json", str(exc)) from None
    if not isinstance(document, dict):
        raise BadInput("not_object", f"a JSON {type(document).__name__}, not an object")
    missing = [name for name in ("current", "voltage") if name not in document]
    if missing:
        raise BadInput("missing_field", f"no {' or '.join(missing)}")
    try:
        reading = _BOARD.structure(document, BoardReading)
    except cattrs.ClassValidationError as exc:
        problems = cattrs.transform_error(exc, format_exception=_why)
        raise BadInput("bad_value", "; ".join(problems)) from None
    for name in ("current", "current_1"):
        value = getattr(reading, name)
        if value is not None and abs(value) > MAX_ABS_CURRENT:
            raise BadInput("out_of_range", f"{name} {value} A is beyond ±{MAX_ABS_CURRENT} A")
    for name in ("voltage", "voltage_1"):
        value = getattr(reading, name)
        if value is not None and not 0 <= value <= MAX_VOLTAGE:
            raise BadInput("out_of_range", f"{name} {value} V is outside 0..{MAX_VOLTAGE} V")
    return reading


def parse_status(payload: bytes) -> bool:
    """`True` for `online`, `False` for `offline`; BadInput otherwise."""
    text = payload.decode("utf-8", "replace").strip().strip('"')
    if text not in ("online", "offline"):
        raise BadInput("bad_status", f"status {text[:40]!r} is not online or offline")
    return text == "online"


def payload_digest(payload: bytes) -> str:
    """A short fingerprint of a payload's bytes (a redelivery has the same bytes)."""
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


def format_command(balance: int, instruction: Instruction) -> bytes:
    """A command to a board: `"<balance>,<instruction>\\n"`."""
    return f"{int(balance)},{int(instruction)}\n".encode()
