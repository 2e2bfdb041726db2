"""The boards' wire format: PROTOCOL section 1."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estate.device_wire import (
    BadInput,
    Instruction,
    TopicKind,
    Topics,
    format_command,
    parse_reading,
    parse_status,
    payload_digest,
)

FIRMWARE_PAYLOAD = b'{"current": 0.42, "voltage": 12.10, "update": "false", "req": "true"}'


def reading_bytes(**fields: object) -> bytes:
    return json.dumps({"current": 0.42, "voltage": 12.1, **fields}).encode()


def bad_kind(payload: bytes) -> str:
    with pytest.raises(BadInput) as caught:
        parse_reading(payload)
    return caught.value.kind


# -- good readings -----------------------------------------------------------------------


def test_firmware_payload_is_accepted() -> None:
    reading = parse_reading(FIRMWARE_PAYLOAD)
    assert reading.current == 0.42
    assert reading.voltage == 12.10
    assert reading.update is False
    assert reading.req is True
    assert reading.ts is None
    assert reading.seq is None
    assert reading.power == pytest.approx(0.42 * 12.10)


def test_flags_may_be_json_booleans() -> None:
    reading = parse_reading(reading_bytes(update=True, req=False))
    assert reading.update is True
    assert reading.req is False


def test_flags_are_optional() -> None:
    reading = parse_reading(b'{"current": 1, "voltage": 2}')
    assert reading.update is False
    assert reading.req is None


def test_integer_numbers_are_accepted_as_floats() -> None:
    reading = parse_reading(b'{"current": -3, "voltage": 230}')
    assert (reading.current, reading.voltage) == (-3.0, 230.0)


def test_epoch_ts_is_utc() -> None:
    reading = parse_reading(reading_bytes(ts=1_700_000_000.5))
    assert reading.ts == datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    ["2024-03-01T12:00:00Z", "2024-03-01T12:00:00+00:00", "2024-03-01T14:00:00+02:00"],
)
def test_iso_ts_with_offset_is_converted_to_utc(text: str) -> None:
    reading = parse_reading(reading_bytes(ts=text))
    assert reading.ts == datetime(2024, 3, 1, 12, tzinfo=UTC)
    assert reading.ts.utcoffset().total_seconds() == 0


def test_naive_iso_ts_is_taken_as_utc() -> None:
    reading = parse_reading(reading_bytes(ts="2024-03-01T12:00:00"))
    assert reading.ts == datetime(2024, 3, 1, 12, tzinfo=UTC)


def test_seq_is_read() -> None:
    assert parse_reading(reading_bytes(seq=17)).seq == 17


def test_producer_fields_are_read() -> None:
    reading = parse_reading(reading_bytes(current_1=1.5, voltage_1=13.2))
    assert (reading.current_1, reading.voltage_1) == (1.5, 13.2)


def test_unknown_fields_are_ignored() -> None:
    assert parse_reading(reading_bytes(rssi=-70)).current == 0.42


def test_payload_of_exactly_1024_bytes_is_accepted() -> None:
    base = reading_bytes(pad="")
    payload = reading_bytes(pad="x" * (1024 - len(base)))
    assert len(payload) == 1024
    assert parse_reading(payload).voltage == 12.1


# -- bad input ---------------------------------------------------------------------------


def test_payload_over_1_kib_is_too_large() -> None:
    base = reading_bytes(pad="")
    payload = reading_bytes(pad="x" * (1025 - len(base)))
    assert len(payload) == 1025
    assert bad_kind(payload) == "too_large"


@pytest.mark.parametrize(
    "payload",
    [b"", b"current=1", b'{"current": 1,', b"\xff\xfe\x00", b"[" * 1024, b"{" * 1024],
    ids=["empty", "text", "truncated", "not-utf8", "deep-list", "deep-object"],
)
def test_not_json(payload: bytes) -> None:
    assert bad_kind(payload) == "not_json"


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"hello"', b"42", b"null", b"true"])
def test_not_an_object(payload: bytes) -> None:
    assert bad_kind(payload) == "not_object"


@pytest.mark.parametrize(
    "payload", [b'{"voltage": 12}', b'{"current": 1}', b"{}", b'{"Current": 1, "voltage": 2}']
)
def test_missing_current_or_voltage(payload: bytes) -> None:
    assert bad_kind(payload) == "missing_field"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"current": "0.42", "voltage": 12}',
        b'{"current": null, "voltage": 12}',
        b'{"current": true, "voltage": 12}',
        b'{"current": [1], "voltage": 12}',
        b'{"current": NaN, "voltage": 12}',
        b'{"current": 1, "voltage": Infinity}',
        b'{"current": -Infinity, "voltage": 12}',
        b'{"current": 1e400, "voltage": 12}',
        b'{"current": 1, "voltage": 12, "update": "yes"}',
        b'{"current": 1, "voltage": 12, "req": 1}',
        b'{"current": 1, "voltage": 12, "req": "TRUE"}',
        b'{"current": 1, "voltage": 12, "seq": -1}',
        b'{"current": 1, "voltage": 12, "seq": 1.5}',
        b'{"current": 1, "voltage": 12, "ts": "yesterday"}',
        b'{"current": 1, "voltage": 12, "ts": -5}',
        b'{"current": 1, "voltage": 12, "current_1": "x"}',
    ],
)
def test_bad_value(payload: bytes) -> None:
    assert bad_kind(payload) == "bad_value"


@pytest.mark.parametrize(
    "fields",
    [
        {"current": 100.01},
        {"current": -100.01},
        {"voltage": -0.01},
        {"voltage": 1000.01},
        {"current_1": 150.0},
        {"voltage_1": -1.0},
    ],
)
def test_out_of_range(fields: dict[str, float]) -> None:
    assert bad_kind(reading_bytes(**fields)) == "out_of_range"


@pytest.mark.parametrize(
    "fields", [{"current": 100.0}, {"current": -100.0}, {"voltage": 0.0}, {"voltage": 1000.0}]
)
def test_range_limits_are_inclusive(fields: dict[str, float]) -> None:
    parse_reading(reading_bytes(**fields))


# -- round trip --------------------------------------------------------------------------

currents = st.integers(min_value=-10_000, max_value=10_000).map(lambda c: c / 100)
voltages = st.integers(min_value=0, max_value=100_000).map(lambda c: c / 100)


@given(current=currents, voltage=voltages, update=st.booleans(), req=st.booleans())
def test_firmware_serialised_reading_round_trips(
    current: float, voltage: float, update: bool, req: bool
) -> None:
    payload = (
        f'{{"current": {current:.2f}, "voltage": {voltage:.2f}, '
        f'"update": "{str(update).lower()}", "req": "{str(req).lower()}"}}'
    ).encode()
    reading = parse_reading(payload)
    assert reading.current == current
    assert reading.voltage == voltage
    assert reading.update is update
    assert reading.req is req


@given(seq=st.integers(min_value=0, max_value=2**63 - 1), epoch=st.integers(0, 4_000_000_000))
def test_seq_and_epoch_ts_round_trip(seq: int, epoch: int) -> None:
    reading = parse_reading(reading_bytes(seq=seq, ts=epoch))
    assert reading.seq == seq
    assert reading.ts == datetime.fromtimestamp(epoch, UTC)


@given(payload=st.binary(max_size=1100))
def test_any_bytes_parse_or_raise_bad_input(payload: bytes) -> None:
    with contextlib.suppress(BadInput):
        parse_reading(payload)


# -- topics ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [TopicKind.HELLO, TopicKind.TELEMETRY, TopicKind.STATUS])
def test_inbound_topic_is_parsed(kind: TopicKind) -> None:
    topics = Topics("estate")
    assert topics.parse(f"estate/devices/H001/{kind}") == ("H001", kind)


def test_of_builds_a_topic_parse_reads_back() -> None:
    topics = Topics("farm")
    assert topics.of("H002", TopicKind.TELEMETRY) == "farm/devices/H002/telemetry"
    assert topics.parse(topics.of("H002", TopicKind.TELEMETRY)) == ("H002", TopicKind.TELEMETRY)


@pytest.mark.parametrize(
    "topic",
    [
        "other/devices/H001/telemetry",
        "estate/devices/H001/readings",
        "estate/devices/H001/command",
        "estate/boards/H001/telemetry",
        "estate/devices//telemetry",
        "estate/devices/H001/telemetry/extra",
        "estate/devices/telemetry",
        "estate/commands",
    ],
    ids=["wrong-hub", "wrong-kind", "command", "not-devices", "no-id", "too-long", "short", "hub"],
)
def test_bad_topic_is_rejected(topic: str) -> None:
    with pytest.raises(BadInput) as caught:
        Topics("estate").parse(topic)
    assert caught.value.kind == "bad_topic"


def test_inbound_filters_cover_hello_telemetry_status_only() -> None:
    assert set(Topics("estate").inbound_filters) == {
        "estate/devices/+/hello",
        "estate/devices/+/telemetry",
        "estate/devices/+/status",
    }


# -- commands and status -----------------------------------------------------------------


def test_format_command() -> None:
    assert format_command(41, Instruction.PERSIST) == b"41,1\n"


@pytest.mark.parametrize(
    ("instruction", "expected"),
    [
        (Instruction.DISCONNECT, b"0,0\n"),
        (Instruction.TOGGLE, b"0,2\n"),
        (Instruction.BALANCE_UPDATED, b"0,3\n"),
    ],
)
def test_instruction_numbers(instruction: Instruction, expected: bytes) -> None:
    assert format_command(0, instruction) == expected


@pytest.mark.parametrize(
    ("payload", "online"),
    [(b"online", True), (b"offline", False), (b'"online"', True), (b"offline\n", False)],
)
def test_parse_status(payload: bytes, online: bool) -> None:
    assert parse_status(payload) is online


@pytest.mark.parametrize("payload", [b"", b"ONLINE", b"up", b"\xff"])
def test_bad_status(payload: bytes) -> None:
    with pytest.raises(BadInput) as caught:
        parse_status(payload)
    assert caught.value.kind == "bad_status"


def test_digest_is_same_for_same_bytes_only() -> None:
    assert payload_digest(FIRMWARE_PAYLOAD) == payload_digest(bytes(FIRMWARE_PAYLOAD))
    assert payload_digest(FIRMWARE_PAYLOAD) != payload_digest(FIRMWARE_PAYLOAD + b" ")
    assert len(payload_digest(b"")) <= 16
