"""DbWriter: the only writer of the database; batches readings into one transaction a flush."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pykka
from sqlalchemy import Engine, text
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from actors.base import EstateActor, Ticker, handles, tell_if_alive
from estate.db.engine import make_engine
from estate.db.ledger import (
    LedgerEntry,
    Submission,
    get_cursor,
    ledger_summary,
    mark_notified,
    pending_entries,
    record_balances,
    record_replacement,
    record_submission,
    reject_entries,
    set_cursor,
    settle,
    submissions,
    unnotified_entries,
)
from estate.db.outbox import OutboxState, claim_batch, mark_sent, outbox_state, prune_relayed
from estate.db.store import Charging, apply_central_devices, load_devices, write_batch
from estate.logs import RateLimitedLog
from estate.messages import (
    AckMessages,
    ApplyCentralDevices,
    ClaimRelayBatch,
    DevicesLoaded,
    FlushDue,
    GetChainCursor,
    GetLedgerSummary,
    GetOutboxState,
    GetPendingLedger,
    GetStats,
    GetSubmissions,
    GetUnnotified,
    LedgerChanged,
    LoadDevices,
    MarkNotified,
    MarkRelayed,
    PeersChanged,
    ProbeDatabase,
    PruneRelayed,
    RecordBalances,
    RecordCommand,
    RecordCutOff,
    RecordDeviceState,
    RecordReplacement,
    RecordSubmission,
    RejectLedgerEntries,
    RelayBatchReady,
    RelayOutboxIdle,
    SetChainCursor,
    SettleNonce,
    StoreReading,
)

__all__ = ["DbWriter"]

RETRY_MIN, RETRY_MAX = 0.5, 15.0

# The database refused the data itself (a reading of a device row deleted meanwhile, a
# value out of range): writing it again can never succeed, so it must not block the rest.
DATA_ERRORS = (IntegrityError, DataError)


class DbWriter(EstateActor):
    """Writes readings, device states and commands; acknowledges readings after the commit.

    A flush happens when `batch_max` readings wait or the oldest has waited
    `flush_interval` seconds. While the database fails, everything waits in memory
    (bounded by the broker's in-flight window, since nothing is acknowledged) and the
    flush is retried with backoff.

    A flush the database refuses for its data (IntegrityError, DataError) is not
    retried as a whole: its readings, device states and commands are written one a
    transaction, and those still refused are logged, counted (`rejected_by_db`,
    `states_rejected_by_db`, `commands_rejected_by_db`) and dropped; their readings are
    acknowledged all the same, since a redelivery would be refused again.

    With `charging` (token accounting on), the flush that stores a consumer's readings
    also fills its energy accumulator and records a pending ledger entry for each full
    token's worth (estate/db/store.py); the `signer` peer is then told LedgerChanged.
    The signer's ledger requests (asked, with a timeout) each run in a transaction of
    their own and answer only after the commit.
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
        charging: Charging | None = None,
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
        self.cut_offs: list[RecordCutOff] = []
        self.charging = charging
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

    @handles(RecordCutOff)
    def _cut_off(self, cut_off: RecordCutOff) -> None:
        self._pending()
        self.cut_offs.append(cut_off)

    @handles(FlushDue)
    def _flush_due(self, _message: FlushDue) -> None:
        if self.oldest is not None and time.monotonic() - self.oldest >= self.flush_interval:
            self.flush()

    @handles(LoadDevices)
    def _load(self, request: LoadDevices) -> None:
        assert self.engine is not None
        self.flush()  # a restarted device actor resumes from what is committed
        try:
            with self.engine.connect() as conn:
                devices = load_devices(conn, request.running)
        except SQLAlchemyError as exc:
            self.error_log.warning("load", "cannot load devices: %s", _short(exc))
            return
        tell_if_alive(request.reply_to, DevicesLoaded(devices))

    @handles(ApplyCentralDevices)
    def _apply_central(self, request: ApplyCentralDevices) -> None:
        """Upsert the central's device list (removing the others), then reload."""
        assert self.engine is not None
        try:
            with self.engine.begin() as conn:
                removed = apply_central_devices(conn, request.devices)
                devices = load_devices(conn)
        except SQLAlchemyError as exc:
            self.error_log.warning("sync", "cannot store the central's devices: %s", _short(exc))
            return
        if removed:
            self.log.info("%d devices removed at the central marked removed", removed)
        tell_if_alive(request.reply_to, DevicesLoaded(devices, synced=True))

    # -- the relay outbox ------------------------------------------------------------------

    @handles(ClaimRelayBatch)
    def _claim(self, request: ClaimRelayBatch) -> None:
        """Reply with the next batch for the central (the unsent one first), if one is due."""
        assert self.engine is not None
        try:
            with self.engine.begin() as conn:
                batch = claim_batch(
                    conn, request.max_size, timedelta(seconds=request.max_age), datetime.now(UTC)
                )
        except SQLAlchemyError as exc:
            self.error_log.warning("outbox", "cannot claim readings to relay: %s", _short(exc))
            batch = None
        tell_if_alive(request.reply_to, RelayBatchReady(batch) if batch else RelayOutboxIdle())

    @handles(GetOutboxState)
    def _outbox_state(self, _message: GetOutboxState) -> OutboxState | None:
        assert self.engine is not None
        try:
            with self.engine.connect() as conn:
                return outbox_state(conn)
        except SQLAlchemyError as exc:
            self.error_log.warning("outbox", "cannot read the outbox: %s", _short(exc))
            return None

    @handles(MarkRelayed)
    def _relayed(self, message: MarkRelayed) -> None:
        assert self.engine is not None
        try:
            with self.engine.begin() as conn:
                mark_sent(conn, message.batch_id, datetime.now(UTC))
        except SQLAlchemyError as exc:
            # the batch stays unsent and goes again with the same id: the central keeps one
            self.error_log.warning("outbox", "cannot mark a batch relayed: %s", _short(exc))

    @handles(PruneRelayed)
    def _prune(self, message: PruneRelayed) -> None:
        assert self.engine is not None
        cutoff = datetime.now(UTC) - timedelta(days=message.retention_days)
        try:
            with self.engine.begin() as conn:
                pruned = prune_relayed(conn, cutoff)
        except SQLAlchemyError as exc:
            self.error_log.warning("outbox", "cannot prune relayed readings: %s", _short(exc))
            return
        if pruned:
            self.log.info("pruned %d readings relayed before %s", pruned, cutoff.isoformat())

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
        while self.readings or self.states or self.commands or self.cut_offs:
            batch = self.readings[: self.batch_max]
            started = time.perf_counter()
            try:
                with self.engine.begin() as conn:
                    written = write_batch(
                        conn, batch, self.states, self.commands, self.cut_offs, self.charging
                    )
            except DATA_ERRORS as exc:
                self.log.warning(
                    "database refused a flush of %d readings, %d states, %d commands (%s); "
                    "writing them one a transaction",
                    len(batch),
                    len(self.states),
                    len(self.commands),
                    _short(exc),
                )
                if not self._flush_one_by_one(batch):
                    return
                continue
            except SQLAlchemyError as exc:
                self._failed(exc)
                return
            self.last_flush_seconds = time.perf_counter() - started
            self.last_batch_size = len(batch)
            self.counts["flushes"] += 1
            self.counts["flush_seconds_total"] += self.last_flush_seconds
            self.counts["batch_readings_total"] += len(batch)
            self._count_written(len(batch), written.inserted, written.charged)
            self._writable()
            del self.readings[: len(batch)]
            self.states, self.commands, self.cut_offs = [], [], []
            self._acknowledge(batch)
        self.oldest = None

    def _flush_one_by_one(self, batch: list[StoreReading]) -> bool:
        """Write `batch`, then the states and commands, one a transaction; drop the refused.

        Return False if the database failed otherwise (connection lost): what was done is
        kept and acknowledged, the rest waits for the retry with backoff.
        """
        assert self.engine is not None
        refused: dict[tuple[int, str], list[int | None]] = {}
        done = 0
        try:
            for reading in batch:
                try:
                    with self.engine.begin() as conn:
                        written = write_batch(conn, [reading], charging=self.charging)
                except DATA_ERRORS as exc:
                    self.counts["rejected_by_db"] += 1
                    refused.setdefault((reading.device_pk, _short(exc)), []).append(reading.seq)
                else:
                    self._count_written(1, written.inserted, written.charged)
                done += 1
            while self.states:
                self._write_one(self.states[0])
                self.states.pop(0)
            while self.commands:
                self._write_one(self.commands[0])
                self.commands.pop(0)
            while self.cut_offs:
                self._write_one(self.cut_offs[0])
                self.cut_offs.pop(0)
        except SQLAlchemyError as exc:
            self._failed(exc)
            return False
        finally:
            for (pk, reason), seqs in refused.items():
                self.log.error(
                    "database refused %d reading(s) of device pk %s (seq %s): %s; "
                    "acknowledged and dropped",
                    len(seqs),
                    pk,
                    ", ".join(str(seq) for seq in seqs[:10]) + (" ..." if len(seqs) > 10 else ""),
                    reason,
                )
            del self.readings[:done]
            self._acknowledge(batch[:done])
        self.counts["flushes_one_by_one"] += 1
        self._writable()
        return True

    def _write_one(self, item: RecordDeviceState | RecordCommand | RecordCutOff) -> None:
        """One device state, command or cut-off in its own transaction; log a refusal."""
        assert self.engine is not None
        kind = {
            RecordDeviceState: ("states", "device state"),
            RecordCommand: ("commands", "command"),
            RecordCutOff: ("cut_offs", "cut-off"),
        }[type(item)]
        try:
            with self.engine.begin() as conn:
                write_batch(conn, (), **{kind[0]: [item]})  # type: ignore[arg-type]
        except DATA_ERRORS as exc:
            reason = _short(exc)
        else:
            return
        self.counts[f"{kind[0]}_rejected_by_db"] += 1
        self.log.error(
            "database refused a %s of device pk %s: %s; dropped", kind[1], item.device_pk, reason
        )

    def _count_written(self, readings: int, inserted: int, charged: int = 0) -> None:
        self.counts["stored"] += inserted
        self.counts["duplicates"] += readings - inserted
        if charged:
            self.counts["ledger_entries"] += charged
            signer = self.peers.get("signer")
            if signer is not None:
                tell_if_alive(signer, LedgerChanged())

    def _writable(self) -> None:
        if self.failures:
            self.log.info("database writable again after %d failed flushes", self.failures)
        self.failures, self.retry_at = 0, 0.0

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

    # -- the token ledger (asked by the StarknetSigner) -------------------------------------

    @handles(GetPendingLedger)
    def _pending_ledger(self, request: GetPendingLedger) -> tuple[LedgerEntry, ...]:
        assert self.engine is not None
        self.flush()  # entries of readings still waiting here are committed first
        with self.engine.connect() as conn:
            return pending_entries(conn, request.limit, request.skip_accounts)

    @handles(GetSubmissions)
    def _submissions(self, request: GetSubmissions) -> tuple[Submission, ...]:
        assert self.engine is not None
        with self.engine.connect() as conn:
            return submissions(conn, request.sender)

    @handles(RecordSubmission)
    def _record_submission(self, m: RecordSubmission) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            record_submission(
                conn, m.sender, m.tx_hash, m.nonce, m.payload, m.entry_ids, datetime.now(UTC)
            )

    @handles(RecordReplacement)
    def _record_replacement(self, m: RecordReplacement) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            record_replacement(conn, m.sender, m.tx_hash, m.nonce, m.payload, datetime.now(UTC))

    @handles(SettleNonce)
    def _settle(self, m: SettleNonce) -> tuple[LedgerEntry, ...]:
        assert self.engine is not None
        with self.engine.begin() as conn:
            return settle(
                conn,
                m.sender,
                m.nonce,
                m.outcome,
                datetime.now(UTC),
                m.tx_hash,
                m.block_number,
                m.reason,
            )

    @handles(GetUnnotified)
    def _unnotified(self, request: GetUnnotified) -> tuple[LedgerEntry, ...]:
        assert self.engine is not None
        with self.engine.connect() as conn:
            return unnotified_entries(conn, request.settled_before, request.limit)

    @handles(MarkNotified)
    def _notified(self, message: MarkNotified) -> None:
        assert self.engine is not None
        try:
            with self.engine.begin() as conn:
                mark_notified(conn, message.entry_ids, datetime.now(UTC))
        except SQLAlchemyError as exc:
            # told again after a restart: the central sees one consumption twice at worst
            self.error_log.warning("ledger", "cannot mark consumption notified: %s", _short(exc))

    @handles(RejectLedgerEntries)
    def _reject(self, message: RejectLedgerEntries) -> int:
        assert self.engine is not None
        with self.engine.begin() as conn:
            return reject_entries(conn, message.entry_ids, message.reason, datetime.now(UTC))

    @handles(RecordBalances)
    def _balances(self, message: RecordBalances) -> None:
        assert self.engine is not None
        try:
            with self.engine.begin() as conn:
                record_balances(conn, message.balances, datetime.now(UTC))
        except SQLAlchemyError as exc:
            # the next refresh stores them again; the boards were told already
            self.error_log.warning("balances", "cannot store balances: %s", _short(exc))

    @handles(GetChainCursor)
    def _get_cursor(self, message: GetChainCursor) -> int | None:
        assert self.engine is not None
        with self.engine.connect() as conn:
            return get_cursor(conn, message.name)

    @handles(SetChainCursor)
    def _set_cursor(self, message: SetChainCursor) -> None:
        assert self.engine is not None
        try:
            with self.engine.begin() as conn:
                set_cursor(conn, message.name, message.block_number, datetime.now(UTC))
        except SQLAlchemyError as exc:
            # events since the stored cursor are read again: a balance refresh is idempotent
            self.error_log.warning("cursor", "cannot store the event cursor: %s", _short(exc))

    @handles(GetLedgerSummary)
    def _ledger_summary(self, _message: GetLedgerSummary) -> dict[str, int]:
        assert self.engine is not None
        with self.engine.connect() as conn:
            return ledger_summary(conn)

    @handles(ProbeDatabase)
    def _probe(self, _message: ProbeDatabase) -> tuple[bool, str]:
        """Run a tiny transaction now (for /healthz): (True, "ok") or (False, why not)."""
        if self.engine is None:
            return False, "the writer has no engine (stopped)"
        try:
            with self.engine.begin() as conn:
                conn.execute(text("SELECT 1"))
                if (
                    conn.dialect.name == "postgresql"
                    and conn.execute(text("SHOW transaction_read_only")).scalar() == "on"
                ):
                    return False, "the database is read-only (a standby?)"
        except SQLAlchemyError as exc:
            return False, _short(exc)
        return True, "ok"


def _short(exc: SQLAlchemyError) -> str:
    return str(exc).splitlines()[0][:300]
