"""The deployment files: the production Mosquitto ACL against a real broker, and what can
be checked of the Dockerfile, compose file, entrypoint and systemd unit without a
container engine."""

from __future__ import annotations

import http.server
import json
import os
import pwd
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import paho.mqtt.client as mqtt
import pytest
import yaml

from estate.config import Settings, load_settings
from estate.device_wire import Topics
from estate.mosquitto import MosquittoProcess

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PRODUCTION_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
PRODUCTION_ACL = DEPLOY / "mosquitto" / "acl"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"
SETTING_NAMES = {field.metadata["env"] for field in attrs.fields(Settings)}
PASSWORDS = {"gateway": "gateway-secret", "H001": "h001-secret", "H002": "h002-secret"}


# -- a real Mosquitto with the shipped production configuration ---------------------------


def _production_config(port: int, folder: Path, acl: Path) -> str:
    """deploy/mosquitto/mosquitto.conf with only the port, the paths and the user changed."""
    text = PRODUCTION_CONF.read_text()
    replacements = {
        r"^listener 1883$": f"listener {port} 127.0.0.1",
        r"^password_file .*$": f"password_file {folder / 'passwd'}",
        r"^acl_file .*$": f"acl_file {acl}",
        r"^persistence_location .*$": f"persistence_location {folder}/",
        r"^log_dest stdout$": "log_dest stderr",  # into the private broker's log file
    }
    for pattern, line in replacements.items():
        text, count = re.subn(pattern, line, text, flags=re.MULTILINE)
        assert count == 1, f"the production configuration has no line {pattern!r}"
    # Started as root, Mosquitto would switch to the `mosquitto` user, who cannot read
    # the test's private folder: run as whoever runs the tests.
    return f"user {pwd.getpwuid(os.geteuid()).pw_name}\n{text}"


def _start_broker(acl_text: str | None = None) -> MosquittoProcess:
    broker = MosquittoProcess()
    passwd = broker.folder / "passwd"
    for index, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run([MOSQUITTO_PASSWD, *create, "-b", str(passwd), user, password], check=True)
    acl = PRODUCTION_ACL
    if acl_text is not None:
        acl = broker.folder / "acl"
        acl.write_text(acl_text)
    broker.config.write_text(_production_config(broker.port, broker.folder, acl))
    try:
        return broker.start()
    except BaseException:
        broker.stop()
        raise


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoProcess]:
    if not Path(MOSQUITTO_PASSWD).exists():
        pytest.fail(f"{MOSQUITTO_PASSWD} is missing (apt-get install mosquitto-clients)")
    process = _start_broker()
    yield process
    process.stop()


class Client:
    """A paho client that records its CONNACK, SUBACKs, PUBACKs and messages."""

    def __init__(
        self,
        port: int,
        username: str | None = None,
        password: str | None = None,
        protocol: int = mqtt.MQTTv5,
    ) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: Any = None
        self.subacks: dict[int, list[Any]] = {}
        self.pubacks: dict[int, Any] = {}
        self._connected = threading.Event()
        self._acked = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-{username}-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), "no CONNACK within 10 s"

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _p: Any) -> None:
        self.connack = reason_code
        if reason_code.is_failure:
            self.client.disconnect()  # no reconnection attempts
        self._connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        with self._acked:
            self.subacks[mid] = codes
            self._acked.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        with self._acked:
            self.pubacks[mid] = reason_code
            self._acked.notify_all()

    @property
    def refused(self) -> bool:
        return self.connack.is_failure

    def subscribe(self, *topics: str) -> list[Any]:
        """Subscribe at QoS 1; the SUBACK's reason codes, one per topic."""
        _result, mid = self.client.subscribe([(topic, 1) for topic in topics])
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self.subacks, 10), "no SUBACK"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Any:
        """Publish at QoS 1; the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.pubacks, 10), "no PUBACK"
            return self.pubacks[info.mid]

    def receive_until(self, marker: bytes, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """Every message up to and including the first whose payload is `marker`."""
        received = []
        while True:
            try:
                message = self.messages.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{marker!r} did not arrive; got {received}") from None
            received.append(message)
            if message[1] == marker:
                return received

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect(broker: MosquittoProcess) -> Iterator[Any]:
    clients: list[Client] = []

    def make(user: str | None, protocol: int = mqtt.MQTTv5, password: str | None = None) -> Client:
        client = Client(broker.port, user, password or PASSWORDS.get(user or ""), protocol=protocol)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _hub() -> str:
    return f"hub{uuid.uuid4().hex[:8]}"


@pytest.mark.integration
def test_a_board_publishes_its_own_topics_to_the_gateway(connect: Any) -> None:
    hub = _hub()
    topics = Topics(hub)
    gateway = connect("gateway")
    assert not gateway.refused
    codes = gateway.subscribe(*topics.inbound_filters)  # what the gateway really subscribes
    assert not any(code.is_failure for code in codes), codes

    board = connect("H001")
    sent = {
        f"{hub}/devices/H001/hello": b'{"device_id": "H001"}',
        f"{hub}/devices/H001/status": b"online",
        f"{hub}/devices/H001/telemetry": b'{"current": 0.42, "voltage": 12.1}',
    }
    for topic, payload in sent.items():
        assert not board.publish(topic, payload, retain=topic.endswith("status")).is_failure
    received = gateway.receive_until(sent[f"{hub}/devices/H001/telemetry"])
    assert dict(received) == sent


@pytest.mark.integration
@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["3.1.1", "5"])
def test_a_board_cannot_publish_for_another_board_or_forge_commands(
    connect: Any, protocol: int
) -> None:
    hub = _hub()
    gateway = connect("gateway")
    gateway.subscribe(f"{hub}/#")
    board = connect("H001", protocol=protocol)
    forged = [
        f"{hub}/devices/H002/telemetry",
        f"{hub}/devices/H002/hello",
        f"{hub}/devices/H002/status",
        f"{hub}/devices/H001/command",  # its own command topic: read only
        f"{hub}/devices/H002/command",
        f"{hub}/commands",  # the central's commands
    ]
    for topic in forged:
        reason = board.publish(topic, b"forged")
        if protocol == mqtt.MQTTv5:  # 3.1.1 has no way to say no: Mosquitto drops it
            assert reason.is_failure, (topic, reason)
    # The board's own reading, sent after the forged ones, arrives after them if at all.
    assert not board.publish(f"{hub}/devices/H001/telemetry", b"marker").is_failure
    received = gateway.receive_until(b"marker")
    assert received == [(f"{hub}/devices/H001/telemetry", b"marker")]


@pytest.mark.integration
def test_a_board_reads_only_its_own_commands(connect: Any) -> None:
    hub = _hub()
    board = connect("H001")
    board.subscribe(f"{hub}/devices/H002/command")  # granted by Mosquitto 2.0, never fed
    board.subscribe(f"{hub}/devices/+/command", f"{hub}/devices/+/telemetry", f"{hub}/#")
    own = board.subscribe(f"{hub}/devices/H001/command")
    assert not own[0].is_failure, own

    other = connect("H002")
    assert not other.publish(f"{hub}/devices/H002/telemetry", b"private").is_failure
    gateway = connect("gateway")
    assert not gateway.publish(f"{hub}/devices/H002/command", b"5,2\n").is_failure
    assert not gateway.publish(f"{hub}/devices/H001/command", b"7,1\n").is_failure

    received = board.receive_until(b"7,1\n")
    assert {topic for topic, _ in received} == {f"{hub}/devices/H001/command"}, received


@pytest.mark.integration
def test_the_gateway_may_use_the_uplink_topics_and_sys(connect: Any) -> None:
    hub = _hub()
    gateway = connect("gateway")
    assert not gateway.subscribe(f"{hub}/commands")[0].is_failure
    assert not gateway.publish(f"{hub}/power/7", b'{"power": 5.08}').is_failure
    assert gateway.publish(f"{hub}/devices/H001/status", b"offline").is_failure  # a board's
    # docker-compose.yml's health check of Mosquitto reads this as the gateway.
    gateway.subscribe("$SYS/broker/uptime")
    assert gateway.messages.get(timeout=10)[0] == "$SYS/broker/uptime"


@pytest.mark.integration
@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["3.1.1", "5"])
@pytest.mark.parametrize(
    ("user", "password"), [(None, None), ("H001", "wrong"), ("H003", "h001-secret")]
)
def test_clients_without_valid_credentials_are_refused(
    connect: Any, protocol: int, user: str | None, password: str | None
) -> None:
    client = connect(user, protocol=protocol, password=password)
    assert client.refused, client.connack


@pytest.mark.integration
def test_the_documented_sed_pins_the_acl_to_one_hub(tmp_path: Path) -> None:
    command = re.search(r"^#\s+(sed -i .*) acl$", PRODUCTION_ACL.read_text(), re.MULTILINE)
    assert command, "the ACL documents how to pin the hub with sed"
    acl = tmp_path / "acl"
    shutil.copy(PRODUCTION_ACL, acl)
    subprocess.run([*shlex.split(command.group(1)), str(acl)], check=True)
    assert "myhub/devices/%u/telemetry" in acl.read_text()
    assert "+/devices/" not in acl.read_text().split("user gateway", 1)[1]

    pinned = _start_broker(acl.read_text())
    clients = []
    try:
        gateway = Client(pinned.port, "gateway", PASSWORDS["gateway"])
        board = Client(pinned.port, "H001", PASSWORDS["H001"])
        clients += [gateway, board]
        gateway.subscribe("myhub/devices/+/telemetry")
        assert board.publish("otherhub/devices/H001/telemetry", b"elsewhere").is_failure
        assert not board.publish("myhub/devices/H001/telemetry", b"here").is_failure
        assert gateway.receive_until(b"here") == [("myhub/devices/H001/telemetry", b"here")]
    finally:
        for client in clients:
            client.close()
        pinned.stop()


def test_the_production_broker_keeps_the_no_loss_limits() -> None:
    def directives(path: Path) -> dict[str, str]:
        lines = (line.split(None, 1) for line in path.read_text().splitlines())
        return {words[0]: words[1].strip() for words in lines if words and words[0][0] != "#"}

    production = directives(PRODUCTION_CONF)
    for name, value in directives(DEPLOY / "mosquitto.conf").items():
        if name not in {"listener", "allow_anonymous", "persistence_location"}:
            assert production.get(name) == value, name
    assert production["allow_anonymous"] == "false"
    assert production["password_file"] == "/mosquitto/config/passwd"
    assert production["acl_file"] == "/mosquitto/config/acl"


# -- Dockerfile ---------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in _instructions(ROOT / "Dockerfile"):
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, arguments))
    return stages


def _all(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for name, arguments in stage if name == keyword]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(word.split("=", 1) for line in _all(stage, "ENV") for word in shlex.split(line))


def test_the_image_is_built_in_two_stages_and_ships_only_wheels() -> None:
    builder, final = _stages()
    assert re.fullmatch(r"python:3\.11-slim AS builder", builder[0][1], re.IGNORECASE)
    assert any("pip wheel" in run for run in _all(builder, "RUN"))
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:\w+)?", final[0][1])
    installs = [run for run in _all(final, "RUN") if "pip install" in run]
    assert installs, "the final stage installs the wheels"
    assert all("--no-index" in run and "from=builder" in run for run in installs)
    for run in _all(final, "RUN"):
        assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|python3-dev)\b", run), run
    copied = [word for line in _all(builder, "COPY") for word in line.split()[:-1]]
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"


def test_the_image_runs_as_a_non_root_user_with_a_data_volume() -> None:
    final = _stages()[-1]
    user = _all(final, "USER")[-1].split(":")[0]
    assert user not in {"root", "0"}
    workdir = _all(final, "WORKDIR")[-1]
    volumes = [v for line in _all(final, "VOLUME") for v in json.loads(line)]
    assert workdir in volumes
    env = _env(final)
    assert env["DATABASE_URL"] == f"sqlite:///{workdir}/estate.db"
    for name in env:
        assert name in SETTING_NAMES or name.startswith(("PYTHON", "PIP_")), name
    assert load_settings(environ=env, env_file=None).health_address == "0.0.0.0:9480"


def test_the_entrypoint_migrates_then_execs_estate_run() -> None:
    final = _stages()[-1]
    entrypoint = json.loads(_all(final, "ENTRYPOINT")[-1])
    copies = [line.split() for line in _all(final, "COPY")]
    assert ["--chmod=0755", "deploy/docker-entrypoint.sh", entrypoint[0]] in copies
    script = (DEPLOY / "docker-entrypoint.sh").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and line[0] != "#"]
    assert commands == ["set -eu", "estate db upgrade", 'exec estate run "$@"']
    readme = (ROOT / "README.md").read_text()
    assert "estate db upgrade" in readme
    assert "estate run" in readme


def test_the_entrypoint_stops_when_the_migration_fails(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    fake = tmp_path / "estate"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n[ "$1" != db ] || exit "$FAIL"\n')
    fake.chmod(0o755)
    entrypoint = str(DEPLOY / "docker-entrypoint.sh")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAIL": "0"}
    subprocess.run(["sh", entrypoint, "--simulate", "2"], env=env, check=True)
    assert log.read_text().splitlines() == ["db upgrade", "run --simulate 2"]
    log.unlink()
    failed = subprocess.run(["sh", entrypoint], env={**env, "FAIL": "3"}, check=False)
    assert failed.returncode == 3
    assert log.read_text().splitlines() == ["db upgrade"]


def test_the_commands_the_entrypoint_and_unit_run_exist() -> None:
    estate = Path(sys.executable).parent / "estate"
    for command in (["db", "upgrade"], ["run"]):
        done = subprocess.run(
            [str(estate), *command, "--help"], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_healthcheck_asks_healthz_on_health_address(status: int, healthy: bool) -> None:
    line = _all(_stages()[-1], "HEALTHCHECK")[-1]
    command = json.loads(line[line.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"0.0.0.0:{server.server_address[1]}"
        env = {**os.environ, "HEALTH_ADDRESS": address}
        check = subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, check=False
        )
        assert (check.returncode == 0) is healthy, check.stderr
        off_env = {**env, "HEALTH_ADDRESS": "off"}
        off = subprocess.run([sys.executable, *command[1:]], env=off_env, check=False)
        assert off.returncode == 0
    finally:
        server.shutdown()
        server.server_close()


# -- docker-compose.yml -------------------------------------------------------------------


def _interpolate(value: str, env: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name, kind, default = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        assert kind != ":?", f"{name} is required"
        return default or ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value).replace("$$", "$")


def test_compose_configures_the_gateway_with_real_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["postgres"]["image"].startswith("postgres:15")
    assert "./deploy/mosquitto:/mosquitto/config:ro" in services["mosquitto"]["volumes"]
    gateway = services["gateway"]
    assert gateway["build"] == "."
    for dependency, condition in gateway["depends_on"].items():
        assert condition == {"condition": "service_healthy"}
        assert services[dependency]["healthcheck"]["test"]
    assert any(volume.endswith(":/var/lib/estate") for volume in gateway["volumes"])

    environment = gateway["environment"]
    assert set(environment) <= SETTING_NAMES, set(environment) - SETTING_NAMES
    secrets = {"GATEWAY_MQTT_PASSWORD": "m0squitto", "POSTGRES_PASSWORD": "p0stgres"}
    env = {name: _interpolate(str(value), secrets) for name, value in environment.items()}
    settings = load_settings(environ=env, env_file=None)
    assert settings.database_url == "postgresql://estate:p0stgres@postgres:5432/estate"
    assert settings.mqtt_url == "mqtt://gateway:m0squitto@mosquitto:1883"
    assert settings.health_address == "0.0.0.0:9480"
    assert settings.hub_name == "estate"


def test_the_systemd_environment_example_holds_real_settings() -> None:
    example = DEPLOY / "estate-gateway.env.example"
    env = dict(
        line.split("=", 1)
        for line in example.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert set(env) <= SETTING_NAMES
    assert load_settings(environ=env, env_file=None).mqtt_url


# -- systemd ------------------------------------------------------------------------------


def test_the_systemd_unit_migrates_then_runs_the_gateway_hardened() -> None:
    unit: dict[str, list[str]] = {}
    for line in (DEPLOY / "estate-gateway.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            unit.setdefault(key.strip(), []).append(value.strip())

    def argv(key: str) -> list[str]:
        (value,) = unit[key]
        words = shlex.split(value)
        assert words[0].startswith("/"), f"{key} needs an absolute path"
        return [Path(words[0]).name, *words[1:]]

    assert argv("ExecStart") == ["estate", "run"]
    assert argv("ExecStartPre") == ["estate", "db", "upgrade"]
    assert unit["EnvironmentFile"] == ["/etc/estate-gateway.env"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"][0] not in {"root", "0"}
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["WorkingDirectory"] == [f"/var/lib/{unit['StateDirectory'][0]}"]
