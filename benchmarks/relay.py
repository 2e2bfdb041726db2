"""Relay throughput: readings/s the (fake) central accepts from the gateway's outbox.

    python -m benchmarks.relay --readings 50000 --boards 100

Stores `--readings` readings of `--boards` boards in a fresh PostgreSQL database,
then measures in one run:
1. baseline: the same readings posted straight to the fake central with the
   gateway's HTTP client in batches of `--batch` (no database);
2. the gateway (in-process, with the central configured) draining its outbox to the
   fake central: claim, post, mark relayed, batch after batch.
It prints readings/s of each and their ratio, and checks every reading arrived once.
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import UTC, datetime, timedelta

from actors.gateway import Gateway
from estate.central_client import CentralClient
from estate.central_wire import ReadingsBatch, RelayedReading
from estate.config import load_settings
from estate.db.engine import make_engine
from estate.db.scratch import scratch_database
from estate.db.store import register_device, write_batch
from estate.fake_central import FakeCentral
from estate.messages import StoreReading
from estate.mosquitto import MosquittoProcess

API_KEY = "bench-key"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=50_000)
    parser.add_argument("--boards", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500, help="readings per batch")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    return parser.parse_args()


def _readings(pks: dict[str, int], count: int) -> list[StoreReading]:
    start = datetime.now(UTC) - timedelta(days=1)
    ids = list(pks)
    rows = []
    for n in range(count):
        device_id = ids[n % len(ids)]
        at = start + timedelta(seconds=n // len(ids))
        rows.append(
            StoreReading(
                pks[device_id],
                0,
                n // len(ids) + 1,
                f"{n:016x}",
                at,
                at,
                12.1,
                0.42,
                5.082,
                0.0014,
                True,
                None,
                None,
            )
        )
    return rows


def _baseline(
    central: FakeCentral, readings: list[StoreReading], ids: dict[int, str], batch: int
) -> float:
    client = CentralClient(central.url, API_KEY)
    started = time.perf_counter()
    for first in range(0, len(readings), batch):
        part = readings[first : first + batch]
        client.relay_readings(
            ReadingsBatch(
                str(uuid.uuid4()),
                tuple(
                    RelayedReading(
                        ids[r.device_pk], r.ts, r.voltage, r.current, r.power, r.energy_wh
                    )
                    for r in part
                ),
            )
        )
    elapsed = time.perf_counter() - started
    client.close()
    return len(readings) / elapsed


def _run(args: argparse.Namespace, url: str) -> tuple[float, float, list[tuple[str, str]]]:
    """Store the readings, then measure the baseline and the gateway's drain."""
    hub = f"bench{uuid.uuid4().hex[:6]}"
    engine = make_engine(url)
    with engine.begin() as conn:
        pks = {
            f"B{n:04d}": int(register_device(conn, f"B{n:04d}", "Consumer"))
            for n in range(1, args.boards + 1)
        }
    readings = _readings(pks, args.readings)
    with engine.begin() as conn:
        for first in range(0, len(readings), 5000):
            write_batch(conn, readings[first : first + 5000])
    engine.dispose()
    devices = [
        {"id": pk, "device_id": d, "connection_type": "Consumer", "account_address": "0x1"}
        for d, pk in pks.items()
    ]

    with FakeCentral(api_key=API_KEY, hub=hub) as central:
        central.set_devices(devices)
        baseline = _baseline(central, readings, {pk: d for d, pk in pks.items()}, args.batch)

    with FakeCentral(api_key=API_KEY, hub=hub) as central, MosquittoProcess() as broker:
        central.set_devices(devices)
        settings = load_settings(
            {
                "DATABASE_URL": url,
                "MQTT_URL": broker.url,
                "HUB_NAME": hub,
                "CENTRAL_URL": central.url,
                "CENTRAL_API_KEY": API_KEY,
                "RELAY_BATCH_MAX": str(args.batch),
                "HEALTH_ADDRESS": "off",
                "REPL_SOCKET": "off",
                "LOG_LEVEL": "WARNING",
            },
            env_file=None,
        )
        started = time.perf_counter()
        gateway = Gateway(settings).start()
        try:
            deadline = time.monotonic() + 600
            while len(central.readings) < args.readings and time.monotonic() < deadline:
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
        finally:
            gateway.stop()
        return baseline, elapsed, [(r["device_id"], r["ts"]) for r in central.readings]


def main() -> int:
    args = _arguments()
    with scratch_database(args.pg, "estate_bench") as url:
        baseline, elapsed, arrived = _run(args, url)

    relayed = len(arrived) / elapsed
    print(f"{args.readings} readings of {args.boards} boards, batches of {args.batch}")
    print(f"baseline, client straight to the fake central: {baseline:8.0f} readings/s")
    print(f"gateway outbox to the fake central (from start): {relayed:8.0f} readings/s")
    print(f"ratio gateway/baseline: {relayed / baseline:.2f}")
    if len(arrived) != args.readings or len(set(arrived)) != len(arrived):
        print(
            f"MISMATCH: {args.readings} stored, {len(arrived)} relayed, "
            f"{len(set(arrived))} distinct"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
