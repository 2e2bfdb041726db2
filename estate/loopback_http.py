"""The life cycle the fake peers share: an HTTP server on loopback that can go down and
come back on the same port, dropping its open connections like a dead process would."""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["LoopbackService", "TrackingHTTPServer"]


class TrackingHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections, to drop them at once.

    `fake` is the service the handlers answer for.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: Any
    ) -> None:
        self.fake = fake
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.accepted = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.open_connections.add(request)
            self.accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.connections_lock:
            connections, self.open_connections = self.open_connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                connection.close()


class LoopbackService:
    """start/stop, down/up on the same port, `url`; subclasses name their `handler`."""

    handler: type[BaseHTTPRequestHandler]
    thread_name = "fake"

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._server: TrackingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> Self:
        """Listen (on `port`, or a free one when 0) and serve on a daemon thread."""
        self._stopping.clear()
        self._listen()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection."""
        self._stopping.set()
        self._close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def down(self) -> None:
        """Stop listening (clients get connection refused) but keep the state and the port."""
        self._close()

    def up(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            self._listen()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    def _listen(self) -> None:
        server = TrackingHTTPServer((self._host, self._port), self.handler, self)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.thread_name}-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
