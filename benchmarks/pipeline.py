"""End-to-end throughput: readings stored per second with N boards publishing at QoS 1.

    python -m benchmarks.pipeline --boards 100 --seconds 20

Runs two phases against the same broker with the same load (publisher processes
sending the boards' readings as fast as the broker takes them, or at `--rate`):
1. baseline: a "null gateway", one paho client that acknowledges every reading at
   once and stores nothing: what the publishers, the broker and this machine deliver;
2. `estate run` as a process on a fresh PostgreSQL database: readings committed.
Each phase is sampled in windows after a warm-up; the medians and their ratio are
printed, and the gateway phase checks that every accepted reading was stored once.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from benchmarks.load import LoadGenerator
from estate.db.engine import make_engine
from estate.db.models import ReadingRow
from estate.db.scratch import scratch_database
from estate.db.store import register_device
from estate.device_wire import Topics
from estate.mosquitto import MosquittoProcess
from estate.mqtt_client import BrokerEndpoint, connect_async, make_client


class NullGateway:
    """Acknowledges every reading as it arrives and stores nothing."""

    def __init__(self, broker: str, hub: str) -> None:
        self.count = 0
        self.lock = threading.Lock()
        self.connected = threading.Event()
        endpoint = BrokerEndpoint(url=broker, client_id=f"null-{hub}", persistent=False)
        self.client = make_client(endpoint, manual_ack=True)
        filters = [(t, 1) for t in Topics(hub).inbound_filters]
        self.client.on_subscribe = lambda *_: self.connected.set()
        self.client.on_connect = lambda c, *_: c.subscribe(filters)
        self.client.on_message = self._message
        connect_async(self.client, endpoint)
        self.client.loop_start()
        self.connected.wait(10)

    def _message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.count += 1
        client.ack(message.mid, message.qos)

    def received(self) -> int:
        with self.lock:
            return self.count

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def sample(counter: Callable[[], int], warmup: float, seconds: float, window: float) -> list[float]:
    """Rates (per second) of `counter()` in consecutive windows after a warm-up."""
    time.sleep(warmup)
    rates = []
    last, started = counter(), time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        time.sleep(window)
        count, now = counter(), time.monotonic()
        rates.append((count - last) / (now - started))
        last, started = count, now
    return rates


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boards", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.0, help="readings/s in all (0: max)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per phase")
    parser.add_argument("--window", type=float, default=2.0, help="sampling window, seconds")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument(
        "--broker", default=None, help="broker URL (default: a private Mosquitto with the "
        "limits of deploy/mosquitto.conf)"
    )
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    return parser.parse_args()


def _load(args: argparse.Namespace, hub: str, ids: list[str]) -> LoadGenerator:
    seconds = args.warmup + args.seconds + args.window
    return LoadGenerator(args.broker, hub, ids, seconds, args.rate, args.publishers).start()


def _baseline(args: argparse.Namespace, ids: list[str]) -> tuple[list[float], int]:
    hub = f"bench{uuid.uuid4().hex[:6]}"
    null = NullGateway(args.broker, hub)
    load = _load(args, hub, ids)
    try:
        rates = sample(null.received, args.warmup, args.seconds, args.window)
        return rates, load.accepted()
    finally:
        null.stop()


def _gateway(args: argparse.Namespace, url: str, ids: list[str]) -> tuple[list[float], int, int]:
    engine = make_engine(url)

    def stored() -> int:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(ReadingRow)).scalar_one()

    hub = f"bench{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "DATABASE_URL": url, "MQTT_URL": args.broker, "HUB_NAME": hub,
           "LOG_LEVEL": "WARNING"}
    gateway = subprocess.Popen([sys.executable, "-m", "estate.cli", "run"], env=env)
    try:
        time.sleep(3)  # the gateway subscribes once its devices are loaded
        load = _load(args, hub, ids)
        rates = sample(stored, args.warmup, args.seconds, args.window)
        accepted = load.accepted()
        deadline = time.monotonic() + 60
        while stored() < accepted and time.monotonic() < deadline:
            time.sleep(0.2)
        with engine.connect() as conn:
            distinct = conn.execute(
                select(func.count()).select_from(
                    select(ReadingRow.device_pk, ReadingRow.seq).distinct().subquery()
                )
            ).scalar_one()
        return rates, accepted, distinct
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
        engine.dispose()


def _run(
    args: argparse.Namespace, url: str, ids: list[str]
) -> tuple[list[float], int, list[float], int, int]:
    engine = make_engine(url)
    with engine.begin() as conn:
        for device_id in ids:
            register_device(conn, device_id, "Consumer")
    engine.dispose()
    baseline, base_accepted = _baseline(args, ids)
    measured, accepted, distinct = _gateway(args, url, ids)
    return baseline, base_accepted, measured, accepted, distinct


def main() -> int:
    args = _arguments()
    ids = [f"B{n:04d}" for n in range(1, args.boards + 1)]
    broker = None
    if args.broker is None:
        broker = MosquittoProcess().start()
        args.broker = broker.url
    try:
        with scratch_database(args.pg, "estate_bench") as url:
            baseline, base_accepted, measured, accepted, distinct = _run(args, url, ids)
    finally:
        if broker is not None:
            broker.stop()

    base, gate = statistics.median(baseline), statistics.median(measured)
    load = f"{args.rate:.0f}/s" if args.rate else "as fast as the broker takes them"
    print(f"{args.boards} boards, readings at QoS 1 {load}, {args.publishers} publisher "
          f"processes, {len(measured)} windows of {args.window}s after {args.warmup}s warm-up")
    print(f"baseline null gateway (ack, no storage): median {base:8.0f} readings/s "
          f"({base_accepted} accepted)")
    print(f"estate gateway, PostgreSQL, committed:   median {gate:8.0f} readings/s "
          f"({accepted} accepted, {distinct} distinct stored)")
    print(f"ratio gateway/baseline: {gate / base:.2f}")
    if distinct != accepted:
        print(f"MISMATCH: {accepted} readings accepted by the broker, {distinct} stored")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
