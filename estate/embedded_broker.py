"""The embedded MQTT broker (amqtt) for trying the gateway with nothing else installed.

It does not keep unacknowledged messages for a disconnected client, so the gateway's
no-loss guarantee needs Mosquitto (or another broker that honours persistent sessions).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

__all__ = ["EmbeddedBroker", "free_port"]

logger = logging.getLogger(__name__)


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` if nothing listens there, else a free port the system picks."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError("no free TCP port on loopback")


class EmbeddedBroker:
    """An amqtt broker on loopback, running on its own thread and event loop."""

    def __init__(self, port: int = 11883, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(port, host)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-broker")
        self._thread.daemon = True
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._thread.start()

        async def start() -> Any:
            broker = Broker(config)
            await broker.start()
            return broker

        self._broker = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
