"""CentralApi: the only HTTP client of the central backend (PROTOCOL section 2).

It owns a `CentralClient` (one session, its token). It syncs the device list at
start, every `CENTRAL_SYNC_INTERVAL` seconds and on demand, and reports boards that
complete the handshake or go offline. While the central is unreachable, sync is
retried with backoff and activations wait, one pending state per device, so that a
burst of flaps collapses to the last state; the gateway meanwhile runs on the devices
cached in the database.

It relays stored readings from the database's outbox (estate/db/outbox.py), one
batch at a time: the DbWriter hands it the next batch, it posts it, and only then
tells the DbWriter the batch is relayed. A failed batch is resent with the same
`batch_id` after a backoff with jitter; a central without `/readings` (404) is warned
about once and tried again every few minutes. No reading is dropped unrelayed.

It tells the central of each accepted consumption (`token_consumption`, with the
transaction hash and the new balance), in order; while the central is down these
wait in memory (at most NOTIFICATIONS_MAX) and are retried with backoff. Each one
the central has is marked in the ledger (MarkNotified), so that the signer tells
again, after a restart, what was not delivered.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import pykka

from actors.base import EstateActor, Ticker, handles, tell_if_alive
from estate.backoff import Backoff
from estate.central_client import (
    CentralClient,
    CentralError,
    CentralNotFound,
    CentralRejected,
    CentralUnavailable,
)
from estate.central_wire import ReadingsBatch
from estate.config import Settings, mask_url
from estate.logs import RateLimitedLog
from estate.messages import (
    ApplyCentralDevices,
    CentralTick,
    ClaimRelayBatch,
    DeviceActivityChanged,
    GetStats,
    MarkNotified,
    MarkRelayed,
    NotifyConsumption,
    NotifyShutdown,
    PeersChanged,
    PruneRelayed,
    RelayBatchReady,
    RelayOutboxIdle,
    SyncNow,
)
from estate.types import DeviceId

__all__ = ["CentralApi"]

TICK = 1.0
NO_READINGS_ENDPOINT_RETRY = 300.0
"""Seconds before asking again a central that answered 404 to `/readings`."""
PRUNE_PERIOD = 3600.0
NOTIFICATIONS_MAX = 10_000
"""Consumption notifications kept while the central is down, at most."""


class CentralApi(EstateActor):
    """Sync and activation with the central; asks nothing of other actors."""

    kind = "central"

    def __init__(
        self,
        settings: Settings,
        supervisor: pykka.ActorRef[Any] | None = None,
        peers: PeersChanged | None = None,
        client_factory: Callable[[str, str], CentralClient] = CentralClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("central", supervisor)
        self.peers = dict(peers.peers) if peers else {}
        assert settings.central_url is not None
        self.url, self.api_key = settings.central_url, settings.central_api_key or ""
        self.sync_interval = settings.central_sync_interval
        self.client_factory, self.clock = client_factory, clock
        self.client: CentralClient | None = None
        self.ticker: Ticker | None = None
        self.next_sync = 0.0
        self.sync_backoff = Backoff()
        self.activity_backoff = Backoff()
        self.activity_retry_at = 0.0
        self.pending: dict[DeviceId, bool] = {}
        self.reported: dict[DeviceId, bool] = {}
        self.reachable: bool | None = None
        self.relay_max, self.relay_age = settings.relay_batch_max, settings.relay_batch_age
        self.retention_days = settings.relay_retention_days
        self.batch: ReadingsBatch | None = None
        self.claiming = False
        self.relay_retry_at = 0.0
        self.relay_backoff = Backoff()
        self.warned_no_endpoint = False
        self.next_prune = 0.0
        self.consumptions: deque[NotifyConsumption] = deque(maxlen=NOTIFICATIONS_MAX)
        self.consumption_retry_at = 0.0
        self.consumption_backoff = Backoff()
        self.counts: Counter[str] = Counter()
        self.error_log = RateLimitedLog(self.log, interval=60.0)

    def setup(self) -> None:
        self.client = self.client_factory(self.url, self.api_key)
        self.ticker = Ticker(self.actor_ref, CentralTick(), TICK).start()
        self.actor_ref.tell(SyncNow())

    def teardown(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- sync ------------------------------------------------------------------------------

    @handles(SyncNow)
    def _sync_now(self, _message: SyncNow) -> None:
        self.next_sync = 0.0
        self._tick(CentralTick())

    @handles(CentralTick)
    def _tick(self, _message: CentralTick) -> None:
        now = self.clock()
        if now >= self.next_sync:
            self._sync(now)
        self._report_activity(now)
        self._report_consumptions(now)
        self._relay(now)
        if now >= self.next_prune and "db" in self.peers:
            self.next_prune = now + PRUNE_PERIOD
            tell_if_alive(self.peers["db"], PruneRelayed(self.retention_days))

    def _sync(self, now: float) -> None:
        assert self.client is not None
        try:
            devices = self.client.sync_devices()
        except CentralError as exc:
            delay = self.sync_backoff.failed()
            self.next_sync = now + delay
            self.counts["sync_failures"] += 1
            self._unreachable(exc, f"device sync failed, retrying in {delay:.0f}s")
            return
        self._reachable()
        self.sync_backoff.succeeded()
        self.next_sync = now + self.sync_interval
        self.counts["syncs"] += 1
        db = self.peers.get("db")
        if db is not None and self.supervisor is not None:
            tell_if_alive(db, ApplyCentralDevices(devices, self.supervisor))
        self.log.info("synced %d devices from the central", len(devices))

    # -- activation ------------------------------------------------------------------------

    @handles(DeviceActivityChanged)
    def _activity(self, change: DeviceActivityChanged) -> None:
        if self.reported.get(change.device_id) == change.active:
            self.pending.pop(change.device_id, None)  # a flap that ended where it began
        else:
            self.pending[change.device_id] = change.active
        self._report_activity(self.clock())

    def _report_activity(self, now: float) -> None:
        if not self.pending or now < self.activity_retry_at:
            return
        assert self.client is not None
        for device_id, active in list(self.pending.items()):
            call = self.client.activate_device if active else self.client.deactivate_device
            try:
                call(device_id)
            except CentralUnavailable as exc:
                delay = self.activity_backoff.failed()
                self.activity_retry_at = now + delay
                self._unreachable(exc, f"{len(self.pending)} activations wait ({delay:.0f}s)")
                return
            except CentralRejected as exc:
                self.counts["activations_rejected"] += 1
                self.log.warning(
                    "central refused to mark %s %s: %s",
                    device_id,
                    "active" if active else "inactive",
                    exc,
                )
            else:
                self.counts["activations" if active else "deactivations"] += 1
                self._reachable()
            self.activity_backoff.succeeded()
            self.reported[device_id] = active
            del self.pending[device_id]

    # -- consumption -----------------------------------------------------------------------

    @handles(NotifyConsumption)
    def _consumption(self, message: NotifyConsumption) -> None:
        key = (message.device_id, message.tx_hash)
        if any((n.device_id, n.tx_hash) == key for n in self.consumptions):
            return  # told again (after a restart) while the first still waits
        if len(self.consumptions) == self.consumptions.maxlen:
            # the oldest goes; it stays unnotified in the ledger and is told after a restart
            self.counts["consumptions_deferred"] += 1
        self.consumptions.append(message)
        self._report_consumptions(self.clock())

    def _report_consumptions(self, now: float) -> None:
        if not self.consumptions or now < self.consumption_retry_at:
            return
        assert self.client is not None
        while self.consumptions:
            note = self.consumptions[0]
            try:
                self.client.token_consumption(note.device_id, note.tx_hash, note.balance)
            except CentralUnavailable as exc:
                delay = self.consumption_backoff.failed()
                self.consumption_retry_at = now + delay
                self._unreachable(exc, f"{len(self.consumptions)} consumptions wait")
                return
            except CentralRejected as exc:
                self.counts["consumptions_rejected"] += 1
                self.log.warning(
                    "central refused the consumption of %s in %s: %s",
                    note.device_id,
                    note.tx_hash,
                    exc,
                )
            else:
                self.counts["consumptions"] += 1
                self._reachable()
            self.consumption_backoff.succeeded()
            self.consumptions.popleft()
            db = self.peers.get("db")
            if note.entry_ids and db is not None:
                tell_if_alive(db, MarkNotified(note.entry_ids))

    # -- relay -----------------------------------------------------------------------------

    def _relay(self, now: float) -> None:
        if now < self.relay_retry_at or self.claiming:
            return
        if self.batch is not None:
            self._send_batch(now)
            return
        db = self.peers.get("db")
        if db is not None and tell_if_alive(
            db, ClaimRelayBatch(self.relay_max, self.relay_age, self.actor_ref)
        ):
            self.claiming = True

    @handles(RelayBatchReady)
    def _batch_ready(self, message: RelayBatchReady) -> None:
        self.claiming, self.batch = False, message.batch
        self._send_batch(self.clock())

    @handles(RelayOutboxIdle)
    def _outbox_idle(self, _message: RelayOutboxIdle) -> None:
        self.claiming = False

    def _send_batch(self, now: float) -> None:
        assert self.client is not None
        assert self.batch is not None
        batch = self.batch
        try:
            self.client.relay_readings(batch)
        except CentralNotFound:
            self.relay_retry_at = now + NO_READINGS_ENDPOINT_RETRY
            if not self.warned_no_endpoint:
                self.warned_no_endpoint = True
                self.log.warning(
                    "the central has no /readings endpoint yet: readings are kept and "
                    "relayed once it has (asking again every %.0f s)",
                    NO_READINGS_ENDPOINT_RETRY,
                )
            return
        except CentralError as exc:
            delay = self.relay_backoff.failed()
            self.relay_retry_at = now + delay
            self.counts["relay_failures"] += 1
            if isinstance(exc, CentralUnavailable):
                self._unreachable(exc, f"a batch of {len(batch.readings)} readings waits")
            else:
                self.error_log.warning("relay", "central refused a batch (%s); retrying", exc)
            return
        self._reachable()
        self.relay_backoff.succeeded()
        self.warned_no_endpoint = False
        self.counts["relayed"] += len(batch.readings)
        self.counts["batches"] += 1
        self.batch = None
        db = self.peers.get("db")
        if db is not None:
            tell_if_alive(db, MarkRelayed(batch.batch_id))
            # more may wait: claim the next batch now rather than at the next tick
            if tell_if_alive(db, ClaimRelayBatch(self.relay_max, self.relay_age, self.actor_ref)):
                self.claiming = True

    # -- shutdown and stats ----------------------------------------------------------------

    @handles(NotifyShutdown)
    def _shutdown(self, _message: NotifyShutdown) -> bool:
        assert self.client is not None
        try:
            self.client.shutdown()
        except CentralError as exc:
            self.log.warning("could not tell the central about the shutdown: %s", exc)
            return False
        return True

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        return {
            "central": mask_url(self.url),
            "reachable": self.reachable,
            "pending_activations": len(self.pending),
            "pending_consumptions": len(self.consumptions),
            "relay_batch_waiting": self.batch is not None,
            **self.counts,
        }

    def _reachable(self) -> None:
        if self.reachable is False:
            self.log.info("central %s reachable again", mask_url(self.url))
        self.reachable = True

    def _unreachable(self, exc: CentralError, what: str) -> None:
        self.reachable = False
        self.error_log.warning("central", "central unreachable (%s): %s", exc, what)
