"""The project's actor base class and its timer: how every actor is scheduled and supervised.

Every actor derives from `EstateActor`, so that moving actors from a thread each
to a shared pool of workers is a change in this one module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import pykka

from estate.messages import ActorFailed, PeersChanged

__all__ = ["EstateActor", "Ticker", "handles", "tell_if_alive"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def tell_if_alive(ref: pykka.ActorRef[Any], message: Any) -> bool:
    """Tell `message` to `ref`; False if that actor has stopped (its restart re-sends state)."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        return False
    return True


def handles(*message_types: type) -> Callable[[F], F]:
    """Mark an actor method as the handler of these message types."""

    def mark(method: F) -> F:
        method._handles = message_types  # type: ignore[attr-defined]
        return method

    return mark


class EstateActor(pykka.ThreadingActor):
    """An actor with a name, a supervisor to report failure to, and typed message handlers.

    Subclasses mark their handlers with `@handles(MessageType)`, do their I/O set-up
    in `setup()` and tear-down in `teardown()`.
    """

    kind = "actor"
    _handlers: ClassVar[dict[type, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = {
            message_type: name
            for klass in reversed(cls.__mro__)
            for name, method in vars(klass).items()
            for message_type in getattr(method, "_handles", ())
        }

    def __init__(self, name: str, supervisor: pykka.ActorRef[Any] | None = None) -> None:
        super().__init__()
        self.name = name
        self.supervisor = supervisor
        self.log = logging.getLogger(f"estate.{self.kind}")
        self.peers: dict[str, pykka.ActorRef[Any]] = {}

    def setup(self) -> None:
        """Acquire the resource this actor owns (runs in the actor's thread)."""

    def teardown(self) -> None:
        """Release it (runs in the actor's thread when the actor stops)."""

    def on_start(self) -> None:
        try:
            self.setup()
        except Exception as exc:
            # pykka calls no on_failure for a failed start: release what setup acquired
            try:
                self.teardown()
            except Exception:
                self.log.exception("%s: tear-down after a failed start failed too", self.name)
            self._report(exc)
            raise

    def on_stop(self) -> None:
        self.teardown()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self._report(exception_value)
        try:
            self.teardown()
        except Exception:
            self.log.exception("%s: tear-down after a failure failed too", self.name)

    def _report(self, exc: BaseException | None) -> None:
        if self.supervisor is not None:
            self.supervisor.tell(ActorFailed(self.name, f"{type(exc).__name__}: {exc}"))

    @handles(PeersChanged)
    def _peers_changed(self, message: PeersChanged) -> None:
        """The current refs of the actors this one talks to (sent again after a restart)."""
        self.peers = dict(message.peers)

    def on_receive(self, message: Any) -> Any:
        name = self._handlers.get(type(message))
        if name is None:
            raise TypeError(f"{self.name} does not handle {type(message).__name__}")
        return getattr(self, name)(message)


class Ticker:
    """Tells `message` to an actor every `period` seconds until stopped or the actor dies."""

    def __init__(self, ref: pykka.ActorRef[Any], message: Any, period: float) -> None:
        self._ref, self._message, self._period = ref, message, period
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"ticker-{type(message).__name__}", daemon=True
        )

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._period):
            if not tell_if_alive(self._ref, self._message):
                return
