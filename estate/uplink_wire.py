"""The central's MQTT wire format on the uplink broker (PROTOCOL section 3).

Inbound, `{hub}/commands` carries one command per message:

    {"device": 7, "instruction": 2}     instruction 0-3 for central device 7
    {"device": 7, "command": "stream"}  start its live power stream
    {"device": 7, "command": "stop"}    stop it

One cattrs converter validates them strictly (no other keys, no strings for numbers);
every failure is a `BadCommand` whose `kind` is the counter it is reported under:
`not_json`, `not_object`, `unknown_command` (neither or both of `instruction` and
`command`, an unknown `command`, an unexpected key) or `bad_value` (a missing or
wrong `device`, an instruction that is not an integer 0-3).

Outbound, `{hub}/power/{id}` carries `{"timestamp": "<ISO 8601 UTC>", "power": 5.08}`.
"""

from __future__ import annotations

import enum
import json
import math
from datetime import datetime
from typing import Any

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError

from estate.central_wire import iso_utc
from estate.device_wire import BadInput, Instruction
from estate.types import CentralId

__all__ = [
    "BadCommand",
    "CentralCommand",
    "InstructDevice",
    "StreamAction",
    "StreamCommand",
    "UplinkTopics",
    "format_power",
    "parse_command",
]

MAX_CENTRAL_ID = 2**63 - 1


class BadCommand(BadInput):
    """A message on `{hub}/commands` that is not a command; `kind` names the counter."""


class StreamAction(enum.StrEnum):
    STREAM = "stream"
    STOP = "stop"


@attrs.frozen
class InstructDevice:
    """Send `instruction` to central device `device` now."""

    device: CentralId
    instruction: Instruction


@attrs.frozen
class StreamCommand:
    """Start or stop central device `device`'s live power stream."""

    device: CentralId
    command: StreamAction


CentralCommand = InstructDevice | StreamCommand


@attrs.frozen
class UplinkTopics:
    """The uplink topics of one hub."""

    hub: str

    @property
    def commands(self) -> str:
        return f"{self.hub}/commands"

    def power(self, central_id: int) -> str:
        return f"{self.hub}/power/{int(central_id)}"


class _UnknownAction(ValueError):
    """A `command` that is neither `stream` nor `stop` (an unknown command, not a bad value)."""


def _central_id(value: object, _type: type) -> CentralId:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer device id, not {value!r}")
    if not 0 <= value <= MAX_CENTRAL_ID:
        raise ValueError(f"must be a non-negative device id, not {value!r}")
    return CentralId(value)


def _instruction(value: object, _type: type) -> Instruction:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer 0-3, not {value!r}")
    try:
        return Instruction(value)
    except ValueError:
        raise ValueError(f"must be an integer 0-3, not {value!r}") from None


def _action(value: object, _type: type) -> StreamAction:
    try:
        return StreamAction(value)
    except ValueError:
        raise _UnknownAction(f"must be 'stream' or 'stop', not {value!r:.40}") from None


def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(CentralId, _central_id)
    converter.register_structure_hook(Instruction, _instruction)
    converter.register_structure_hook(StreamAction, _action)
    return converter


_UPLINK = _converter()


def _why(exc: BaseException, _type: object) -> str:
    return "required field missing" if isinstance(exc, KeyError) else str(exc)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def parse_command(payload: bytes) -> CentralCommand:
    """Validate a `{hub}/commands` payload; raise BadCommand naming what was wrong."""
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadCommand("not_json", str(exc)) from None
    if not isinstance(document, dict):
        raise BadCommand("not_object", f"a JSON {type(document).__name__}, not an object")
    kinds = [key for key in ("instruction", "command") if key in document]
    if len(kinds) != 1:
        keys = ", ".join(sorted(map(str, document))[:5]) or "no keys"
        raise BadCommand("unknown_command", f"needs one of instruction or command, has {keys}")
    target: type[Any] = InstructDevice if kinds == ["instruction"] else StreamCommand
    try:
        return _UPLINK.structure(document, target)
    except cattrs.ClassValidationError as exc:
        leaves = _leaves(exc)
        unknown = any(isinstance(e, _UnknownAction | ForbiddenExtraKeysError) for e in leaves)
        problems = cattrs.transform_error(exc, format_exception=_why)
        kind = "unknown_command" if unknown else "bad_value"
        raise BadCommand(kind, "; ".join(problems)) from None


def format_power(power: float, at: datetime) -> bytes:
    """A power stream message: `{"timestamp": "<ISO 8601 UTC>", "power": 5.08}` (W)."""
    if not math.isfinite(power):
        raise ValueError(f"power must be a finite number, not {power!r}")
    return json.dumps({"timestamp": iso_utc(at), "power": round(power, 2)}).encode()
