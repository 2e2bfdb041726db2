"""The `estate` command: run the gateway, manage its database and devices, simulate boards."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from estate.config import ConfigError, Settings, load_settings
from estate.logs import configure_logging

__all__ = ["main"]

logger = logging.getLogger("estate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="estate", description=__doc__)
    parser.add_argument("--env-file", default=".env", help="optional .env file (default .env)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--simulate", type=int, default=0, metavar="N", help="also run N boards")
    run.add_argument("--interval", type=float, default=1.0, help="simulated reading interval")

    db = commands.add_parser("db", help="database migrations")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to the newest schema")
    upgrade.add_argument("revision", nargs="?", default="head")

    devices = commands.add_parser("devices", help="known boards")
    device_commands = devices.add_subparsers(dest="devices_command", required=True)
    add = device_commands.add_parser("add", help="register a board locally")
    add.add_argument("device_id")
    add.add_argument(
        "--type", dest="connection_type", choices=["Consumer", "Producer"], required=True
    )
    add.add_argument("--account", help="owner's Starknet account address (0x...)")
    add.add_argument("--central-id", type=int, help="the central's numeric id of the board")
    device_commands.add_parser("list", help="list the known boards")

    simulate = commands.add_parser("simulate", help="run simulated boards against a broker")
    simulate.add_argument("count", type=int)
    simulate.add_argument("--broker", default=None, help="broker URL (default MQTT_URL)")
    simulate.add_argument("--prefix", default="SIM", help="device id prefix (default SIM)")
    simulate.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    simulate.add_argument("--register", action="store_true", help="register them in the database")

    status = commands.add_parser("status", help="a running gateway's health and counters")
    status.add_argument(
        "--address", default=None, help="host:port of its /healthz (default HEALTH_ADDRESS)"
    )
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for it")

    repl = commands.add_parser("repl", help="a Python console into the running gateway")
    repl.add_argument("--socket", metavar="PATH", help="Unix socket (default REPL_SOCKET's)")
    repl.add_argument("--tcp", metavar="HOST:PORT", help="a TCP REPL (REPL_TCP) instead")
    repl.add_argument(
        "--token-file", metavar="FILE", help="file holding the TCP REPL's token (or REPL_TOKEN)"
    )

    fake = commands.add_parser(
        "fake-central", help="run a fake central backend (its hub API) on this machine"
    )
    fake.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    fake.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    fake.add_argument("--api-key", help="the key hubs must send (default CENTRAL_API_KEY)")
    fake.add_argument("--hub", help="the hub name in its tokens (default HUB_NAME)")
    fake.add_argument(
        "--devices", metavar="FILE.json", help="the devices sync_devices returns (a JSON list)"
    )

    node = commands.add_parser(
        "fake-starknet", help="run a fake Starknet node with the SCT contract on this machine"
    )
    node.add_argument("--port", type=int, default=5050, help="port to listen on (default 5050)")
    node.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    node.add_argument(
        "--block-time", type=float, default=2.0, help="seconds between blocks (default 2)"
    )
    node.add_argument(
        "--mint",
        type=int,
        default=0,
        metavar="N",
        help="give every board owner in DATABASE_URL's devices N SCT, once (default 0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(env_file=args.env_file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"estate: configuration error: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    handler = {
        "run": _run,
        "db": _db,
        "devices": _devices,
        "simulate": _simulate,
        "fake-central": _fake_central,
        "fake-starknet": _fake_starknet,
        "repl": _repl,
        "status": _status,
    }[args.command]
    try:
        return handler(settings, args)
    except KeyboardInterrupt:
        return 130


def _db(settings: Settings, args: argparse.Namespace) -> int:
    from estate.db.engine import upgrade

    upgrade(settings.database_url, args.revision)
    print(f"database at revision {args.revision}")
    return 0


def _devices(settings: Settings, args: argparse.Namespace) -> int:
    from estate.db.engine import make_engine, upgrade

    if settings.db_auto_migrate:
        upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        return _device_command(engine, args)
    finally:
        engine.dispose()


def _device_command(engine: Any, args: argparse.Namespace) -> int:
    from estate.config import _felt
    from estate.db.store import DeviceExists, load_devices, register_device

    if args.devices_command == "add":
        try:
            account = _felt(args.account) if args.account else None
        except ValueError as exc:
            print(f"estate: --account {args.account!r}: {exc}", file=sys.stderr)
            return 2
        try:
            with engine.begin() as conn:
                register_device(
                    conn, args.device_id, args.connection_type, account, args.central_id
                )
        except DeviceExists as exc:
            print(f"estate: {exc}", file=sys.stderr)
            return 1
        print(f"registered {args.device_id} ({args.connection_type})")
        return 0
    with engine.connect() as conn:
        for d in load_devices(conn):
            print(
                f"{d.device_id:<12} {d.connection_type:<9} {d.status:<8} "
                f"balance {d.balance:<6} energy {d.energy_total_wh:.3f} Wh "
                f"{d.account_address or ''}"
            )
    return 0


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM; a second signal exits at once."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.wait(0.5):
        pass


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from actors.gateway import Gateway

    ids = _register_simulated(settings, args.simulate) if args.simulate else []
    gateway = Gateway(settings).start()
    boards: list[Any] = []
    try:
        if ids:
            boards = _start_boards(settings, gateway.broker_url, ids, args.interval)
        _wait_for_signal()
    finally:
        logger.info("stopping")
        for board in boards:
            board.stop()
        gateway.stop()
    return 0


SIMULATED_OWNER = 0x51_0000
"""Simulated board n's owner account is this + n (a demo address)."""


def _register_simulated(settings: Settings, count: int, prefix: str = "SIM") -> list[str]:
    """Register simulated boards PREFIX001.. (before the gateway starts, so it knows them)."""
    from estate.db.engine import make_engine, upgrade
    from estate.db.store import DeviceExists, register_device

    if settings.db_auto_migrate:
        upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    ids = [f"{prefix}{n:03d}" for n in range(1, count + 1)]
    try:
        with engine.begin() as conn:
            for n, device_id in enumerate(ids, start=1):
                with contextlib.suppress(DeviceExists):
                    # a demo owner account each, so that token accounting has whom to charge
                    register_device(conn, device_id, "Consumer", f"{SIMULATED_OWNER + n:#066x}")
    finally:
        engine.dispose()
    return ids


def _start_boards(
    settings: Settings, broker_url: str, ids: list[str], interval: float
) -> list[Any]:
    from actors.simulated_board import SimulatedBoard

    print(f"simulating {len(ids)} boards ({ids[0]}..{ids[-1]}) on {broker_url}", flush=True)
    return [
        SimulatedBoard.start(broker_url, settings.hub_name, device_id, interval=interval)
        for device_id in ids
    ]


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    broker = args.broker or settings.mqtt_url
    if not broker:
        print("estate: simulate needs --broker or MQTT_URL", file=sys.stderr)
        return 2
    if args.register:
        ids = _register_simulated(settings, args.count, args.prefix)
    else:
        ids = [f"{args.prefix}{n:03d}" for n in range(1, args.count + 1)]
    boards = _start_boards(settings, broker, ids, args.interval)
    try:
        _wait_for_signal()
    finally:
        for board in boards:
            board.stop()
    return 0


def _status(settings: Settings, args: argparse.Namespace) -> int:
    """Print a running gateway's health; exit 0 healthy, 1 degraded, 2 unreachable."""
    from estate.status import UNREACHABLE, Unreachable, fetch_status

    address = args.address or settings.health_address
    if address is None:
        print("estate: HEALTH_ADDRESS is off: pass --address host:port", file=sys.stderr)
        return UNREACHABLE
    try:
        status = fetch_status(address, timeout=args.timeout)
    except Unreachable as exc:
        print(f"estate: gateway unreachable: {exc}", file=sys.stderr)
        return UNREACHABLE
    print(status.summary())
    return status.exit_code


def _repl(settings: Settings, args: argparse.Namespace) -> int:
    """Connect to the gateway's REPL; line editing and history when stdin is a terminal."""
    import socket

    from estate.repl import run_client

    token: str | None = None
    if args.tcp:
        if args.token_file:
            try:
                with open(args.token_file, encoding="utf-8") as file:
                    token = file.readline().strip()
            except OSError as exc:
                print(f"estate: --token-file {args.token_file}: {exc.strerror}", file=sys.stderr)
                return 2
        else:
            token = settings.repl_token  # REPL_TOKEN, from the environment or .env
        if not token:
            print("estate: --tcp needs --token-file FILE or REPL_TOKEN", file=sys.stderr)
            return 2
        host, _, port = args.tcp.rpartition(":")
        if not host or not port.isdigit():
            print(f"estate: --tcp {args.tcp!r}: expected host:port", file=sys.stderr)
            return 2
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except OSError as exc:
            print(
                f"estate: cannot reach the REPL at {args.tcp} ({exc.strerror or exc}): "
                f"is the gateway running? REPL_TCP={args.tcp}",
                file=sys.stderr,
            )
            return 1
        sock.settimeout(None)
    else:
        path = args.socket or settings.repl_socket_path
        if path is None:
            print("estate: the REPL is off (REPL_SOCKET=off); use --socket PATH", file=sys.stderr)
            return 2
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            what = "no REPL socket" if isinstance(exc, FileNotFoundError) else "nobody listens"
            print(
                f"estate: {what} at {path}: is the gateway running? REPL_SOCKET={path}",
                file=sys.stderr,
            )
            return 1
        except OSError as exc:
            sock.close()
            print(f"estate: cannot connect to {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    code = run_client(sock, token)
    if code and token is not None:
        print("estate: the REPL closed the connection at once (wrong token?)", file=sys.stderr)
    return code


def _fake_central(settings: Settings, args: argparse.Namespace) -> int:
    """Serve the central's hub API (estate.fake_central) until SIGINT or SIGTERM."""
    import json
    from pathlib import Path

    from estate.central_wire import CentralProtocolError, SyncDevicesAnswer, structure_answer
    from estate.fake_central import FakeCentral

    devices: list[dict[str, Any]] = []
    if args.devices:
        try:
            devices = json.loads(Path(args.devices).read_text())
            structure_answer("devices file", {"success": True, "data": devices}, SyncDevicesAnswer)
        except (OSError, ValueError, CentralProtocolError) as exc:
            print(f"estate: --devices {args.devices}: {exc}", file=sys.stderr)
            return 2
    key = args.api_key or settings.central_api_key or "dev-api-key"
    fake = FakeCentral(
        api_key=key, hub=args.hub or settings.hub_name, port=args.port, host=args.host
    )
    try:
        fake.start()
    except OSError as exc:
        print(f"estate: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    fake.set_devices(devices)
    shown = "CENTRAL_API_KEY's" if not args.api_key and settings.central_api_key else repr(key)
    print(
        f"fake central on {fake.url}/hubs (hub {fake.hub!r}, api key {shown}, "
        f"{len(devices)} devices); point the gateway at it with CENTRAL_URL={fake.url}",
        flush=True,
    )
    try:
        _wait_for_signal()
    finally:
        fake.stop()
    return 0


def _fake_starknet(settings: Settings, args: argparse.Namespace) -> int:
    """Serve a fake Starknet node (estate.fake_starknet) with a gateway account and the SCT."""
    from estate.fake_starknet import FakeStarknetNode, make_test_account

    address, private_key, public_key = make_test_account(1)
    node = FakeStarknetNode(port=args.port, host=args.host, block_time=args.block_time)
    try:
        node.start()
    except OSError as exc:
        print(f"estate: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    node.add_account(address, public_key)
    node.authorise(address)
    print(
        f"fake Starknet node on {node.url} (chain SN_SEPOLIA, blocks every "
        f"{args.block_time:g} s); a throwaway gateway account, for the gateway's environment:",
        file=sys.stderr,
        flush=True,
    )
    print(
        f"STARKNET_RPC_URL={node.url}\n"
        f"STARKNET_ACCOUNT_ADDRESS={address:#066x}\n"
        f"STARKNET_PRIVATE_KEY={private_key:#066x}\n"
        f"SCT_CONTRACT_ADDRESS={node.sct_address:#066x}",
        flush=True,
    )
    try:
        if args.mint > 0:
            _mint_to_owners(settings, node, args.mint)
        else:
            _wait_for_signal()
    finally:
        node.stop()
    return 0


def _mint_to_owners(settings: Settings, node: Any, amount: int) -> None:
    """Until a signal: every board owner the database knows gets `amount` SCT, once."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from estate.db.engine import make_engine
    from estate.db.models import DeviceRow
    from estate.sct_contract import normalise_address

    engine = make_engine(settings.database_url)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    given: set[str] = set()
    try:
        while not stop.wait(1.0):
            try:
                with engine.connect() as conn:
                    owners = conn.execute(
                        select(DeviceRow.account_address).where(
                            DeviceRow.account_address.is_not(None)
                        )
                    ).scalars()
                    accounts = {normalise_address(a) for a in owners}
            except (SQLAlchemyError, ValueError) as exc:
                if not given:
                    logger.debug("no board owners yet: %s", str(exc).splitlines()[0])
                continue
            for account in sorted(accounts - given):
                node.mint(account, amount)
                given.add(account)
                print(f"minted {amount} SCT to {account}", file=sys.stderr, flush=True)
    finally:
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
