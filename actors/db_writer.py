"""DbWriter: the only writer of the database; batches readings into one transaction a flush."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pykka
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from actors.base import EstateActor, Ticker, handles
from estate.db.engine import make_engine
from estate.db.store import load_devices, write_batch
from estate.logs import RateLimitedLog
from estate.messages import (
    AckMessages,
    DevicesLoaded,
    FlushDue,
    GetStats,
    LoadDevices,
    PeersChanged,
    RecordCommand,
    RecordDeviceState,
    StoreReading,
)

__all__ = ["DbWriter"]

RETRY_MIN, RETRY_MAX = 0.5, 15.0


class DbWriter(EstateActor):
    """Writes readings, device states and commands; acknowledges readings after the commit.

    A flush happens when `batch_max` readings wait or the oldest has waited
    `flush_interval` seconds. While the database fails, everything waits in memory
    (bounded by the broker's in-flight window, since nothing is acknowledged) and the
    flush is retried with backoff.
    """

    kind = "db"

    def __init__(
        self,
        database_url: str,
        batch_max: int = 1000,
        flush_interval: float = 0.05,
        supervisor: pykka.ActorRef[Any] | None = None,
        peers: PeersChanged | None = None,
        name: str = "db",
    ) -> None:
        super().__init__(name, supervisor)
        self.database_url, self.batch_max, self.flush_interval = (
            database_url,
            batch_max,
            flush_interval,
        )
        self.peers = dict(peers.peers) if peers else {}
        self.engine: Engine | None = None
        self.readings: list[StoreReading] = []
        self.states: list[RecordDeviceState] = []
        self.commands: list[RecordCommand] = []
        self.oldest: float | None = None
        self.retry_at = 0.0
        self.failures = 0
        self.counts: Counter[str] = Counter()
        self.last_flush_seconds = 0.0
        self.last_batch_size = 0
        self.error_log = RateLimitedLog(self.log)
        self.ticker: Ticker | None = None

    def setup(self) -> None:
        self.engine = make_engine(self.database_url)
        self.ticker = Ticker(self.actor_ref, FlushDue(), max(self.flush_interval / 2, 0.005))
        self.ticker.start()

    def teardown(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        if self.engine is not None:
            self.flush()
            if self.readings:
                self.log.error(
                    "%d readings not written at stop; the broker will redeliver them",
                    len(self.readings),
                )
            self.engine.dispose()
            self.engine = None

    @handles(StoreReading)
    def _store(self, reading: StoreReading) -> None:
        self._pending()
        self.readings.append(reading)
        if len(self.readings) >= self.batch_max:
            self.flush()

    @handles(RecordDeviceState)
    def _state(self, state: RecordDeviceState) -> None:
        self._pending()
        self.states.append(state)

    @handles(RecordCommand)
    def _command(self, command: RecordCommand) -> None:
        self._pending()
        self.commands.append(command)

    @handles(FlushDue)
    def _flush_due(self, _message: FlushDue) -> None:
        if self.oldest is not None and time.monotonic() - self.oldest >= self.flush_interval:
            self.flush()

    @handles(LoadDevices)
    def _load(self, request: LoadDevices) -> None:
        assert self.engine is not None
        try:
            with self.engine.connect() as conn:
                devices = load_devices(conn)
        except SQLAlchemyError as exc:
            self.error_log.warning("load", "cannot load devices: %s", _short(exc))
            return
        request.reply_to.tell(DevicesLoaded(devices))

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        return {
            **self.counts,
            "pending": len(self.readings),
            "failing": self.failures > 0,
            "last_flush_seconds": self.last_flush_seconds,
            "last_batch_size": self.last_batch_size,
        }

    def _pending(self) -> None:
        if self.oldest is None:
            self.oldest = time.monotonic()

    def flush(self) -> None:
        """Write what waits, `batch_max` readings a transaction; ack each after its commit."""
        if self.engine is None or time.monotonic() < self.retry_at:
            return
        while self.readings or self.states or self.commands:
            batch = self.readings[: self.batch_max]
            started = time.perf_counter()
            try:
                with self.engine.begin() as conn:
                    inserted = write_batch(conn, batch, self.states, self.commands)
            except SQLAlchemyError as exc:
                self._failed(exc)
                return
            self.last_flush_seconds = time.perf_counter() - started
            self.last_batch_size = len(batch)
            self.counts["flushes"] += 1
            self.counts["stored"] += inserted
            self.counts["duplicates"] += len(batch) - inserted
            if self.failures:
                self.log.info("database writable again after %d failed flushes", self.failures)
            self.failures, self.retry_at = 0, 0.0
            del self.readings[: len(batch)]
            self.states, self.commands = [], []
            self._acknowledge(batch)
        self.oldest = None

    def _acknowledge(self, batch: list[StoreReading]) -> None:
        tokens = tuple(r.ack for r in batch if r.ack is not None)
        mqtt = self.peers.get("mqtt")
        if tokens and mqtt is not None:
            try:
                mqtt.tell(AckMessages(tokens))
            except pykka.ActorDeadError:
                self.counts["acks_lost"] += len(tokens)

    def _failed(self, exc: SQLAlchemyError) -> None:
        self.failures += 1
        self.counts["flush_failures"] += 1
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** min(self.failures - 1, 10))
        self.retry_at = time.monotonic() + delay
        self.error_log.warning(
            "flush",
            "database write failed (%d readings waiting, retry in %.1fs): %s",
            len(self.readings),
            delay,
            _short(exc),
        )


def _short(exc: SQLAlchemyError) -> str:
    return str(exc).splitlines()[0][:300]
