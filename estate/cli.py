"""The `estate` command: run the gateway, manage its database and devices, simulate boards."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from estate.config import ConfigError, Settings, load_settings

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(env_file=args.env_file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"estate: configuration error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.log_level != "DEBUG":
        logging.getLogger("alembic").setLevel(logging.WARNING)
    handler = {"run": _run, "db": _db, "devices": _devices, "simulate": _simulate}[args.command]
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
    from estate.config import _felt
    from estate.db.engine import make_engine, upgrade
    from estate.db.store import DeviceExists, load_devices, register_device

    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
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

    gateway = Gateway(settings).start()
    boards: list[Any] = []
    try:
        if args.simulate:
            boards = _start_simulation(settings, gateway.broker_url, args.simulate, args.interval)
        _wait_for_signal()
    finally:
        logger.info("stopping")
        for board in boards:
            board.stop()
        gateway.stop()
    return 0


def _start_simulation(
    settings: Settings, broker_url: str, count: int, interval: float, prefix: str = "SIM"
) -> list[Any]:
    from actors.simulated_board import SimulatedBoard
    from estate.db.engine import make_engine
    from estate.db.store import DeviceExists, register_device

    engine = make_engine(settings.database_url)
    ids = [f"{prefix}{n:03d}" for n in range(1, count + 1)]
    with engine.begin() as conn:
        for device_id in ids:
            with contextlib.suppress(DeviceExists):
                register_device(conn, device_id, "Consumer")
    engine.dispose()
    print(f"simulating {count} boards ({ids[0]}..{ids[-1]}) on {broker_url}", flush=True)
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
        boards = _start_simulation(settings, broker, args.count, args.interval, args.prefix)
    else:
        from actors.simulated_board import SimulatedBoard

        boards = [
            SimulatedBoard.start(broker, settings.hub_name, f"{args.prefix}{n:03d}", args.interval)
            for n in range(1, args.count + 1)
        ]
    try:
        _wait_for_signal()
    finally:
        for board in boards:
            board.stop()
    time.sleep(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
