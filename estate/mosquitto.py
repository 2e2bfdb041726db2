"""A private Mosquitto process on a free loopback port, for tests and benchmarks.

It uses the limits of the shipped `deploy/mosquitto.conf` (a deep queue, a wide
in-flight window) so that what it measures is the gateway, not the broker's defaults.
It runs as the user that starts it (Mosquitto started as root would otherwise switch
to the `mosquitto` user, which cannot write its private folder) and logs to
`<folder>/mosquitto.log`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from estate.embedded_broker import free_port

__all__ = ["MosquittoProcess"]

LIMITS = """\
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 2000
"""


class MosquittoProcess:
    """`mosquitto -c <private conf>` on 127.0.0.1:<free port>; `kill()` stops only it.

    `extra_config` is appended to the configuration (for instance a second `listener`
    with TLS); `allow_anonymous=False` requires a `password_file` in it. `kill()` then
    `start()` (or `restart()`) brings the broker back on the same port with the same
    folder, so with `persistence` its saved sessions too.
    """

    def __init__(
        self, extra_config: str = "", persistence: bool = False, allow_anonymous: bool = True
    ) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="estate-mosquitto-"))
        persistence_lines = (
            f"persistence true\npersistence_location {self.folder}/\n" if persistence else ""
        )
        self.config = self.folder / "mosquitto.conf"
        self.log_path = self.folder / "mosquitto.log"
        anonymous = "true" if allow_anonymous else "false"
        self.config.write_text(
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous {anonymous}\n"
            f"{persistence_lines}{LIMITS}{extra_config}"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        with self.log_path.open("ab") as log:  # a file: a pipe nobody reads would fill up
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.log_path.read_text(errors="replace")
                raise RuntimeError(f"mosquitto exited at start: {error.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"mosquitto did not listen on port {self.port} in {timeout}s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self, down: float = 0.0, timeout: float = 10.0) -> MosquittoProcess:
        """SIGKILL the broker, wait `down` seconds, start it again on the same port."""
        self.kill()
        time.sleep(down)
        return self.start(timeout)

    def log(self) -> str:
        """What the broker logged so far (all its runs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
