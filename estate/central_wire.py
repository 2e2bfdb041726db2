"""The central backend's HTTP wire format (PROTOCOL section 2): requests, answers, the JWT.

One cattrs converter serves this edge. Requests unstructure to exactly the contract's
fields (the central answers 422 to anything else) and, when structured (by the fake
central, by tests), forbid unknown keys as the central does. Answers are structured
strictly in what the gateway reads (types, required fields, the account address's
form) but tolerate keys the gateway does not read: the real central's device list
carries more columns (`status`, `estate`, ...) than the contract names, and new
columns must not break running gateways. A malformed answer raises
`CentralProtocolError` naming the call and the field path (`$.data[0].id: ...`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import UTC, datetime
from typing import Any, Literal, NewType, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

from estate.types import CentralId, DeviceId

__all__ = [
    "AccountAddress",
    "ActivateRequest",
    "CentralDevice",
    "CentralError",
    "CentralProtocolError",
    "ConnectionType",
    "DeactivateRequest",
    "ReadingsBatch",
    "RelayedReading",
    "Result",
    "SyncDevicesAnswer",
    "Token",
    "TokenConsumptionRequest",
    "iso_utc",
    "jwt_claims",
    "normalise_address",
    "structure_answer",
    "structure_request",
    "unstructure_request",
]

AccountAddress = NewType("AccountAddress", str)
"""A Starknet account as `0x` + 64 lower-case hex digits."""

UtcTimestamp = NewType("UtcTimestamp", str)
"""An ISO 8601 timestamp with a UTC offset, as relayed to the central."""

ConnectionType = Literal["Producer", "Consumer"]

_FELT = re.compile(r"0x[0-9a-f]{1,64}")


class CentralError(Exception):
    """Any failure talking to the central; `call` names the call (`sync_devices`)."""

    def __init__(self, call: str, message: str) -> None:
        super().__init__(f"central {call}: {message}")
        self.call = call


class CentralProtocolError(CentralError):
    """The central answered 200 with a body that does not follow the contract."""

    def __init__(self, call: str, problems: list[str]) -> None:
        super().__init__(call, "malformed answer: " + "; ".join(problems))
        self.problems = problems


# -- value normalisation ---------------------------------------------------------------------


def normalise_address(value: str) -> AccountAddress:
    """`0x4A1` -> `0x000...04a1` (64 hex digits); ValueError when not a hex felt."""
    text = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(text, str) or not _FELT.fullmatch(text):
        raise ValueError(f"must be a hex felt such as 0x04a1..., not {value!r}")
    return AccountAddress("0x" + text[2:].rjust(64, "0"))


def _optional_address(value: str | None) -> AccountAddress | None:
    return None if value is None else normalise_address(value)


def iso_utc(value: datetime | str) -> UtcTimestamp:
    """A datetime (naive means UTC) as ISO 8601 UTC with `Z`, e.g. `2026-12-04T16:11:31.120Z`.

    A string is checked and normalised the same way.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"must be an ISO 8601 timestamp, not {value!r}") from None
    if not isinstance(value, datetime):
        raise TypeError(f"must be an ISO 8601 timestamp, not {value!r}")
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return UtcTimestamp(text)


def _finite(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, not {value!r}")


# -- requests (gateway -> central) ----------------------------------------------------------


@attrs.frozen
class ActivateRequest:
    """Body of `POST /hubs/activate_device`."""

    device_id: DeviceId


@attrs.frozen
class DeactivateRequest:
    """Body of `POST /hubs/deactivate_device`."""

    device_id: DeviceId


@attrs.frozen
class TokenConsumptionRequest:
    """Body of `POST /hubs/token_consumption`: the consume transaction and the new balance."""

    device_id: DeviceId
    tx_hash: str
    balance: int


@attrs.frozen
class RelayedReading:
    """One stored reading relayed to the central (*new*, PROTOCOL section 2)."""

    device_id: DeviceId
    ts: UtcTimestamp = attrs.field(converter=iso_utc)
    voltage: float = attrs.field(validator=_finite)
    current: float = attrs.field(validator=_finite)
    power: float = attrs.field(validator=_finite)
    energy_wh: float = attrs.field(validator=_finite)


@attrs.frozen
class ReadingsBatch:
    """Body of `POST /hubs/readings`; the same `batch_id` on a retry stores once."""

    batch_id: str
    readings: tuple[RelayedReading, ...] = attrs.field(converter=tuple)


_REQUESTS = (
    ActivateRequest,
    DeactivateRequest,
    TokenConsumptionRequest,
    RelayedReading,
    ReadingsBatch,
)

# -- answers (central -> gateway) ----------------------------------------------------------


@attrs.frozen
class Token:
    """Answer of `POST /hubs/connect`. The token never shows in a repr."""

    access_token: str = attrs.field(repr=False)
    token_type: str


@attrs.frozen
class CentralDevice:
    """One device of `GET /hubs/sync_devices`.

    `account_address` is normalised; it is None when the central knows no owner
    account (the real central sends null for a device whose user has no profile).
    """

    id: CentralId
    device_id: DeviceId
    connection_type: ConnectionType
    account_address: AccountAddress | None = attrs.field(converter=_optional_address)


@attrs.frozen
class SyncDevicesAnswer:
    """Answer of `GET /hubs/sync_devices`."""

    success: bool
    data: tuple[CentralDevice, ...]


@attrs.frozen
class Result:
    """Answer of activate, deactivate, token_consumption, shutdown and readings."""

    success: bool
    message: str


# -- the converter ---------------------------------------------------------------------------

_T = TypeVar("_T")


def _strict_str(value: object, _type: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {value!r}")
    return value


def _nonempty_str(value: object, _type: type) -> str:
    text = _strict_str(value, _type)
    if not text:
        raise ValueError("must not be empty")
    return text


def _strict_int(value: object, _type: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer, not {value!r}")
    return value


def _strict_float(value: object, _type: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, not {value!r}")
    return float(value)


def _strict_bool(value: object, _type: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, not {value!r}")
    return value


def _address(value: object, _type: type) -> AccountAddress:
    if not isinstance(value, str):
        raise TypeError(f"must be a hex felt string, not {value!r}")
    return normalise_address(value)


def _timestamp(value: object, _type: type) -> UtcTimestamp:
    if not isinstance(value, str):
        raise TypeError(f"must be an ISO 8601 string, not {value!r}")
    return iso_utc(value)


def _connection_type(value: object, _type: type) -> str:
    if value not in ("Producer", "Consumer"):
        raise ValueError(f"must be Producer or Consumer, not {value!r}")
    return str(value)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(DeviceId, _nonempty_str)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(CentralId, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook(AccountAddress, _address)
    converter.register_structure_hook(UtcTimestamp, _timestamp)
    converter.register_structure_hook_func(lambda t: t == ConnectionType, _connection_type)
    for cls in _REQUESTS:  # the central forbids unknown keys in requests
        converter.register_structure_hook(
            cls, make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True)
        )
    return converter


CONVERTER = _make_converter()


def _why(exc: BaseException, _type: object) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown field(s) {', '.join(sorted(exc.extra_fields))}"
    return str(exc)


def _problems(exc: Exception) -> list[str]:
    if isinstance(exc, cattrs.BaseValidationError):
        lines = cattrs.transform_error(exc, format_exception=_why)  # "why @ $.path"
        return [": ".join(reversed(line.rsplit(" @ ", 1))) for line in lines]
    return [f"$: {_why(exc, None)}"]


def unstructure_request(request: object) -> dict[str, Any]:
    """A request as the JSON object the central expects (exactly the contract's fields)."""
    return CONVERTER.unstructure(request)


def structure_answer(call: str, document: object, cls: type[_T]) -> _T:
    """`document` (parsed JSON) as `cls`; CentralProtocolError naming `call` and the path."""
    if not isinstance(document, dict):
        raise CentralProtocolError(call, [f"$: must be a JSON object, not {document!r:.80}"])
    try:
        return CONVERTER.structure(document, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise CentralProtocolError(call, _problems(exc)) from None


def structure_request(document: object, cls: type[_T]) -> _T:
    """A request body as `cls`, as strictly as the central reads it (for fakes and tests).

    Raises ValueError whose args[0] lists the problems (`$.balance: must be an integer`).
    """
    if not isinstance(document, dict):
        problem = f"$: must be a JSON object, not {type(document).__name__}"
        raise ValueError([problem])  # noqa: TRY004  (one exception type for every bad body)
    try:
        return CONVERTER.structure(document, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise ValueError(_problems(exc)) from None


# -- the JWT ---------------------------------------------------------------------------------


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, read WITHOUT verifying it (the gateway only needs `exp`).

    ValueError when the token is not a JWT with a JSON object as payload.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT (expected three dot-separated parts)")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"JWT payload is not base64url JSON ({exc.__class__.__name__})") from None
    if not isinstance(claims, dict):
        raise ValueError("JWT payload is not a JSON object")  # noqa: TRY004  (one error type)
    return claims
