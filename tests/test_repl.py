"""The DebugActor's REPL against a running gateway (real Mosquitto, SQLite), and `estate repl`.

The gateway runs with its own REPL off; the tests start a DebugActor against its
supervisor, so they hold whether or not the Supervisor starts one itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from helpers import RawClient, clear_retained, mqtt_stats, register, wait_for

from actors.debug import DebugActor
from actors.gateway import Gateway
from actors.simulated_board import SimulatedBoard
from estate.device_wire import TopicKind, Topics
from estate.messages import GetBoardState, GetStats
from estate.repl import FRAME, Masker, mask_value

pytestmark = pytest.mark.integration

TOKEN = "repl-token-5f0c1e9a7b3d42"
API_KEY = "central-key-9d8e7f6a5b4c"
SECRETS = (TOKEN, API_KEY)
REPO = Path(__file__).resolve().parent.parent


class ReplClient:
    """A raw protocol client: send a line, get the output up to the next prompt."""

    def __init__(self, sock: socket.socket, token: str | None = None) -> None:
        self.sock = sock
        self.sock.settimeout(15)
        self.buffer = b""
        if token is not None:
            self.sock.sendall(token.encode() + b"\n")
        self.banner, self.prompt = self.read()

    @classmethod
    def unix(cls, path: str) -> ReplClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock)

    @classmethod
    def tcp(cls, address: str, token: str) -> ReplClient:
        host, _, port = address.rpartition(":")
        return cls(socket.create_connection((host, int(port)), timeout=10), token)

    def read(self) -> tuple[str, str | None]:
        """Output up to the next prompt, and that prompt (None: the server closed)."""
        frame = FRAME.encode()
        while self.buffer.count(frame) < 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                text, self.buffer = self.buffer.decode(), b""
                return text, None
            self.buffer += chunk
        output, prompt, self.buffer = self.buffer.split(frame, 2)
        return output.decode(), prompt.decode()

    def run(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        output, self.prompt = self.read()
        assert self.prompt is not None, f"the session ended after {line!r}: {output}"
        return output

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class ReplGateway:
    """A gateway with board H001 registered, a DebugActor against it, a simulated H001."""

    def __init__(self, make_settings: Callable[..., Any], broker_url: str, db_url: str, hub: str):
        self.broker_url, self.hub = broker_url, hub
        # short: a Unix socket path has at most 107 bytes; `run` does not exist yet
        self.folder = Path(tempfile.mkdtemp(prefix="repl-", dir="/tmp"))
        self.socket_path = str(self.folder / "run" / "repl.sock")
        common = {
            "DATABASE_URL": db_url,
            "MQTT_URL": broker_url,
            "DB_AUTO_MIGRATE": "false",
            "MQTT_SESSION_EXPIRY": "60",
            "REPL_TOKEN": TOKEN,
            "CENTRAL_API_KEY": API_KEY,
        }
        self.gateway_settings = make_settings(**common)  # REPL_SOCKET=off: no REPL of its own
        self.repl_settings = make_settings(
            **common, REPL_SOCKET=self.socket_path, REPL_TCP="127.0.0.1:0"
        )
        self.gateway: Gateway | None = None
        self.debug: pykka.ActorRef[Any] | None = None
        self.board: pykka.ActorRef[Any] | None = None

    def start(self, engine: Any) -> None:
        register(engine, "H001")
        probe = RawClient(self.broker_url)
        probe.publish(Topics(self.hub).of("H001", TopicKind.STATUS), b"offline", retain=True)
        probe.close()
        self.gateway = Gateway(self.gateway_settings).start()
        wait_for(
            lambda: mqtt_stats(self.gateway).get("received", 0) >= 1,
            15,
            "the gateway to connect and subscribe",
        )
        self.debug = self.start_debug()

    def start_debug(self, settings: Any = None) -> pykka.ActorRef[Any]:
        assert self.gateway is not None
        assert self.gateway.supervisor is not None
        ref = DebugActor.start(settings or self.repl_settings, supervisor=self.gateway.supervisor)
        ref.ask(GetStats(), timeout=10)  # its set-up has run: the sockets listen
        return ref

    def start_board(self) -> pykka.ActorRef[Any]:
        self.board = SimulatedBoard.start(
            self.broker_url, self.hub, "H001", interval=0.1, hello_interval=0.3
        )
        wait_for(lambda: self.board_state()["connected"], 15, "H001's handshake")
        return self.board

    def board_state(self) -> dict[str, Any]:
        assert self.board is not None
        return self.board.ask(GetBoardState(), timeout=10)

    @property
    def tcp_address(self) -> str:
        assert self.debug is not None
        return self.debug.ask(GetStats(), timeout=10)["tcp"]

    def stop(self) -> None:
        for ref in (self.board, self.debug):
            if ref is not None:
                with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                    ref.stop(block=True, timeout=10)
        if self.gateway is not None:
            self.gateway.stop()
        clear_retained(self.broker_url, self.hub, ["H001"])
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def repl_gateway(
    make_settings: Callable[..., Any],
    mosquitto_url: str,
    sqlite_url: str,
    hub: str,
    engine_for: Callable[[str], Any],
) -> Iterator[ReplGateway]:
    rg = ReplGateway(make_settings, mosquitto_url, sqlite_url, hub)
    try:
        rg.start(engine_for(sqlite_url))
        yield rg
    finally:
        rg.stop()


@pytest.fixture
def unix_client(repl_gateway: ReplGateway) -> Iterator[ReplClient]:
    client = ReplClient.unix(repl_gateway.socket_path)
    yield client
    client.close()


# -- the Unix socket ------------------------------------------------------------------------


def test_socket_is_private_and_removed_at_teardown(repl_gateway: ReplGateway) -> None:
    path = Path(repl_gateway.socket_path)
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # created by the actor
    assert [p.name for p in path.parent.iterdir()] == ["repl.sock"]  # no bind leftovers

    assert repl_gateway.debug is not None
    repl_gateway.debug.stop(block=True, timeout=10)
    repl_gateway.debug = None
    assert not path.exists()


class Sink(pykka.ThreadingActor):
    """Stands in for the supervisor of an actor whose set-up is meant to fail."""

    def on_receive(self, message: Any) -> None:
        return None


@contextlib.contextmanager
def unstarted_debug(settings: Any) -> Iterator[DebugActor]:
    """A DebugActor whose setup() a test calls itself (a failing start must not reach the
    gateway's supervisor, which would restart it)."""
    sink = Sink.start()
    actor = DebugActor(settings, supervisor=sink)
    try:
        yield actor
    finally:
        actor.teardown()
        sink.stop()


def test_stale_socket_is_replaced_and_live_one_refused(repl_gateway: ReplGateway) -> None:
    # a live REPL holds the path: a second actor must not steal it
    live = pytest.raises(FileExistsError, match="another process serves the REPL")
    with unstarted_debug(repl_gateway.repl_settings) as second, live:
        second.setup()
    assert ReplClient.unix(repl_gateway.socket_path).run("1 + 1") == "2\n"

    # a socket file nobody listens on (a gateway killed): replaced
    assert repl_gateway.debug is not None
    repl_gateway.debug.stop(block=True, timeout=10)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(repl_gateway.socket_path)
    stale.close()
    repl_gateway.debug = repl_gateway.start_debug()
    assert ReplClient.unix(repl_gateway.socket_path).run("1 + 1") == "2\n"
    assert stat.S_IMODE(os.stat(repl_gateway.socket_path).st_mode) == 0o600

    # a file that is not a socket is never removed
    repl_gateway.debug.stop(block=True, timeout=10)
    repl_gateway.debug = None
    Path(repl_gateway.socket_path).write_text("not a socket")
    not_socket = pytest.raises(FileExistsError, match="is not a socket")
    with unstarted_debug(repl_gateway.repl_settings) as third, not_socket:
        third.setup()
    assert Path(repl_gateway.socket_path).read_text() == "not a socket"


def test_devices_actors_device_and_errors(
    repl_gateway: ReplGateway, unix_client: ReplClient
) -> None:
    assert "help()" in unix_client.banner
    assert unix_client.prompt == ">>> "
    repl_gateway.start_board()

    table = unix_client.run("devices()")
    header, *rows = table.splitlines()
    assert header.split() == ["id", "status", "last", "reading", "balance", "load", "mailbox"]
    assert len(rows) == 1
    assert rows[0].split()[0] == "H001"

    wait_for(lambda: "online" in unix_client.run("devices()"), 15, "H001 online in devices()")

    names = [line.split()[0] for line in unix_client.run("actors()").splitlines()[1:]]
    assert {"supervisor", "db", "mqtt", "device:H001"} <= set(names)

    state = unix_client.run("device('H001')")
    assert "'device_id': 'H001'" in state
    assert "'mailbox':" in state
    assert unix_client.run("_['device_id']") == "'H001'\n"

    assert unix_client.run("device('NOPE')") == (
        "error: no device 'NOPE' is known (see devices())\n"
    )
    assert unix_client.run("send('NOPE', 2)").startswith("error: no device 'NOPE'")
    assert unix_client.run("send('H001', 7)").startswith("error: instruction 7")
    # the session goes on after errors, user exceptions and syntax errors
    assert "ZeroDivisionError" in unix_client.run("1 / 0")
    assert "SyntaxError" in unix_client.run("def (")
    assert unix_client.run("for i in range(2):") == ""
    assert unix_client.prompt == "... "
    assert unix_client.run("    print(i)") == ""
    assert unix_client.run("") == "0\n1\n"
    assert unix_client.run("x = 40") == ""
    assert unix_client.run("x + 2") == "42\n"


def test_send_toggles_the_boards_load(repl_gateway: ReplGateway, unix_client: ReplClient) -> None:
    repl_gateway.start_board()
    before = repl_gateway.board_state()["load_on"]
    assert before is True

    assert unix_client.run("send('H001', 2)") == "sent TOGGLE (2) to H001\n"
    wait_for(lambda: repl_gateway.board_state()["load_on"] is False, 10, "the load to go off")
    assert any(instr == 2 for _at, _bal, instr in repl_gateway.board_state()["commands"])

    unix_client.run("send('H001', 2)")
    wait_for(lambda: repl_gateway.board_state()["load_on"] is True, 10, "the load to go on")
    # the gateway sees it too, in the board's readings
    wait_for(
        lambda: "'load_on': True" in unix_client.run("device('H001')"), 10, "load_on in device()"
    )


def test_exit_ends_the_session_not_the_gateway(
    repl_gateway: ReplGateway, unix_client: ReplClient
) -> None:
    unix_client.sock.sendall(b"exit()\n")
    _output, prompt = unix_client.read()
    assert prompt is None
    assert ReplClient.unix(repl_gateway.socket_path).run("1 + 1") == "2\n"


# -- TCP and its token ----------------------------------------------------------------------


def _refused(sock: socket.socket) -> str:
    sock.settimeout(15)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    sock.close()
    return received.decode()


def test_tcp_needs_the_token(repl_gateway: ReplGateway) -> None:
    address = repl_gateway.tcp_address
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1"

    wrong = socket.create_connection((host, int(port)), timeout=10)
    wrong.sendall(b"not-the-token\n")
    assert _refused(wrong) == "estate repl: wrong or missing token; closing\n"

    prefix = socket.create_connection((host, int(port)), timeout=10)
    prefix.sendall(TOKEN[:-1].encode() + b"\n")
    assert _refused(prefix) == "estate repl: wrong or missing token; closing\n"

    missing = socket.create_connection((host, int(port)), timeout=10)
    missing.shutdown(socket.SHUT_WR)  # connects, sends nothing
    assert _refused(missing) == "estate repl: wrong or missing token; closing\n"

    empty = socket.create_connection((host, int(port)), timeout=10)
    empty.sendall(b"\n")
    assert _refused(empty) == "estate repl: wrong or missing token; closing\n"

    client = ReplClient.tcp(address, TOKEN)
    try:
        assert client.prompt == ">>> "
        assert client.run("devices()").splitlines()[1].split()[0] == "H001"
    finally:
        client.close()
    assert repl_gateway.debug is not None
    counts = repl_gateway.debug.ask(GetStats(), timeout=10)
    assert counts["refused"] == 4
    assert counts["sessions"] >= 1


def test_tcp_refuses_a_slow_token(repl_gateway: ReplGateway) -> None:
    assert repl_gateway.debug is not None
    repl_gateway.debug.stop(block=True, timeout=10)

    class Impatient(DebugActor):
        token_timeout = 0.5

    assert repl_gateway.gateway is not None
    repl_gateway.debug = Impatient.start(
        repl_gateway.repl_settings, supervisor=repl_gateway.gateway.supervisor
    )
    repl_gateway.debug.ask(GetStats(), timeout=10)
    host, _, port = repl_gateway.tcp_address.rpartition(":")
    silent = socket.create_connection((host, int(port)), timeout=10)
    assert _refused(silent) == "estate repl: wrong or missing token; closing\n"


def test_tcp_refuses_a_remote_address_without_permission(repl_gateway: ReplGateway) -> None:
    """Defence in depth: the actor checks again what the configuration checks."""
    import attrs

    remote = attrs.evolve(repl_gateway.repl_settings, repl_socket="off", repl_tcp="0.0.0.0:0")
    with unstarted_debug(remote) as actor, pytest.raises(ValueError, match="not a loopback"):
        actor.setup()
    tokenless = attrs.evolve(remote, repl_tcp="127.0.0.1:0", repl_token=None)
    with unstarted_debug(tokenless) as actor, pytest.raises(ValueError, match="needs REPL_TOKEN"):
        actor.setup()


# -- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_secrets_never_appear(repl_gateway: ReplGateway, transport: str) -> None:
    client = (
        ReplClient.unix(repl_gateway.socket_path)
        if transport == "unix"
        else ReplClient.tcp(repl_gateway.tcp_address, TOKEN)
    )
    try:
        outputs = {"banner": client.banner}
        for line in (
            "stats()",
            "help()",
            "dir()",
            "globals()",
            "locals()",
            "settings",
            "print(settings)",
            "repr(settings)",
            "vars()",
            "device('H001')",
            "devices()",
            "actors()",
            "help(stats)",
        ):
            outputs[line] = client.run(line)
    finally:
        client.close()
    assert "'mqtt'" in outputs["stats()"]
    assert "devices()" in outputs["help()"]
    assert "send(" in outputs["help()"]
    names = outputs["dir()"]
    for name in ("devices", "device", "actors", "send", "stats", "help"):
        assert f"'{name}'" in names
    assert "repl_token='***'" in outputs["settings"]
    assert "central_api_key='***'" in outputs["settings"]
    for line, output in outputs.items():
        for secret in SECRETS:
            assert secret not in output, f"{line!r} showed a secret: {output}"


def test_output_masks_secret_values_whatever_prints_them(unix_client: ReplClient) -> None:
    """Even code that digs a secret out of the process prints it masked."""
    output = unix_client.run("import os; os.environ.get('X'), " + repr(TOKEN) + "")
    assert TOKEN not in output
    assert "***" in output
    assert TOKEN not in unix_client.run(f"print({TOKEN!r})")


# -- the `estate repl` client ---------------------------------------------------------------


def _estate_repl(
    args: list[str], stdin: str, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "HOME": str(home),
        "LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "estate.cli", "--env-file", os.devnull, "repl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean,
        cwd=home,
        timeout=60,
        check=False,
    )


def test_estate_repl_client_end_to_end(repl_gateway: ReplGateway, tmp_path: Path) -> None:
    done = _estate_repl(
        ["--socket", repl_gateway.socket_path],
        "devices()\nactors()\nfor i in range(2):\n    print('row', i)\n\ndevice('NOPE')\n",
        home=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "help() lists the commands" in done.stdout
    assert "H001" in done.stdout
    assert "device:H001" in done.stdout
    assert "row 0\nrow 1\n" in done.stdout
    assert "error: no device 'NOPE'" in done.stdout
    assert FRAME not in done.stdout
    assert not (tmp_path / ".estate_repl_history").exists()  # no history when piped

    # the socket path from REPL_SOCKET, over TCP with a token file, and a wrong token
    by_env = _estate_repl(
        [], "1 + 1\n", env={"REPL_SOCKET": repl_gateway.socket_path}, home=tmp_path
    )
    assert by_env.returncode == 0, by_env.stderr
    assert "2\n" in by_env.stdout

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tcp = _estate_repl(
        ["--tcp", repl_gateway.tcp_address, "--token-file", str(token_file)],
        "stats()\n",
        home=tmp_path,
    )
    assert tcp.returncode == 0, tcp.stderr
    assert "mqtt" in tcp.stdout
    assert TOKEN not in tcp.stdout
    assert API_KEY not in tcp.stdout

    wrong = _estate_repl(
        ["--tcp", repl_gateway.tcp_address], "1 + 1\n", env={"REPL_TOKEN": "nope"}, home=tmp_path
    )
    assert wrong.returncode == 1
    assert "wrong or missing token" in wrong.stdout
    assert "2\n" not in wrong.stdout


def test_estate_repl_without_a_gateway(tmp_path: Path) -> None:
    missing = str(tmp_path / "nobody.sock")
    done = _estate_repl(["--socket", missing], "1 + 1\n", home=tmp_path)
    assert done.returncode == 1
    assert f"is the gateway running? REPL_SOCKET={missing}" in done.stderr

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(missing)
    stale.close()
    done = _estate_repl(["--socket", missing], "1 + 1\n", home=tmp_path)
    assert done.returncode == 1
    assert "is the gateway running?" in done.stderr

    no_token = _estate_repl(["--tcp", "127.0.0.1:9"], "", home=tmp_path)
    assert no_token.returncode == 2
    assert "REPL_TOKEN" in no_token.stderr


# -- the plain parts ------------------------------------------------------------------------


def test_mask_value_hides_secret_keys_and_url_passwords() -> None:
    masked = mask_value(
        {
            "broker": "mqtt://gw:hunter2@broker:1883",
            "api_key": "k-123",
            "token": None,
            "nested": [{"password": "pw"}, ("mqtts://a:b%40c@host",)],
            "count": 3,
        }
    )
    assert masked == {
        "broker": "mqtt://gw:***@broker:1883",
        "api_key": "***",
        "token": None,
        "nested": [{"password": "***"}, ("mqtts://a:***@host",)],
        "count": 3,
    }


def test_masker_knows_every_secret_setting(make_settings: Callable[..., Any]) -> None:
    settings = make_settings(
        MQTT_URL="mqtt://gw:s3cr%40t-pw@127.0.0.1:1883",
        REPL_TOKEN=TOKEN,
        CENTRAL_API_KEY=API_KEY,
        STARKNET_PRIVATE_KEY="0x00abcdef0123456789",
    )
    mask = Masker.of(settings)
    text = (
        f"{TOKEN} {API_KEY} s3cr%40t-pw s3cr@t-pw abcdef0123456789 {settings.starknet_private_key}"
    )
    assert mask(text) == "*** *** *** *** *** ***"
    assert "***" not in mask("nothing secret here")
    assert TOKEN not in repr(mask)
