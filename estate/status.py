"""`estate status`: ask a running gateway's `/healthz` and `/metrics`, summarise for a human.

Exit codes: 0 healthy, 1 degraded (the gateway answers 503), 2 unreachable (nothing
answers at the address, or not a gateway's answer).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "DEGRADED",
    "HEALTHY",
    "UNREACHABLE",
    "Status",
    "Unreachable",
    "base_url",
    "fetch_status",
]

HEALTHY, DEGRADED, UNREACHABLE = 0, 1, 2


class Unreachable(Exception):
    """Nothing (or not a gateway) answers at the address."""


class Status:
    """What a gateway said: its /healthz body and its metric samples (if /metrics answered)."""

    def __init__(
        self,
        url: str,
        health: dict[str, Any],
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] | None,
        metrics_error: str | None = None,
    ) -> None:
        self.url, self.health, self.samples, self.metrics_error = (
            url,
            health,
            samples,
            metrics_error,
        )

    @property
    def healthy(self) -> bool:
        return self.health.get("status") == "ok"

    @property
    def exit_code(self) -> int:
        return HEALTHY if self.healthy else DEGRADED

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        assert self.samples is not None
        wanted = set(labels.items())
        return sum(
            value
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and wanted <= set(sample_labels)
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        assert self.samples is not None
        return {
            dict(labels)[label]: value
            for (sample, labels), value in self.samples.items()
            if sample == name and label in dict(labels)
        }

    def summary(self) -> str:
        checks = dict(self.health.get("checks", {}))
        lines = [f"gateway at {self.url}: {'healthy' if self.healthy else 'DEGRADED'}"]
        lines += [f"  {name}: {state}" for name, state in checks.items() if state != "ok"]
        if all(state == "ok" for state in checks.values()):
            lines.append(f"  checks: {', '.join(checks) or 'none'} ok")
        if self.samples is None:
            lines.append(f"  metrics: unavailable ({self.metrics_error})")
            return "\n".join(lines)
        devices = self.by_label("estate_devices", "status")
        lines.append(
            f"  devices: {_n(devices.get('online', 0))} online of {_n(sum(devices.values()))}"
        )
        rejected = self.total("estate_readings_rejected_total") + self.total(
            "estate_readings_refused_by_db_total"
        )
        lines.append(
            f"  readings: {_n(self.total('estate_readings_stored_total'))} stored, "
            f"{_n(rejected)} rejected, "
            f"{_n(self.total('estate_readings_duplicate_total'))} duplicates"
        )
        tokens = self.by_label("estate_ledger_sct", "state")
        if tokens:
            lines.append(
                f"  tokens: {_n(tokens.get('accepted', 0))} SCT charged, "
                f"{_n(tokens.get('pending', 0) + tokens.get('submitted', 0))} waiting, "
                f"{_n(tokens.get('rejected', 0))} rejected"
            )
        restarts = {
            actor: n
            for actor, n in self.by_label("estate_actor_restarts_total", "actor").items()
            if n
        }
        lines.append(
            "  restarts: "
            + (", ".join(f"{a} {_n(n)}" for a, n in sorted(restarts.items())) or "none")
        )
        return "\n".join(lines)


def _n(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def base_url(address: str) -> str:
    """http://host:port of `address`; a wildcard host (listening everywhere) means loopback."""
    host, _, port = address.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _get(url: str, timeout: float, accept: Iterable[int] = (200,)) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in accept:
            return exc.read()
        raise Unreachable(f"{url} answered HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise Unreachable(f"nothing answers at {url}: {exc.reason}") from exc
    except OSError as exc:  # a timeout, a reset connection
        raise Unreachable(f"nothing answers at {url}: {exc}") from exc


def fetch_status(address: str, timeout: float = 5.0) -> Status:
    """Ask the gateway at `address` ("host:port"); raises Unreachable."""
    url = base_url(address)
    body = _get(f"{url}/healthz", timeout, accept=(200, 503))
    try:
        health = json.loads(body)
    except ValueError as exc:
        raise Unreachable(f"{url}/healthz did not answer JSON: is it an estate gateway?") from exc
    if not isinstance(health, dict) or "status" not in health:
        raise Unreachable(f"{url}/healthz did not answer a health report")
    try:
        text = _get(f"{url}/metrics", timeout).decode("utf-8")
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
    except (Unreachable, ValueError) as exc:
        return Status(url, health, None, str(exc))
    return Status(url, health, samples)
