"""Supervisor: starts every actor, owns the device registry, restarts what crashes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pykka

from actors.base import EstateActor, Ticker, handles, tell_if_alive
from actors.central_api import CentralApi
from actors.db_writer import DbWriter
from actors.debug import DebugActor
from actors.device import DeviceActor
from actors.health import HealthServer
from actors.mqtt_connection import MqttConnection
from actors.starknet_signer import StarknetSigner
from actors.uplink import UplinkConnection, uplink_endpoint
from estate.board import BoardPolicy, BoardTiming
from estate.config import Settings
from estate.db.store import Charging
from estate.device_wire import Instruction, Topics
from estate.messages import (
    AccountsChanged,
    ActorFailed,
    ActorInfo,
    CentralRoutesChanged,
    DevicesLoaded,
    GetActors,
    GetStats,
    LoadDevices,
    NotifyShutdown,
    PeersChanged,
    Reconnect,
    ReloadDevices,
    RestartActor,
    RoutesChanged,
    SendInstruction,
    Tick,
    TokenAccount,
)
from estate.mqtt_client import BrokerEndpoint
from estate.types import CentralId, DeviceId

__all__ = ["RestartPolicy", "Supervisor"]

RELOAD_PERIOD = 30.0
"""Seconds between two reloads of the known devices from the database."""

OPTIONAL_ROLES = ("health", "debug")
"""Core actors the gateway runs without, after OPTIONAL_GIVE_UP failures in a row."""
OPTIONAL_GIVE_UP = 5

SHUTDOWN_CALL_TIMEOUT = 4.0
"""Seconds the shutdown waits for the central's answer to `POST /shutdown`."""


class RestartPolicy:
    """One-for-one restarts with exponential backoff; a quiet minute forgives the past."""

    def __init__(self, base: float = 0.5, ceiling: float = 30.0, forgive_after: float = 60.0):
        self.base, self.ceiling, self.forgive_after = base, ceiling, forgive_after
        self.failures: dict[str, tuple[int, float]] = {}
        self.restarts: dict[str, int] = {}

    def delay(self, name: str, now: float) -> float:
        count, last = self.failures.get(name, (0, now))
        count = 1 if now - last > self.forgive_after else count + 1
        self.failures[name] = (count, now)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        return min(self.ceiling, self.base * 2 ** (count - 1))

    def recent_failures(self, name: str) -> int:
        return self.failures.get(name, (0, 0.0))[0]


class Supervisor(EstateActor):
    """The root: DbWriter, MqttConnection and one DeviceActor per known board."""

    kind = "supervisor"

    def __init__(
        self,
        settings: Settings,
        endpoint: BrokerEndpoint,
        timing: BoardTiming | None = None,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("supervisor")
        self.settings, self.endpoint = settings, endpoint
        self.topics = Topics(settings.hub_name)
        self.timing = timing or BoardTiming(
            keepalive_interval=settings.keepalive_interval,
            offline_after=settings.offline_after,
            integration_max_gap=settings.integration_max_gap,
        )
        self.policy = policy or RestartPolicy()
        self.board_policy = BoardPolicy(
            tokens=settings.tokens_enabled, prepaid_cutoff=settings.prepaid_cutoff
        )
        self.records: dict[DeviceId, Any] = {}
        self.clock = clock
        self.core: dict[str, pykka.ActorRef[Any]] = {}
        self.devices: dict[DeviceId, pykka.ActorRef[Any]] = {}
        self.tickers: list[Ticker] = []
        self.timers: list[threading.Timer] = []
        self.central_ids: dict[DeviceId, CentralId | None] = {}
        self.stopping = False
        self.routes_sent = False

    # -- life cycle ------------------------------------------------------------------------

    def setup(self) -> None:
        self.core["db"] = self._start_core("db")
        self.core["mqtt"] = self._start_core("mqtt")
        if self.settings.central_url is not None:
            self.core["central"] = self._start_core("central")
        if self.settings.tokens_enabled:
            self.core["signer"] = self._start_core("signer")
        else:
            self.log.info(
                "token accounting off (STARKNET_RPC_URL is unset): energy is measured and "
                "stored, nobody is charged"
            )
        if self.settings.central_url is not None or self.settings.uplink_mqtt_url is not None:
            self.core["uplink"] = self._start_core("uplink")
        if self.settings.health_address is not None:
            self.core["health"] = self._start_core("health")
        if self.settings.repl_socket_path is not None or self.settings.repl_tcp is not None:
            self.core["debug"] = self._start_core("debug")
        self._announce_peers()
        self.tickers = [
            Ticker(self.actor_ref, Tick(), self.timing.tick).start(),
            Ticker(self.actor_ref, ReloadDevices(), RELOAD_PERIOD).start(),
        ]
        self.core["db"].tell(LoadDevices(self.actor_ref))

    def teardown(self) -> None:
        """Stop in reverse order: REPL and health, boards, the writer (final flush), MQTT."""
        self.stopping = True
        for ticker in self.tickers:
            ticker.stop()
        for timer in self.timers:
            timer.cancel()
        for role in OPTIONAL_ROLES:
            if role in self.core:
                _join(self.core[role])
        for ref in self.devices.values():
            _retire(ref, "shutdown")
        for ref in self.devices.values():
            _join(ref)
        if "signer" in self.core:
            _join(self.core["signer"])  # before its ledger: what it was doing is recorded
        if "db" in self.core:
            _join(self.core["db"])  # the final flush, and acks to the still running MQTT
        if "central" in self.core:
            try:
                self.core["central"].ask(NotifyShutdown(), timeout=SHUTDOWN_CALL_TIMEOUT)
            except (pykka.Timeout, pykka.ActorDeadError):
                self.log.warning("the central was not told of the shutdown in time")
            _join(self.core["central"])
        for role in ("uplink", "mqtt"):
            if role in self.core:
                _join(self.core[role])

    def _start_core(self, role: str) -> pykka.ActorRef[Any]:
        if role == "db":
            charging = (
                Charging(self.settings.wh_per_token) if self.settings.tokens_enabled else None
            )
            return DbWriter.start(
                self.settings.database_url,
                self.settings.db_batch_max,
                self.settings.db_flush_interval,
                supervisor=self.actor_ref,
                charging=charging,
            )
        if role == "mqtt":
            return MqttConnection.start(self.endpoint, self.topics, supervisor=self.actor_ref)
        if role == "central":
            return CentralApi.start(self.settings, self.actor_ref, self._peers())
        if role == "signer":
            return StarknetSigner.start(self.settings, self.actor_ref, self._peers())
        if role == "uplink":
            endpoint = uplink_endpoint(self.settings, self.endpoint.url)
            return UplinkConnection.start(endpoint, self.settings.hub_name, self.actor_ref)
        if role == "health":
            return HealthServer.start(self.settings, supervisor=self.actor_ref)
        if role == "debug":
            return DebugActor.start(self.settings, supervisor=self.actor_ref)
        raise ValueError(f"no core actor {role!r}")

    def _peers(self) -> PeersChanged:
        return PeersChanged(self.core)

    def _announce_peers(self) -> None:
        peers = self._peers()
        for ref in [*self.core.values(), *self.devices.values()]:
            tell_if_alive(ref, peers)

    # -- devices ---------------------------------------------------------------------------

    @handles(ReloadDevices)
    def _reload(self, _message: ReloadDevices) -> None:
        tell_if_alive(self.core["db"], LoadDevices(self.actor_ref, frozenset(self.devices)))

    @handles(DevicesLoaded)
    def _loaded(self, message: DevicesLoaded) -> None:
        """Start an actor for each new device and stop those of devices now gone."""
        if self.stopping:
            return
        wanted = {record.device_id: record for record in message.devices}
        changed = not self.routes_sent
        for device_id in [d for d in self.devices if d not in wanted]:
            self.log.info("device %s is gone; stopping its actor", device_id)
            _retire(self.devices.pop(device_id), "removed")
            self.central_ids.pop(device_id, None)
            changed = True
        for device_id, record in wanted.items():
            if device_id in self.devices and self.central_ids.get(device_id) != record.central_id:
                # the central renumbered it: its actor's stream topic is stale
                _join(self.devices.pop(device_id))
            if device_id not in self.devices:
                self.devices[device_id] = DeviceActor.start(
                    record,
                    self.topics,
                    self._peers(),
                    self.timing,
                    supervisor=self.actor_ref,
                    policy=self.board_policy,
                )
                self.central_ids[device_id] = record.central_id
                changed = True
        self.records = {d: wanted[d] for d in self.devices}
        if changed:
            self.log.info("%d devices known", len(self.devices))
            self.routes_sent = tell_if_alive(self.core["mqtt"], RoutesChanged(self.devices))
            self._send_central_routes()
        if changed or message.synced:
            self._send_accounts()

    def _send_accounts(self) -> None:
        """The signer follows the balances of the boards' owners (re-read after a sync)."""
        if "signer" in self.core:
            accounts = tuple(
                TokenAccount(d, record.pk, record.account_address, self.devices[d])
                for d, record in sorted(self.records.items())
                if record.account_address
            )
            tell_if_alive(self.core["signer"], AccountsChanged(accounts))

    def _send_central_routes(self) -> None:
        """The uplink routes the central's commands by the central's device ids."""
        if "uplink" in self.core:
            routes = {
                self.central_ids[d]: ref
                for d, ref in self.devices.items()
                if self.central_ids.get(d) is not None
            }
            tell_if_alive(self.core["uplink"], CentralRoutesChanged(routes))

    @handles(Tick)
    def _tick(self, tick: Tick) -> None:
        for ref in self.devices.values():
            tell_if_alive(ref, tick)

    # -- supervision -----------------------------------------------------------------------

    @handles(ActorFailed)
    def _failed(self, failure: ActorFailed) -> None:
        if self.stopping:
            return
        delay = self.policy.delay(failure.name, self.clock())
        if failure.name in OPTIONAL_ROLES and (
            self.policy.recent_failures(failure.name) >= OPTIONAL_GIVE_UP
        ):
            self.core.pop(failure.name, None)
            self.log.error(
                "%s failed %d times in a row (%s); running without it until restarted",
                failure.name,
                OPTIONAL_GIVE_UP,
                failure.reason,
            )
            return
        self.log.error(
            "%s crashed (%s); restarting in %.1fs", failure.name, failure.reason, delay
        )
        if failure.name.startswith("device:"):
            device_id = DeviceId(failure.name.removeprefix("device:"))
            self.devices.pop(device_id, None)
        timer = threading.Timer(delay, tell_if_alive, (self.actor_ref, RestartActor(failure.name)))
        timer.daemon = True
        timer.start()
        self.timers = [t for t in self.timers if t.is_alive()] + [timer]

    @handles(RestartActor)
    def _restart(self, message: RestartActor) -> None:
        if self.stopping:
            return
        if message.name.startswith("device:"):
            # the new actor resumes from the database
            tell_if_alive(self.core["db"], LoadDevices(self.actor_ref, frozenset(self.devices)))
            # readings that died in its mailbox are unacknowledged: have the broker send them again
            tell_if_alive(self.core["mqtt"], Reconnect())
            return
        self.core[message.name] = self._start_core(message.name)
        self._announce_peers()
        if message.name == "mqtt":
            tell_if_alive(self.core["mqtt"], RoutesChanged(self.devices))
        elif message.name == "uplink":
            self._send_central_routes()
        elif message.name == "signer":
            self._send_accounts()
        elif message.name == "db":
            # The readings the dead writer held are unacknowledged and come again after a
            # reconnect; the device actors counted their energy already, so they restart
            # too and resume from what the database committed.
            for ref in self.devices.values():
                _join(ref)
            self.devices.clear()
            tell_if_alive(self.core["db"], LoadDevices(self.actor_ref))
            tell_if_alive(self.core["mqtt"], Reconnect())
        self.log.info("%s restarted", message.name)

    @handles(GetActors)
    def _actors(self, _message: GetActors) -> tuple[ActorInfo, ...]:
        restarts = self.policy.restarts
        entries = [(role, ref) for role, ref in self.core.items()]
        entries += [(f"device:{d}", ref) for d, ref in sorted(self.devices.items())]
        return (
            ActorInfo("supervisor", self.kind, self.actor_ref, 0),
            *(
                ActorInfo(name, name.split(":")[0], ref, restarts.get(name, 0))
                for name, ref in entries
            ),
        )

    @handles(GetStats)
    def _stats(self, _message: GetStats) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "restarts": dict(self.policy.restarts),
            "actors": {
                **{role: ref.is_alive() for role, ref in self.core.items()},
                **{f"device:{d}": ref.is_alive() for d, ref in self.devices.items()},
            },
        }


def _retire(ref: pykka.ActorRef[Any], reason: str) -> None:
    """Tell the board to go idle (instruction 0), then stop its actor."""
    tell_if_alive(ref, SendInstruction(Instruction.DISCONNECT, reason))
    with contextlib.suppress(pykka.ActorDeadError):
        ref.stop(block=False)


def _join(ref: pykka.ActorRef[Any], stop: bool = True, timeout: float = 10.0) -> None:
    try:
        if stop:
            ref.stop(block=True, timeout=timeout)
    except (pykka.ActorDeadError, pykka.Timeout):
        pass
