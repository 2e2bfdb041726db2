"""A load generator: boards' readings published at QoS 1 as fast as the broker takes them.

Each process owns a slice of the boards and publishes their readings round-robin
(with a growing `seq` per board) through one paho client with a wide in-flight
window, pacing itself to `rate` readings/s when given.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from typing import Any

from estate.device_wire import TopicKind, Topics
from estate.mqtt_client import BrokerEndpoint, make_client

__all__ = ["LoadGenerator"]


def _publish(
    broker: str, hub: str, ids: list[str], seconds: float, rate: float, results: Any
) -> None:
    topics = Topics(hub)
    endpoint = BrokerEndpoint(url=broker, client_id=f"load-{hub}-{ids[0]}", persistent=False)
    client = make_client(endpoint)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(2000)
    acked = 0
    lock = threading.Lock()

    def on_publish(*_args: Any) -> None:
        nonlocal acked
        with lock:
            acked += 1

    client.on_publish = on_publish
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    targets = [topics.of(d, TopicKind.TELEMETRY) for d in ids]
    seq = 0
    started = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - started) < seconds:
        if rate and sent >= rate * elapsed:
            time.sleep(0.001)
            continue
        seq += 1
        for topic in targets:
            payload = {"current": 0.42, "voltage": 12.1, "update": "false", "req": "true",
                       "seq": seq}
            info = client.publish(topic, json.dumps(payload).encode(), qos=1)
            sent += 1
            if info.rc != 0:
                time.sleep(0.001)  # paho's queue is full: let the broker catch up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with lock:
            if acked >= sent:
                break
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    results.put(acked)


class LoadGenerator:
    """`processes` publisher processes sharing `ids` between them."""

    def __init__(
        self, broker: str, hub: str, ids: list[str], seconds: float, rate: float = 0.0,
        processes: int = 2,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        share = rate / processes if rate else 0.0
        self.workers = [
            context.Process(
                target=_publish,
                args=(broker, hub, ids[n::processes], seconds, share, self.results),
                daemon=True,
            )
            for n in range(processes)
        ]

    def start(self) -> LoadGenerator:
        for worker in self.workers:
            worker.start()
        return self

    def accepted(self, timeout: float = 60.0) -> int:
        """Readings the broker acknowledged, once every publisher is done."""
        total = sum(self.results.get(timeout=timeout) for _ in self.workers)
        for worker in self.workers:
            worker.join(timeout)
        return total
