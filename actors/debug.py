"""DebugActor: a Python REPL into the running gateway, on a Unix socket (and optionally TCP).

The actor owns the listening sockets; each connection is served on its own daemon
thread by `ReplService`. A session's namespace holds only functions that ask the
actors through `Introspection` (with timeouts): nothing reads an actor's attributes,
and no settings object with secrets is reachable by name. Output is masked: the
secret settings' values and URL passwords never leave as text.

This is an operator's tool: whoever can connect runs Python inside the gateway.
The Unix socket is mode 0600 in a directory of its owner; a TCP REPL needs a token
and a loopback address unless REPL_ALLOW_REMOTE is set.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import os
import pprint
import pydoc
import shutil
import socket
import socketserver
import stat
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pykka

from actors.base import EstateActor, handles
from actors.introspection import Introspection, UnknownDevice
from estate.config import LOOPBACK, Settings
from estate.device_wire import Instruction
from estate.messages import GetStats
from estate.repl import (
    REFUSED,
    Masker,
    SessionOutput,
    format_table,
    mask_value,
    run_session,
)

__all__ = ["DebugActor", "ReplService", "repl_namespace"]

TOKEN_TIMEOUT = 10.0
"""Seconds a TCP client has to send its token."""

UNIX_PATH_MAX = 107


# -- the namespace ------------------------------------------------------------------------------

COMMANDS = """\
devices()              every device: id, status, last reading, balance, load, mailbox
device('H001')         one device's full state (a dict)
actors()               every actor: name, kind, alive, mailbox depth, restarts
send('H001', 2)        send an instruction to a board: 0 disconnect, 1 persist,
                       2 toggle the load, 3 balance updated
stats()                counters of the supervisor and the core actors
sync()                 sync the devices with the central now
ledger()               token ledger: entries and SCT by state, and the signer's state
settings               the gateway's settings (secrets masked)
help()                 this list; help(obj) documents obj
exit() or Ctrl-D       leave (the gateway keeps running)
"""


class _Shown:
    """Shows a fixed text as its repr (the masked settings): holds nothing else."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


class _Exit:
    """`exit()` / `quit()`: ends the session, not the gateway."""

    def __repr__(self) -> str:
        return "Use exit() or Ctrl-D to leave the REPL"

    def __call__(self, *_args: Any) -> None:
        raise SystemExit


def repl_namespace(
    introspection: Introspection, out: SessionOutput, settings_text: str
) -> dict[str, Any]:
    """One session's namespace: the commands, bound to the session's output."""
    say = functools.partial(print, file=out)

    def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
        """Report a missing device or a silent actor as one line; the session goes on."""

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except UnknownDevice as exc:
                say(f"error: {exc.args[0]}")
            except pykka.Timeout:
                say(f"error: no answer within {introspection.timeout:g}s (actor busy or stuck)")
            except pykka.ActorDeadError as exc:
                say(f"error: the actor has stopped ({exc})")
            return None

        return run

    @guarded
    def devices() -> None:
        """Print every device: id, status, last reading time, balance, load, mailbox depth."""
        rows = sorted(introspection.devices(), key=lambda r: str(r.get("device_id")))
        if not rows:
            say("no devices known")
            return
        say(
            format_table(
                ("id", "status", "last reading", "balance", "load", "mailbox"),
                (
                    (
                        row.get("device_id"),
                        row.get("status"),
                        _when(row.get("last_reading_at")),
                        row.get("balance"),
                        _load(row.get("load_on")),
                        row.get("mailbox"),
                    )
                    for row in rows
                ),
            ),
            end="",
        )

    @guarded
    def device(device_id: str) -> dict[str, Any]:
        """The full state of one device, as its actor reports it."""
        return mask_value(introspection.device(str(device_id)))

    @guarded
    def actors() -> None:
        """Print every actor: name, kind, alive, mailbox depth, restarts."""
        say(
            format_table(
                ("name", "kind", "alive", "mailbox", "restarts"),
                (
                    (
                        a["name"],
                        a["kind"],
                        "yes" if a["alive"] else "NO",
                        a["mailbox"],
                        a["restarts"],
                    )
                    for a in introspection.actors()
                ),
            ),
            end="",
        )

    @guarded
    def send(device_id: str, instruction: int) -> None:
        """Have the device's actor send an instruction (0-3) to its board."""
        try:
            what = Instruction(int(instruction))
        except (TypeError, ValueError):
            say(
                f"error: instruction {instruction!r}: expected 0 (disconnect), 1 (persist), "
                "2 (toggle the load) or 3 (balance updated)"
            )
            return
        introspection.send(str(device_id), int(what))
        say(f"sent {what.name} ({int(what)}) to {device_id}")

    @guarded
    def stats() -> None:
        """Print the counters of the supervisor and of each core actor (secrets masked)."""
        say(pprint.pformat(mask_value(introspection.stats()), sort_dicts=False))

    @guarded
    def sync() -> None:
        """Sync the devices with the central now (when a central is configured)."""
        say("sync asked of the central" if introspection.sync() else "error: no central")

    @guarded
    def ledger() -> None:
        """Print the token ledger (entries and SCT by state) and the signer's counters."""
        say(_ledger_text(introspection))

    def help(thing: Any = None) -> None:
        """List the REPL's commands, or document `thing`."""
        if thing is None:
            say(COMMANDS, end="")
        else:
            say(pydoc.render_doc(thing, renderer=pydoc.plaintext), end="")

    import builtins

    return {
        "__name__": "__repl__",
        "__doc__": "estate gateway REPL: help() lists the commands",
        "__builtins__": builtins,
        "devices": devices,
        "device": device,
        "actors": actors,
        "send": send,
        "stats": stats,
        "sync": sync,
        "ledger": ledger,
        "help": help,
        "settings": _Shown(settings_text),
        "print": say,
        "exit": _Exit(),
        "quit": _Exit(),
    }


def _ledger_text(introspection: Introspection) -> str:
    summary = introspection.ledger()
    if summary is None:
        return "error: token accounting is off (STARKNET_RPC_URL is unset)"
    signer = introspection.stats().get("signer", {})
    return pprint.pformat({"ledger": summary, "signer": signer}, sort_dicts=False)


def _when(value: Any) -> str | None:
    if value is None:
        return None
    iso = getattr(value, "isoformat", None)
    return iso(timespec="seconds") if iso else str(value)


def _load(value: Any) -> str:
    return {True: "on", False: "off"}.get(value, "?")


# -- the sessions -------------------------------------------------------------------------------


class ReplService:
    """Serves connections, each on its caller's thread; thread-safe (its own lock)."""

    def __init__(
        self,
        introspection: Introspection,
        settings: Settings,
        token_timeout: float = TOKEN_TIMEOUT,
    ) -> None:
        self.introspection = introspection
        self.hub = settings.hub_name
        self._token = (settings.repl_token or "").encode()
        self._mask = Masker.of(settings)
        self._settings_text = self._mask(repr(settings))
        self.token_timeout = token_timeout
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self._open: set[socket.socket] = set()
        self.counts = {"sessions": 0, "refused": 0}

    def serve(self, sock: socket.socket, peer: str, need_token: bool) -> None:
        with self._lock:
            self._open.add(sock)
        try:
            self._serve(sock, peer, need_token)
        except OSError as exc:  # the client went away mid-session
            self._log().info("repl session %s ended: %s", peer, exc)
        finally:
            with self._lock:
                self._open.discard(sock)
                self._ended.notify_all()

    def _serve(self, sock: socket.socket, peer: str, need_token: bool) -> None:
        log = self._log()
        sock.settimeout(self.token_timeout)
        rfile = sock.makefile("rb")
        if need_token:
            try:
                given = rfile.readline(1024).rstrip(b"\r\n")
            except TimeoutError:
                given = b""
            if not self._token or not hmac.compare_digest(given, self._token):
                self._refuse(sock, peer, "wrong or missing token")
                return
        elif (uid := _peer_uid(sock)) is not None and uid not in (os.getuid(), 0):
            self._refuse(sock, peer, f"peer uid {uid}")
            return
        sock.settimeout(None)
        with self._lock:
            self.counts["sessions"] += 1
        log.info("repl session opened (%s)", peer)
        out = SessionOutput(sock.sendall, self._mask)
        namespace = repl_namespace(self.introspection, out, self._settings_text)
        banner = (
            f"estate gateway REPL, hub {self.hub!r}. help() lists the commands; Ctrl-D leaves.\n"
        )
        run_session(rfile, out, namespace, banner)
        log.info("repl session closed (%s)", peer)

    def _refuse(self, sock: socket.socket, peer: str, why: str) -> None:
        with self._lock:
            self.counts["refused"] += 1
        self._log().warning("repl connection from %s refused: %s", peer, why)
        with contextlib.suppress(OSError):
            sock.sendall(REFUSED.encode())

    def close_sessions(self, timeout: float = 5.0) -> None:
        """End every open session and wait for their threads to finish (a session in the
        middle of an ask finishes it first: at most the introspection's timeout)."""
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._ended:
            if not self._ended.wait_for(lambda: not self._open, timeout):
                self._log().warning("%d REPL sessions did not end in time", len(self._open))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {**self.counts, "open": len(self._open)}

    @staticmethod
    def _log() -> Any:
        import logging

        return logging.getLogger("estate.debug")


def _peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's uid on a Unix socket (Linux), else None."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or sock.family != socket.AF_UNIX:
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, 12))
    except OSError:
        return None
    return uid


class _Handler(socketserver.BaseRequestHandler):
    server: _UnixServer | _TcpServer

    def handle(self) -> None:
        server = self.server
        peer = server.peer_name(self.client_address)
        server.service.serve(self.request, peer, server.need_token)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    need_token = False

    def __init__(self, service: ReplService) -> None:
        super().__init__("", _Handler, bind_and_activate=False)
        self.service = service

    def peer_name(self, _address: Any) -> str:
        return "unix socket"


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    need_token = True

    def __init__(self, service: ReplService, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler, bind_and_activate=True)
        self.service = service

    def peer_name(self, address: Any) -> str:
        return f"tcp {address[0]}:{address[1]}"


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


# -- the actor ----------------------------------------------------------------------------------


class DebugActor(EstateActor):
    """Owns the REPL's listening sockets; the sessions ask the other actors."""

    kind = "debug"
    token_timeout = TOKEN_TIMEOUT

    def __init__(self, settings: Settings, supervisor: pykka.ActorRef[Any]) -> None:
        super().__init__("debug", supervisor)
        self.settings = settings
        self.service: ReplService | None = None
        self.servers: list[tuple[socketserver.BaseServer, threading.Thread]] = []
        self.socket_path: str | None = None
        self.socket_inode: int | None = None
        self.tcp_address: str | None = None

    def setup(self) -> None:
        assert self.supervisor is not None
        self.service = ReplService(
            Introspection(self.supervisor), self.settings, token_timeout=self.token_timeout
        )
        if (path := self.settings.repl_socket_path) is not None:
            server = _UnixServer(self.service)
            self._bind_unix(server, path)
            self._serve(server, "repl-unix")
            self.log.info("REPL on unix socket %s (estate repl)", path)
        if self.settings.repl_tcp is not None:
            tcp = self._tcp_server(self.settings.repl_tcp)
            host, port = tcp.server_address[:2]
            self.tcp_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self._serve(tcp, "repl-tcp")
            self.log.info("REPL on tcp %s (token required)", self.tcp_address)

    def teardown(self) -> None:
        for server, thread in self.servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        self.servers = []
        if self.service is not None:
            self.service.close_sessions()
        self._remove_socket_file()

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        return {
            "unix_socket": self.socket_path,
            "tcp": self.tcp_address,
            **(self.service.snapshot() if self.service else {}),
        }

    # -- sockets -------------------------------------------------------------------------

    def _serve(self, server: socketserver.BaseServer, name: str) -> None:
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name=name, daemon=True
        )
        thread.start()
        self.servers.append((server, thread))

    def _bind_unix(self, server: _UnixServer, path: str) -> None:
        """Bind at `path`, mode 0600 before anyone can connect, replacing a stale socket."""
        if len(os.fsencode(path)) > UNIX_PATH_MAX - 16:
            server.server_close()
            raise ValueError(f"REPL_SOCKET={path!r}: too long for a Unix socket path")
        parent = Path(path).parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = parent.stat().st_uid
        if owner not in (os.getuid(), 0):
            server.server_close()
            raise PermissionError(
                f"{parent} belongs to uid {owner}, not to this user: refusing to put the "
                "REPL socket there (set REPL_SOCKET)"
            )
        _clear_stale(path)
        # bind in a private directory, chmod, then rename into place: the socket is 0600
        # from the moment it is reachable at `path` (no umask games across threads)
        private = tempfile.mkdtemp(prefix=".estate-repl-", dir=parent)
        try:
            temporary = os.path.join(private, "s")
            server.server_address = temporary
            server.server_bind()
            os.chmod(temporary, 0o600)
            os.rename(temporary, path)
            self.socket_path = path
            self.socket_inode = os.lstat(path).st_ino
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def _tcp_server(self, address: str) -> _TcpServer:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        token = self.settings.repl_token
        if not token:
            raise ValueError(f"REPL_TCP={address!r}: a TCP REPL needs REPL_TOKEN")
        if not _is_loopback(host) and not self.settings.repl_allow_remote:
            raise ValueError(
                f"REPL_TCP={address!r}: not a loopback address and REPL_ALLOW_REMOTE is off"
            )
        server_class = _Tcp6Server if ":" in host else _TcpServer
        return server_class(self.service, (host, int(port)))  # type: ignore[arg-type]

    def _remove_socket_file(self) -> None:
        """Remove the socket file if it is still ours (not a newer gateway's)."""
        path, inode = self.socket_path, self.socket_inode
        self.socket_path = self.socket_inode = None
        if path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_ino == inode:
                os.unlink(path)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _clear_stale(path: str) -> None:
    """Remove a socket nobody listens on; refuse to touch a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket: not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: left by a gateway that died
        return
    except OSError as exc:
        raise OSError(f"cannot check the existing REPL socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise FileExistsError(f"another process serves the REPL at {path}: not replacing it")
