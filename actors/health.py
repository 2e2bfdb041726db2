"""HealthServer: owns the HTTP listener of `/healthz` and `/metrics`.

The server runs on its own daemon thread (stdlib ThreadingHTTPServer), one thread a
request. A request never touches an actor's attributes: it asks the actors through
`Introspection` (messages, with timeouts), exactly as the REPL does. The actor itself
only owns the listener's life cycle and answers where it listens.

- `/healthz`: 200 `{"status": "ok", "checks": {...}}` when the supervisor answers, the
  boards' broker is connected and the database is writable (an actual transaction,
  `ProbeDatabase`), and with token accounting on, the Starknet node answers the signer;
  otherwise 503 with the same body, each degraded check saying why.
- `/metrics`: Prometheus text format from a registry of this actor's own (never the
  process-wide default registry), filled at scrape time by `GatewayCollector`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pykka
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from actors.base import EstateActor, handles
from actors.introspection import Introspection
from estate.config import Settings
from estate.db.outbox import OutboxState
from estate.messages import GetHealthAddress, GetStats, ProbeDatabase

__all__ = ["GatewayCollector", "HealthChecks", "HealthServer", "split_address"]

logger = logging.getLogger(__name__)

OK = "ok"
ASK_TIMEOUT = 2.0
"""Seconds a health check or a scrape waits for each actor's answer."""


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:port`) as a (host, port) pair."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- /healthz --------------------------------------------------------------------------------


class HealthChecks:
    """The gateway's health from its actors' answers: a plain class, usable from any thread."""

    def __init__(self, introspection: Introspection) -> None:
        self.introspection = introspection

    def run(self) -> tuple[bool, dict[str, str]]:
        """(healthy, {"supervisor": ..., "broker": ..., "database": ...}), "ok" or why not."""
        try:
            infos = {info.name: info.ref for info in self.introspection.actor_infos()}
        except pykka.Timeout:
            return False, self._all_unknown("not answering")
        except pykka.ActorDeadError:
            return False, self._all_unknown("stopped")
        timeout = self.introspection.timeout
        mqtt = _ask(infos.get("mqtt"), GetStats())
        database = _ask(infos.get("db"), ProbeDatabase())
        signer = _ask(infos.get("signer"), GetStats()) if "signer" in infos else None
        checks = {
            "supervisor": OK,
            "broker": _broker_check(mqtt, timeout),
            "database": _database_check(database, timeout),
        }
        if signer is not None:
            checks["starknet"] = _starknet_check(signer, timeout)
        return all(value == OK for value in checks.values()), checks

    @staticmethod
    def _all_unknown(why: str) -> dict[str, str]:
        unknown = f"unknown: the supervisor is {why}"
        return {"supervisor": why, "broker": unknown, "database": unknown}


def _ask(ref: pykka.ActorRef[Any] | None, message: Any) -> pykka.Future[Any] | str:
    """A future of the answer, or why there is none (no such actor, stopped)."""
    if ref is None:
        return "not running"
    try:
        return ref.ask(message, block=False)
    except pykka.ActorDeadError:
        return "not running (stopped)"


def _answer(asked: pykka.Future[Any] | str, timeout: float) -> tuple[Any, str | None]:
    if isinstance(asked, str):
        return None, asked
    try:
        return asked.get(timeout=timeout), None
    except pykka.Timeout:
        return None, f"not answering within {timeout:g}s"
    except pykka.ActorDeadError:
        return None, "not running (stopped)"
    except Exception as exc:  # noqa: BLE001  (the actor's own error, reported in the check)
        logger.warning("health check: the actor failed to answer: %r", exc)
        return None, f"failing to answer ({type(exc).__name__}: {exc})"


def _broker_check(asked: pykka.Future[Any] | str, timeout: float) -> str:
    stats, problem = _answer(asked, timeout)
    if problem is not None:
        return f"connection actor {problem}"
    if not stats.get("connected"):
        return f"disconnected from {stats.get('broker', 'the broker')}"
    return OK


def _starknet_check(asked: pykka.Future[Any] | str, timeout: float) -> str:
    stats, problem = _answer(asked, timeout)
    if problem is not None:
        return f"signer {problem}"
    if stats.get("reachable") is False:
        return "the Starknet node is unreachable: consumption waits in the ledger"
    if not stats.get("ready"):
        return "starting: the Starknet node has not answered yet"
    return OK


def _database_check(asked: pykka.Future[Any] | str, timeout: float) -> str:
    answer, problem = _answer(asked, timeout)
    if problem is not None:
        return f"not writable: the database writer is {problem}"
    ok, reason = answer
    return OK if ok else f"not writable: {reason}"


# -- /metrics --------------------------------------------------------------------------------


class GatewayCollector(Collector):
    """Asks the actors at scrape time and yields what they say as metric families.

    The relay outbox (depth, lag) is there once a central is configured, the token
    ledger (entries and SCT by state) and the signer's counters once Starknet is.
    """

    def __init__(self, introspection: Introspection) -> None:
        self.introspection = introspection

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "estate_introspection_up", "1 if the supervisor answered this scrape, else 0"
        )
        try:
            actors = self.introspection.actors()
            stats = self.introspection.stats()
            devices = self.introspection.devices()
            outbox = self.introspection.outbox()
            ledger = self.introspection.ledger()
        except (pykka.Timeout, pykka.ActorDeadError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _actor_metrics(actors, stats.get("supervisor", {}))
        yield from _mqtt_metrics(stats.get("mqtt", {}))
        yield from _db_metrics(stats.get("db", {}))
        yield from _device_metrics(devices)
        if outbox is not None:
            yield from _outbox_metrics(outbox)
        if ledger is not None:
            yield from _ledger_metrics(ledger, stats.get("signer", {}))


def _number(stats: dict[str, Any], key: str) -> float:
    value = stats.get(key, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def _actor_metrics(actors: list[dict[str, Any]], supervisor: dict[str, Any]) -> Iterator[Metric]:
    alive = GaugeMetricFamily("estate_actor_up", "1 if the actor is alive", labels=["actor"])
    mailbox = GaugeMetricFamily(
        "estate_actor_mailbox_depth", "messages waiting in the actor's inbox", labels=["actor"]
    )
    for actor in actors:
        alive.add_metric([actor["name"]], 1 if actor["alive"] else 0)
        mailbox.add_metric([actor["name"]], actor["mailbox"])
    restarts = CounterMetricFamily(
        "estate_actor_restarts", "restarts by the supervisor, by actor", labels=["actor"]
    )
    counts = {actor["name"]: actor["restarts"] for actor in actors}
    counts.update(supervisor.get("restarts", {}) if isinstance(supervisor, dict) else {})
    for name, count in sorted(counts.items()):
        restarts.add_metric([name], count)
    yield from (alive, mailbox, restarts)


def _mqtt_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    connected = GaugeMetricFamily(
        "estate_mqtt_connected", "1 if the gateway is connected to the boards' broker"
    )
    connected.add_metric([], 1 if stats.get("connected") else 0)
    yield connected
    for name, key, doc in (
        ("estate_mqtt_messages_received", "received", "messages from the boards' broker"),
        ("estate_mqtt_connects", "connects", "connections made to the boards' broker"),
        ("estate_mqtt_acked", "acked", "inbound messages acknowledged to the broker"),
        ("estate_commands_sent", "published", "commands published to the boards"),
    ):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], _number(stats, key))
        yield counter
    rejected = CounterMetricFamily(
        "estate_readings_rejected", "inbound messages rejected, by reason", labels=["reason"]
    )
    for reason, count in sorted(dict(stats.get("rejected", {})).items()):
        rejected.add_metric([reason], count)
    yield rejected


def _db_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    for name, key, doc in (
        ("estate_readings_stored", "stored", "readings inserted in the database"),
        ("estate_readings_duplicate", "duplicates", "readings already stored (redeliveries)"),
        ("estate_readings_refused_by_db", "rejected_by_db", "readings the database refused"),
        ("estate_db_flush_failures", "flush_failures", "flushes that failed and wait a retry"),
    ):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], _number(stats, key))
        yield counter
    flushes = _number(stats, "flushes")
    duration = SummaryMetricFamily(
        "estate_db_flush_seconds", "duration of the database flushes (one transaction each)"
    )
    duration.add_metric([], flushes, _number(stats, "flush_seconds_total"))
    batch = SummaryMetricFamily("estate_db_batch_size", "readings written per flush")
    batch.add_metric([], flushes, _number(stats, "batch_readings_total"))
    yield from (duration, batch)
    for name, key, doc in (
        ("estate_db_last_flush_seconds", "last_flush_seconds", "duration of the last flush"),
        ("estate_db_last_batch_size", "last_batch_size", "readings in the last flush"),
        ("estate_db_pending_readings", "pending", "readings waiting for their transaction"),
    ):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], _number(stats, key))
        yield gauge
    failing = GaugeMetricFamily(
        "estate_db_failing", "1 while the database writes fail (0 if not known)"
    )
    failing.add_metric([], 1 if stats.get("failing") else 0)
    yield failing


def _outbox_metrics(outbox: OutboxState) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "estate_relay_outbox_readings", "stored readings the central does not have yet"
    )
    depth.add_metric([], outbox.waiting)
    lag = GaugeMetricFamily(
        "estate_relay_lag_seconds", "age of the oldest reading the central does not have yet"
    )
    oldest = outbox.oldest
    lag.add_metric([], (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0)
    yield from (depth, lag)


def _ledger_metrics(ledger: dict[str, int], signer: dict[str, Any]) -> Iterator[Metric]:
    entries = GaugeMetricFamily(
        "estate_ledger_entries", "consumption ledger entries, by state", labels=["state"]
    )
    tokens = GaugeMetricFamily(
        "estate_ledger_sct", "SCT in the consumption ledger, by state", labels=["state"]
    )
    for state in ("pending", "submitted", "accepted", "rejected"):
        entries.add_metric([state], ledger.get(state, 0))
        tokens.add_metric([state], ledger.get(f"{state}_sct", 0))
    yield from (entries, tokens)
    reachable = GaugeMetricFamily(
        "estate_starknet_reachable", "1 if the Starknet node answers the signer"
    )
    reachable.add_metric([], 1 if signer.get("reachable") else 0)
    blocked = GaugeMetricFamily(
        "estate_starknet_accounts_waiting", "accounts whose consume waits for a larger balance"
    )
    blocked.add_metric([], _number(signer, "blocked_accounts"))
    yield from (reachable, blocked)
    for name, key, doc in (
        ("estate_starknet_transactions", "transactions", "consume multicalls sent"),
        ("estate_starknet_accepted", "accepted", "consume multicalls accepted on chain"),
        ("estate_starknet_reverted", "reverted", "consume multicalls that reverted on chain"),
        ("estate_starknet_sct_consumed", "sct_consumed", "SCT charged on chain"),
        ("estate_starknet_node_failures", "node_failures", "failed calls to the node"),
    ):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], _number(signer, key))
        yield counter


def _device_metrics(devices: list[dict[str, Any]]) -> Iterator[Metric]:
    by_status: Counter[str] = Counter({"online": 0, "offline": 0})
    by_status.update(str(device.get("status")) for device in devices)
    gauge = GaugeMetricFamily("estate_devices", "known boards, by status", labels=["status"])
    for status, count in sorted(by_status.items()):
        gauge.add_metric([status], count)
    received = CounterMetricFamily(
        "estate_readings_received",
        "valid readings the device actors received (since each actor started)",
    )
    received.add_metric([], sum(_number(device, "readings") for device in devices))
    yield from (gauge, received)


# -- the HTTP server -------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """One request, on its own thread: asks the actors through the server's checks."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            healthy, checks = self.server.checks.run()
            body = json.dumps(
                {"status": "ok" if healthy else "degraded", "checks": checks}
            ).encode()
            self._send(200 if healthy else 503, "application/json", body)
        elif path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception as exc:  # a bug in the collector: say so, do not drop the request
                logger.exception("collecting the metrics failed")
                message = f"collecting the metrics failed: {type(exc).__name__}: {exc}\n"
                self._send(500, "text/plain; charset=utf-8", message.encode())
                return
            self._send(200, CONTENT_TYPE_LATEST, body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        checks: HealthChecks,
        registry: CollectorRegistry,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.checks, self.registry = checks, registry
        super().__init__(address, _Handler)


class HealthServer(EstateActor):
    """Owns the `/healthz` and `/metrics` listener on `settings.health_address`.

    Port 0 means any free port: ask `GetHealthAddress` for the bound "host:port". With
    `HEALTH_ADDRESS=off` (None) it listens nowhere and answers None.
    """

    kind = "health"

    def __init__(
        self,
        settings: Settings,
        supervisor: pykka.ActorRef[Any],
        name: str = "health",
        timeout: float = ASK_TIMEOUT,
    ) -> None:
        super().__init__(name, supervisor)
        self.settings = settings
        self.introspection = Introspection(supervisor, timeout=timeout)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(self.introspection))
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self.address: str | None = None

    def setup(self) -> None:
        if self.settings.health_address is None:
            self.log.info("HEALTH_ADDRESS=off: no /healthz or /metrics")
            return
        try:
            server = _Server(
                split_address(self.settings.health_address),
                HealthChecks(self.introspection),
                self.registry,
            )
        except OSError as exc:
            raise OSError(
                f"cannot listen on HEALTH_ADDRESS={self.settings.health_address}: {exc}"
            ) from exc
        host, port = server.server_address[:2]
        self.server, self.address = server, join_address(str(host), int(port))
        self.thread = threading.Thread(target=server.serve_forever, name="health-http", daemon=True)
        self.thread.start()
        self.log.info("serving /healthz and /metrics on http://%s", self.address)

    def teardown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None

    @handles(GetHealthAddress)
    def _address(self, _message: GetHealthAddress) -> str | None:
        return self.address

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        return {"address": self.address}
