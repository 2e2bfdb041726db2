"""`/healthz`, `/metrics` and `estate status` against a gateway on the real Mosquitto.

Each test starts a gateway, then a HealthServer of its own against `gateway.supervisor`
(the Supervisor does not start one yet), on an ephemeral port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
import pykka
import pytest
from helpers import board_state, clear_retained, mqtt_stats, register, wait_for
from prometheus_client.parser import text_string_to_metric_families

from actors.gateway import Gateway
from actors.health import HealthServer
from actors.simulated_board import SimulatedBoard
from estate.cli import main
from estate.config import Settings
from estate.db.engine import upgrade
from estate.embedded_broker import free_port
from estate.messages import GetHealthAddress, GetStats, PauseReadings
from estate.postgres import PostgresProcess

pytestmark = pytest.mark.integration


class Running:
    """A gateway and the HealthServer watching it; stops both."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gateway = Gateway(settings).start()
        assert self.gateway.supervisor is not None
        self.health = HealthServer.start(settings, supervisor=self.gateway.supervisor)
        self.address: str = self.health.ask(GetHealthAddress(), timeout=10)
        self.url = f"http://{self.address}"
        self.boards: list[pykka.ActorRef[Any]] = []

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=15) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def healthz(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/healthz")
        return status, json.loads(body)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = self.get("/metrics")
        assert status == 200, body
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def wait_health(self, code: int, timeout: float = 20) -> dict[str, Any]:
        last: list[Any] = []

        def check() -> dict[str, Any] | None:
            status, body = self.healthz()
            last[:] = [status, body]
            return body if status == code else None

        try:
            return wait_for(check, timeout, f"/healthz to answer {code}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {last}") from None

    def stop(self) -> None:
        for ref in self.boards:
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                ref.stop(block=True, timeout=10)
        with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
            self.health.stop(block=True, timeout=10)
        self.gateway.stop()


@pytest.fixture
def run_gateway(
    make_settings: Callable[..., Settings], mosquitto_url: str
) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(database_url: str, **env: str) -> Running:
        settings = make_settings(
            **{
                "DATABASE_URL": database_url,
                "MQTT_URL": mosquitto_url,
                "DB_AUTO_MIGRATE": "false",
                "MQTT_SESSION_EXPIRY": "60",
                **env,
            }
        )
        gateway = Running(settings)
        running.append(gateway)
        return gateway

    yield start
    for gateway in reversed(running):
        gateway.stop()


def closed_port() -> int:
    return free_port()  # free now, and nothing of ours will listen there


def test_healthz_is_ok_when_broker_database_and_supervisor_are(
    run_gateway: Callable[..., Running], db_url: str
) -> None:
    running = run_gateway(db_url)
    host, _, port = running.address.rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0  # HEALTH_ADDRESS=127.0.0.1:0: an ephemeral port, reported
    body = running.wait_health(200)
    assert body == {
        "status": "ok",
        "checks": {"supervisor": "ok", "broker": "ok", "database": "ok"},
    }
    assert running.health.ask(GetStats(), timeout=5) == {"address": running.address}
    status, text = running.get("/nope")
    assert status == 404, text


def test_healthz_names_the_broker_when_disconnected(
    run_gateway: Callable[..., Running], sqlite_url: str
) -> None:
    running = run_gateway(sqlite_url, MQTT_URL=f"mqtt://127.0.0.1:{closed_port()}")
    status, body = running.healthz()
    assert status == 503
    assert body["status"] == "degraded"
    assert body["checks"]["broker"].startswith("disconnected from mqtt://127.0.0.1:")
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["supervisor"] == "ok"
    metrics = running.metrics()
    assert metrics[("estate_mqtt_connected", ())] == 0


def test_healthz_says_when_the_supervisor_is_gone(
    run_gateway: Callable[..., Running], sqlite_url: str
) -> None:
    running = run_gateway(sqlite_url)
    running.wait_health(200)
    assert running.gateway.supervisor is not None
    running.gateway.supervisor.stop(block=True, timeout=10)  # the HealthServer stays
    status, body = running.healthz()
    assert status == 503
    assert body["checks"]["supervisor"] == "stopped"
    assert body["checks"]["broker"] == "unknown: the supervisor is stopped"
    metrics = running.metrics()
    assert metrics[("estate_introspection_up", ())] == 0


@pytest.fixture
def migrated_private_pg(private_pg: PostgresProcess) -> Iterator[PostgresProcess]:
    upgrade(private_pg.url)
    try:
        yield private_pg
    finally:
        if not private_pg.running:
            private_pg.start()  # the module's other tests get it running


def test_healthz_follows_the_database(
    run_gateway: Callable[..., Running], migrated_private_pg: PostgresProcess
) -> None:
    pg = migrated_private_pg
    running = run_gateway(pg.url)
    running.wait_health(200)

    pg.stop()
    body = running.wait_health(503)
    assert body["checks"]["database"].startswith("not writable: "), body
    assert body["checks"]["broker"] == "ok"
    assert body["checks"]["supervisor"] == "ok"

    pg.start()
    body = running.wait_health(200, timeout=30)
    assert body["checks"]["database"] == "ok"


def test_metrics_move_with_traffic(
    run_gateway: Callable[..., Running],
    sqlite_url: str,
    engine_for: Callable[[str], Any],
    mosquitto_url: str,
    hub: str,
) -> None:
    register(engine_for(sqlite_url), "H001", "H002")
    running = run_gateway(sqlite_url)
    wait_for(lambda: mqtt_stats(running.gateway)["connected"], 15, "the gateway to connect")
    # metrics are in a registry of the HealthServer's own, not the process-wide one
    assert prometheus_client.REGISTRY.get_sample_value("estate_readings_stored_total") is None

    def devices_started() -> dict[Any, float] | None:
        metrics = running.metrics()
        known = ("estate_actor_mailbox_depth", (("actor", "device:H002"),)) in metrics
        return metrics if known else None

    before = wait_for(devices_started, 15, "the device actors", interval=0.2)
    assert before[("estate_devices", (("status", "offline"),))] == 2
    assert before[("estate_devices", (("status", "online"),))] == 0
    assert before[("estate_readings_stored_total", ())] == 0
    assert before[("estate_mqtt_connected", ())] == 1
    assert before[("estate_actor_up", (("actor", "db"),))] == 1
    assert ("estate_actor_mailbox_depth", (("actor", "device:H001"),)) in before
    assert before[("estate_actor_restarts_total", (("actor", "mqtt"),))] == 0

    try:
        board = SimulatedBoard.start(mosquitto_url, hub, "H001", interval=0.05, hello_interval=0.5)
        running.boards.append(board)
        wait_for(lambda: len(board_state(board)["accepted"]) >= 20, 20, "20 accepted readings")
        board.tell(PauseReadings(True))
        accepted = len(board_state(board)["accepted"])

        def stored() -> dict[Any, float] | None:
            metrics = running.metrics()
            return metrics if metrics[("estate_readings_stored_total", ())] >= accepted else None

        after = wait_for(stored, 15, f"{accepted} readings stored in the metrics", interval=0.2)
    finally:
        clear_retained(mosquitto_url, hub, ["H001", "H002"])
    assert after[("estate_readings_received_total", ())] >= accepted
    assert after[("estate_devices", (("status", "online"),))] == 1
    assert after[("estate_devices", (("status", "offline"),))] == 1
    assert after[("estate_commands_sent_total", ())] >= 1  # at least the handshake
    assert after[("estate_mqtt_messages_received_total", ())] > accepted
    flushes = after[("estate_db_flush_seconds_count", ())]
    assert flushes >= 1
    assert after[("estate_db_flush_seconds_sum", ())] > 0
    assert after[("estate_db_batch_size_count", ())] == flushes
    assert after[("estate_db_batch_size_sum", ())] >= accepted
    assert after[("estate_readings_duplicate_total", ())] == 0
    assert after[("estate_db_failing", ())] == 0


def status_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(["--env-file", "/nonexistent/.env", "status", *argv])
    finally:
        # main() points the root logger at this test's captured stderr, closed afterwards
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err


def test_estate_status_healthy(
    run_gateway: Callable[..., Running],
    sqlite_url: str,
    engine_for: Callable[[str], Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register(engine_for(sqlite_url), "H001")
    running = run_gateway(sqlite_url)
    running.wait_health(200)
    monkeypatch.setenv("HEALTH_ADDRESS", running.address)  # the default address is HEALTH_ADDRESS
    code, out, err = status_cli(capsys)
    assert code == 0, (out, err)
    assert out.splitlines() == [
        f"gateway at http://{running.address}: healthy",
        "  checks: supervisor, broker, database ok",
        "  devices: 0 online of 1",
        "  readings: 0 stored, 0 rejected, 0 duplicates",
        "  restarts: none",
    ]


def test_estate_status_degraded(
    run_gateway: Callable[..., Running],
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = run_gateway(sqlite_url, MQTT_URL=f"mqtt://127.0.0.1:{closed_port()}")
    code, out, err = status_cli(capsys, "--address", running.address)
    assert code == 1, (out, err)
    lines = out.splitlines()
    assert lines[0] == f"gateway at http://{running.address}: DEGRADED"
    assert lines[1].startswith("  broker: disconnected from mqtt://127.0.0.1:")
    assert "  devices: 0 online of 0" in lines


def test_estate_status_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = status_cli(capsys, "--address", f"127.0.0.1:{closed_port()}")
    assert code == 2
    assert out == ""
    assert err.startswith("estate: gateway unreachable: nothing answers at http://127.0.0.1:")
    assert "Connection refused" in err


def test_health_address_off_listens_nowhere(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(HEALTH_ADDRESS="off")
    ref = pykka.ThreadingActor.start()  # stands for the supervisor: never asked here
    health = HealthServer.start(settings, supervisor=ref)
    try:
        assert health.ask(GetHealthAddress(), timeout=5) is None
    finally:
        health.stop(block=True, timeout=10)
        ref.stop()
