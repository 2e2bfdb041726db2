"""Looking inside a running gateway by asking its actors (for the REPL and /metrics).

Every answer comes from a message the actor itself handles, with a timeout: no
attribute of an actor is read from another thread. Mailbox depths come from the
actors' refs (a queue size, safe from any thread).
"""

from __future__ import annotations

from typing import Any

import pykka

from actors.base import tell_if_alive
from estate.db.outbox import OutboxState
from estate.device_wire import Instruction
from estate.messages import (
    ActorInfo,
    GetActors,
    GetDeviceState,
    GetLedgerSummary,
    GetOutboxState,
    GetStats,
    SendInstruction,
    SyncNow,
)

__all__ = ["Introspection", "UnknownDevice"]


class UnknownDevice(LookupError):
    """No actor runs for that device id."""


class Introspection:
    """Asks the Supervisor, then the actors it names, with a bounded wait."""

    def __init__(self, supervisor: pykka.ActorRef[Any], timeout: float = 2.0) -> None:
        self.supervisor, self.timeout = supervisor, timeout

    def actor_infos(self) -> tuple[ActorInfo, ...]:
        return self.supervisor.ask(GetActors(), timeout=self.timeout)

    def actors(self) -> list[dict[str, Any]]:
        """Every actor: name, kind, alive, mailbox depth, restarts."""
        return [
            {
                "name": info.name,
                "kind": info.kind,
                "alive": info.ref.is_alive(),
                "mailbox": mailbox_depth(info.ref),
                "restarts": info.restarts,
            }
            for info in self.actor_infos()
        ]

    def _device_refs(self) -> dict[str, pykka.ActorRef[Any]]:
        return {
            info.name.removeprefix("device:"): info.ref
            for info in self.actor_infos()
            if info.kind == "device"
        }

    def devices(self) -> list[dict[str, Any]]:
        """Each device's state, asked of all device actors at once."""
        refs = self._device_refs()
        futures = {}
        for device_id, ref in refs.items():
            try:
                futures[device_id] = ref.ask(GetDeviceState(), block=False)
            except pykka.ActorDeadError:
                continue
        rows = []
        for device_id, future in futures.items():
            try:
                state = future.get(timeout=self.timeout)
            except (pykka.Timeout, pykka.ActorDeadError):
                state = {"device_id": device_id, "status": "not answering"}
            rows.append({**state, "mailbox": mailbox_depth(refs[device_id])})
        return rows

    def device(self, device_id: str) -> dict[str, Any]:
        """One device's full state, asked of its actor."""
        ref = self._device_ref(device_id)
        return {**ref.ask(GetDeviceState(), timeout=self.timeout), "mailbox": mailbox_depth(ref)}

    def send(self, device_id: str, instruction: int, reason: str = "repl") -> None:
        """Have the device's actor send `instruction` (0-3) to its board."""
        self._device_ref(device_id).tell(SendInstruction(Instruction(instruction), reason))

    def _device_ref(self, device_id: str) -> pykka.ActorRef[Any]:
        ref = self._device_refs().get(device_id)
        if ref is None:
            raise UnknownDevice(f"no device {device_id!r} is known (see devices())")
        return ref

    def sync(self) -> bool:
        """Ask the central actor to sync the devices now; False without a central."""
        central = {info.name: info.ref for info in self.actor_infos()}.get("central")
        return central is not None and tell_if_alive(central, SyncNow())

    def outbox(self) -> OutboxState | None:
        """Readings the central does not have yet; None without a central (or no answer)."""
        refs = {info.name: info.ref for info in self.actor_infos()}
        if "central" not in refs or "db" not in refs:
            return None
        try:
            return refs["db"].ask(GetOutboxState(), timeout=self.timeout)
        except (pykka.Timeout, pykka.ActorDeadError):
            return None

    def ledger(self) -> dict[str, int] | None:
        """Ledger entries and tokens by state; None without token accounting (or no answer)."""
        refs = {info.name: info.ref for info in self.actor_infos()}
        if "signer" not in refs or "db" not in refs:
            return None
        try:
            return refs["db"].ask(GetLedgerSummary(), timeout=self.timeout)
        except (pykka.Timeout, pykka.ActorDeadError):
            return None

    def stats(self) -> dict[str, Any]:
        """Counters of the supervisor and of each core actor, by actor name."""
        result: dict[str, Any] = {}
        for info in self.actor_infos():
            if info.kind == "device":
                continue
            try:
                result[info.name] = info.ref.ask(GetStats(), timeout=self.timeout)
            except (pykka.Timeout, pykka.ActorDeadError) as exc:
                result[info.name] = {"error": f"{type(exc).__name__}: not answering"}
        return result


def mailbox_depth(ref: pykka.ActorRef[Any]) -> int:
    """Messages waiting in an actor's inbox."""
    inbox = getattr(ref, "actor_inbox", None)
    return inbox.qsize() if inbox is not None else 0
