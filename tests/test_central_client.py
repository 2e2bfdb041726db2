"""Contract tests: CentralClient against FakeCentral, a real HTTP server on loopback.

The fake validates request bodies as the central does (422 on unknown or missing
fields), so a call that succeeds proves the client sent exactly the contract's body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from estate.central_client import (
    CentralClient,
    CentralNotFound,
    CentralProtocolError,
    CentralRejected,
    CentralUnavailable,
)
from estate.central_wire import (
    CentralDevice,
    ReadingsBatch,
    RelayedReading,
    normalise_address,
    structure_request,
    unstructure_request,
)
from estate.fake_central import FakeCentral

API_KEY = "KEY-s3cr3t-4f9c"
ADDRESS = "0x04A1"
ADDRESS_64 = "0x" + "0" * 61 + "4a1"
DEVICES = [
    {"id": 7, "device_id": "H001", "connection_type": "Consumer", "account_address": ADDRESS},
    {"id": 8, "device_id": "P001", "connection_type": "Producer", "account_address": "0xBEEF"},
]


class ManualClock:
    """Real time plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def fake() -> Iterator[FakeCentral]:
    central = FakeCentral(api_key=API_KEY, hub="estate").start()
    central.set_devices(DEVICES)
    yield central
    central.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def client(fake: FakeCentral, clock: ManualClock) -> Iterator[CentralClient]:
    central = CentralClient(fake.url, API_KEY, timeout=(1.0, 2.0), clock=clock)
    yield central
    central.close()


def _statuses(fake: FakeCentral, path: str) -> list[int]:
    return [status for _method, called, status in fake.requests if called == path]


def _batch(batch_id: str = "b-1") -> ReadingsBatch:
    return ReadingsBatch(
        batch_id,
        [
            RelayedReading("H001", "2026-12-04T16:00:00Z", 12.1, 0.42, 5.08, 0.0014),
            RelayedReading("H001", "2026-12-04T16:00:01+00:00", 12.0, 0.5, 6.0, 0.0017),
        ],
    )


# -- every call, exact bodies ----------------------------------------------------------------


def test_sync_devices_structures_and_normalises_addresses(
    fake: FakeCentral, client: CentralClient
) -> None:
    extra = {**DEVICES[0], "device_id": "H002", "id": 9, "status": "inactive", "estate": "x"}
    fake.set_devices(
        [*DEVICES, extra, {**DEVICES[0], "device_id": "H003", "id": 10, "account_address": None}]
    )

    devices = client.sync_devices()

    assert devices[0] == CentralDevice(7, "H001", "Consumer", ADDRESS_64)
    assert devices[0].account_address == ADDRESS_64
    assert devices[1].account_address == "0x" + "0" * 60 + "beef"
    assert devices[1].connection_type == "Producer"
    assert devices[2].device_id == "H002"  # columns the gateway does not read are ignored
    assert devices[3].account_address is None
    assert fake.calls[-1] == ("/hubs/sync_devices", None)


def test_device_calls_send_exactly_the_contract_bodies(
    fake: FakeCentral, client: CentralClient
) -> None:
    assert client.activate_device("H001").success
    assert client.activate_device("P001").message == "Device P001 activated"
    assert fake.active == {"H001", "P001"}
    client.deactivate_device("P001")
    assert fake.active == {"H001"}
    client.token_consumption("H001", "0x5ee1", 41)
    client.shutdown()
    assert fake.active == set()

    assert [(path, body) for path, body in fake.calls if path != "/hubs/connect"] == [
        ("/hubs/activate_device", {"device_id": "H001"}),
        ("/hubs/activate_device", {"device_id": "P001"}),
        ("/hubs/deactivate_device", {"device_id": "P001"}),
        ("/hubs/token_consumption", {"device_id": "H001", "tx_hash": "0x5ee1", "balance": 41}),
        ("/hubs/shutdown", None),
    ]
    assert _statuses(fake, "/hubs/connect") == [200]  # one token for all the calls


def test_calls_reuse_one_connection(fake: FakeCentral, client: CentralClient) -> None:
    for _ in range(5):
        client.sync_devices()

    assert len(fake.requests) == 6  # connect + 5 calls
    assert fake.connections_accepted == 1


def test_relay_readings_sends_the_batch(fake: FakeCentral, client: CentralClient) -> None:
    client.relay_readings(_batch())

    assert fake.calls_to("readings") == [
        {
            "batch_id": "b-1",
            "readings": [
                {
                    "device_id": "H001",
                    "ts": "2026-12-04T16:00:00.000Z",
                    "voltage": 12.1,
                    "current": 0.42,
                    "power": 5.08,
                    "energy_wh": 0.0014,
                },
                {
                    "device_id": "H001",
                    "ts": "2026-12-04T16:00:01.000Z",
                    "voltage": 12.0,
                    "current": 0.5,
                    "power": 6.0,
                    "energy_wh": 0.0017,
                },
            ],
        }
    ]


def test_the_fake_rejects_unknown_and_missing_fields(fake: FakeCentral) -> None:
    token = requests.post(f"{fake.url}/hubs/connect", params={"api_key": API_KEY}, timeout=5)
    headers = {"Authorization": f"Bearer {token.json()['access_token']}"}

    extra = requests.post(
        f"{fake.url}/hubs/activate_device",
        json={"device_id": "H001", "status": "on"},
        headers=headers,
        timeout=5,
    )
    missing = requests.post(
        f"{fake.url}/hubs/token_consumption",
        json={"device_id": "H001", "tx_hash": "0x5ee1"},
        headers=headers,
        timeout=5,
    )
    wrong_type = requests.post(
        f"{fake.url}/hubs/token_consumption",
        json={"device_id": "H001", "tx_hash": "0x5ee1", "balance": "41"},
        headers=headers,
        timeout=5,
    )

    assert extra.status_code == 422
    assert extra.json()["detail"][0]["loc"] == ["body", "status"]
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "balance"]
    assert wrong_type.status_code == 422
    assert fake.active == set()


def test_unknown_device_is_not_found(fake: FakeCentral, client: CentralClient) -> None:
    with pytest.raises(CentralNotFound, match="Device H999 not found") as caught:
        client.activate_device("H999")
    assert caught.value.status == 404


def test_a_rejected_body_carries_fastapis_detail(client: CentralClient) -> None:
    with pytest.raises(CentralRejected, match=r"body\.tx_hash: String should have") as caught:
        client.token_consumption("H001", "0x1", 3)  # tx_hash shorter than the central allows
    assert caught.value.status == 422


def test_a_malformed_answer_names_the_call_and_the_field(
    fake: FakeCentral, client: CentralClient
) -> None:
    fake.set_devices([{**DEVICES[0], "id": "7"}, {**DEVICES[1], "account_address": "0xZZ"}])

    with pytest.raises(CentralProtocolError) as caught:
        client.sync_devices()

    message = str(caught.value)
    assert "sync_devices" in message
    assert "$.data[0].id: must be an integer" in message
    assert "$.data[1].account_address" in message


# -- the token -------------------------------------------------------------------------------


def test_token_is_renewed_a_minute_before_expiry(
    fake: FakeCentral, client: CentralClient, clock: ManualClock
) -> None:
    client.sync_devices()
    clock.offset = 3600 - 61
    client.sync_devices()
    assert _statuses(fake, "/hubs/connect") == [200]

    clock.offset = 3600 - 59
    client.sync_devices()
    assert _statuses(fake, "/hubs/connect") == [200, 200]
    assert 401 not in _statuses(fake, "/hubs/sync_devices")


def test_a_short_lived_token_is_renewed_before_the_central_refuses_it(
    fake: FakeCentral,
) -> None:
    fake.token_ttl = 0.4
    with CentralClient(fake.url, API_KEY) as client:
        client.sync_devices()
        time.sleep(0.45)
        client.sync_devices()

    assert _statuses(fake, "/hubs/connect") == [200, 200]
    assert _statuses(fake, "/hubs/sync_devices") == [200, 200]


def test_a_401_reconnects_and_retries_the_call_once(
    fake: FakeCentral, client: CentralClient
) -> None:
    client.activate_device("H001")
    fake.revoke_tokens()

    client.deactivate_device("H001")

    assert _statuses(fake, "/hubs/connect") == [200, 200]
    assert _statuses(fake, "/hubs/deactivate_device") == [401, 200]
    assert fake.active == set()


def test_a_second_401_is_not_retried_again(fake: FakeCentral, client: CentralClient) -> None:
    fake.token_ttl = 0  # every token is born expired

    with pytest.raises(CentralRejected, match="401: Invalid or expired token"):
        client.sync_devices()

    assert _statuses(fake, "/hubs/connect") == [200, 200]
    assert _statuses(fake, "/hubs/sync_devices") == [401, 401]


def test_a_wrong_api_key_is_rejected(fake: FakeCentral) -> None:
    with (
        CentralClient(fake.url, "not-the-key") as client,
        pytest.raises(CentralRejected, match="connect: rejected with HTTP 401: Invalid API key"),
    ):
        client.sync_devices()


# -- failures --------------------------------------------------------------------------------


def test_a_server_error_is_unavailable(fake: FakeCentral, client: CentralClient) -> None:
    client.sync_devices()
    fake.fail_with(500, "database is down")

    with pytest.raises(CentralUnavailable, match="HTTP 500: database is down") as caught:
        client.activate_device("H001")
    assert caught.value.status == 500

    fake.fail_with(None)
    assert client.activate_device("H001").success


def test_a_central_that_is_down_is_unavailable_at_once(
    fake: FakeCentral, client: CentralClient
) -> None:
    client.sync_devices()
    fake.down()

    started = time.monotonic()
    with pytest.raises(CentralUnavailable, match="Connection refused"):
        client.sync_devices()
    assert time.monotonic() - started < 1.0

    fake.up()  # the same port again: the same client recovers
    assert len(client.sync_devices()) == 2


def test_a_central_slower_than_the_timeout_is_unavailable(fake: FakeCentral) -> None:
    with CentralClient(fake.url, API_KEY, timeout=(1.0, 0.3)) as client:
        client.sync_devices()
        fake.slow(2.0)
        started = time.monotonic()
        with pytest.raises(CentralUnavailable, match="timed out"):
            client.sync_devices()
        assert time.monotonic() - started < 1.5
        fake.slow(0)


# -- readings --------------------------------------------------------------------------------


def test_readings_are_idempotent_by_batch_id(fake: FakeCentral, client: CentralClient) -> None:
    first = client.relay_readings(_batch("b-1"))
    again = client.relay_readings(_batch("b-1"))  # a retry after a lost answer
    client.relay_readings(_batch("b-2"))

    assert first.success
    assert again.success
    assert len(fake.readings) == 4  # b-1 once, b-2 once


def test_a_batch_id_reused_for_other_readings_is_rejected(client: CentralClient) -> None:
    client.relay_readings(_batch("b-1"))
    other = ReadingsBatch("b-1", _batch().readings[:1])

    with pytest.raises(CentralRejected) as caught:
        client.relay_readings(other)
    assert caught.value.status == 409


def test_a_central_without_readings_is_not_found(fake: FakeCentral, client: CentralClient) -> None:
    fake.set_readings_endpoint(False)

    with pytest.raises(CentralNotFound) as caught:
        client.relay_readings(_batch())
    assert caught.value.call == "readings"

    fake.set_readings_endpoint(True)
    assert client.relay_readings(_batch()).success


# -- secrets ---------------------------------------------------------------------------------


def test_the_api_key_and_token_never_show(
    fake: FakeCentral, client: CentralClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    failures: list[Exception] = []
    client.sync_devices()
    token = client._token  # the secret we look for
    assert token

    fake.fail_with(500, f"echo {API_KEY}")  # even a central that echoes the key
    fake.revoke_tokens()
    with pytest.raises(CentralUnavailable) as caught:
        client.sync_devices()
    failures.append(caught.value)
    fake.fail_with(None)

    fake.slow(1.0)
    with CentralClient(fake.url, API_KEY, timeout=(1.0, 0.2)) as slow_client:
        with pytest.raises(CentralUnavailable) as caught:
            slow_client.sync_devices()  # times out on /connect?api_key=...
        failures.append(caught.value)
    fake.slow(0)

    fake.down()
    with pytest.raises(CentralUnavailable) as caught:
        CentralClient(fake.url, API_KEY).connect()
    failures.append(caught.value)

    for failure in failures:
        for text in (str(failure), repr(failure), repr(failure.args)):
            assert API_KEY not in text
            assert token not in text
        assert failure.__cause__ is None
        assert failure.__context__ is None
    assert API_KEY not in repr(client)
    assert "api_key=***" in caplog.text  # urllib3's request line, redacted
    assert API_KEY not in caplog.text
    assert token not in caplog.text


# -- the wire module -------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=2**251 - 1), st.booleans())
def test_account_addresses_normalise_to_64_lower_case_digits(value: int, upper: bool) -> None:
    text = hex(value).upper().replace("0X", "0x") if upper else hex(value)

    normalised = normalise_address(text)

    assert len(normalised) == 66
    assert normalised == normalised.lower()
    assert int(normalised, 16) == value
    assert normalise_address(normalised) == normalised


@given(
    st.text(min_size=1, max_size=20),
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=10),
            st.floats(allow_nan=False, allow_infinity=False),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        max_size=5,
    ),
)
def test_a_readings_batch_round_trips(batch_id: str, rows: list[tuple[str, float, float]]) -> None:
    batch = ReadingsBatch(
        batch_id,
        [
            RelayedReading(
                d, "2026-12-04T16:00:00Z", v, c, v * c if abs(v * c) < 1e300 else 0.0, 0.0
            )
            for d, v, c in rows
        ],
    )

    assert structure_request(unstructure_request(batch), ReadingsBatch) == batch
