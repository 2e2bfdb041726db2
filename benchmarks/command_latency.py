"""Command latency: a toggle from the central until the simulated board receives it.

    python -m benchmarks.command_latency --boards 100

The gateway runs in this process (with UPLINK_MQTT_URL set it runs its own
UplinkConnection) on a SQLite file, with N simulated boards streaming readings on a
private Mosquitto and the central's uplink on a second private Mosquitto
(`--one-broker`: the same one). A paho client playing the central publishes
`--commands` toggles (`{"device": id, "instruction": 2}`, QoS 1) round-robin over
the boards at `--rate` per second; each board records the monotonic time at which
its command arrived (same clock, same process). Printed: median, p90, p99 and max of
(arrival - publish call), in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pykka

from actors.gateway import Gateway
from actors.simulated_board import SimulatedBoard
from actors.testing import gateway_uplink
from estate.config import load_settings
from estate.db.engine import make_engine, upgrade
from estate.db.store import register_device
from estate.device_wire import Instruction
from estate.logs import configure_logging
from estate.messages import GetBoardState, GetStats
from estate.mosquitto import MosquittoProcess
from estate.mqtt_client import BrokerEndpoint, make_client
from estate.uplink_wire import UplinkTopics


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boards", type=int, default=100)
    parser.add_argument("--commands", type=int, default=1000, help="toggles to send in all")
    parser.add_argument("--rate", type=float, default=50.0, help="toggles per second")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    parser.add_argument("--one-broker", action="store_true", help="uplink on the boards' broker")
    return parser.parse_args()


class Central:
    """A paho client on the uplink broker publishing commands as the central would."""

    def __init__(self, url: str, hub: str) -> None:
        self.topic = UplinkTopics(hub).commands
        endpoint = BrokerEndpoint(url=url, client_id=f"central-{hub}", persistent=False)
        self.client = make_client(endpoint)
        self.client.max_inflight_messages_set(1000)
        connected = threading.Event()
        self.client.on_connect = lambda *_args: connected.set()
        self.client.connect(endpoint.host, endpoint.port)
        self.client.loop_start()
        if not connected.wait(10):
            raise RuntimeError(f"the central's client could not connect to {url}")

    def toggle(self, central_id: int) -> None:
        payload = json.dumps({"device": central_id, "instruction": 2}).encode()
        self.client.publish(self.topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _toggles(ref: pykka.ActorRef[Any]) -> list[float]:
    commands = ref.ask(GetBoardState(), timeout=10)["commands"]
    return [at for at, _balance, instruction in commands if instruction == Instruction.TOGGLE]


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:  # noqa: PLR0915  (one linear scenario)
    args = _arguments()
    configure_logging("WARNING")
    hub = f"lat{uuid.uuid4().hex[:6]}"
    folder = Path(tempfile.mkdtemp(prefix="estate-latency-"))
    database = f"sqlite:///{folder / 'estate.db'}"
    boards_broker = MosquittoProcess().start()
    uplink_broker = boards_broker if args.one_broker else MosquittoProcess().start()
    ids = [f"B{n:04d}" for n in range(1, args.boards + 1)]
    central_ids = {device_id: n for n, device_id in enumerate(ids, start=1)}
    gateway: Gateway | None = None
    boards: dict[str, pykka.ActorRef[Any]] = {}
    central: Central | None = None
    try:
        upgrade(database)
        engine = make_engine(database)
        with engine.begin() as conn:
            for device_id in ids:
                register_device(conn, device_id, "Consumer", None, central_ids[device_id])
        engine.dispose()
        settings = load_settings(
            {
                "HUB_NAME": hub,
                "DATABASE_URL": database,
                "DB_AUTO_MIGRATE": "false",
                "MQTT_URL": boards_broker.url,
                "UPLINK_MQTT_URL": uplink_broker.url,
                "MQTT_SESSION_EXPIRY": "60",
                "HEALTH_ADDRESS": "off",
                "REPL_SOCKET": "off",
                "LOG_LEVEL": "WARNING",
            },
            env_file=None,
        )
        gateway = Gateway(settings).start()
        for device_id in ids:
            boards[device_id] = SimulatedBoard.start(
                boards_broker.url, hub, device_id, interval=args.interval, hello_interval=1.0
            )

        def all_connected() -> bool:
            return all(ref.ask(GetBoardState(), timeout=10)["connected"] for ref in boards.values())

        _wait(all_connected, 120, f"{args.boards} boards connected")
        uplink = gateway_uplink(gateway, devices=args.boards, timeout=30)
        central = Central(uplink_broker.url, hub)
        time.sleep(2.0)  # let every board settle into its reading rhythm

        sent: dict[str, list[float]] = {device_id: [] for device_id in ids}
        started = time.monotonic()
        for n in range(args.commands):
            due = started + n / args.rate
            if (pause := due - time.monotonic()) > 0:
                time.sleep(pause)
            device_id = ids[n % len(ids)]
            sent[device_id].append(time.monotonic())
            central.toggle(central_ids[device_id])
        sending = time.monotonic() - started

        def all_arrived() -> bool:
            return all(len(_toggles(boards[d])) >= len(times) for d, times in sent.items())

        with contextlib.suppress(TimeoutError):
            _wait(all_arrived, 30, "every toggle at its board")
        latencies: list[float] = []
        missing = 0
        for device_id, times in sent.items():
            arrived = _toggles(boards[device_id])
            missing += max(0, len(times) - len(arrived))
            latencies += [(a - s) * 1000 for s, a in zip(times, arrived, strict=False)]
        stats = uplink.ask(GetStats(), timeout=10)
    finally:
        if central is not None:
            central.close()
        for ref in boards.values():
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                ref.stop(block=True, timeout=10)
        if gateway is not None:
            gateway.stop()
        boards_broker.stop()
        uplink_broker.stop()
        shutil.rmtree(folder, ignore_errors=True)

    brokers = "one broker" if args.one_broker else "two private Mosquitto brokers"
    print(
        f"{args.boards} simulated boards (a reading every {args.interval:g}s), {brokers}, "
        f"gateway + uplink in-process on SQLite"
    )
    print(
        f"{args.commands} toggles at {args.rate:g}/s (sent in {sending:.1f}s), QoS 1; "
        f"{len(latencies)} arrived, {missing} missing; uplink routed {stats.get('instructions')}"
    )
    if latencies:
        print(
            f"latency central publish -> board: median {statistics.median(latencies):.1f} ms, "
            f"p90 {_percentile(latencies, 90):.1f} ms, p99 {_percentile(latencies, 99):.1f} ms, "
            f"max {max(latencies):.1f} ms"
        )
    return 1 if missing or not latencies else 0


if __name__ == "__main__":
    raise SystemExit(main())
