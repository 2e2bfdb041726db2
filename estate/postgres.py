"""A private PostgreSQL cluster on a free loopback port, for tests that stop or kill the database.

Like `estate.mosquitto.MosquittoProcess`, but PostgreSQL refuses to run as root: when
this process is root, the cluster's folder is given to the `postgres` OS user and
`initdb` / `pg_ctl` run as that user through `runuser -u postgres -- ...`.

The cluster lives entirely in its own temporary folder (data, Unix socket, log), listens
on 127.0.0.1 only, on a port that is never the system cluster's 5432, so it cannot
disturb the machine's PostgreSQL:

    pg = PostgresProcess().start()
    engine = create_engine(pg.url)
    pg.stop()      # fast shutdown, the data is kept
    pg.start()     # same port, same data
    pg.kill()      # immediate shutdown (crash recovery at the next start)
    pg.destroy()   # stop if needed and remove the folder
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from estate.embedded_broker import free_port

__all__ = ["PostgresProcess", "postgres_bin_dir"]

SYSTEM_PORT = 5432
OS_USER = "postgres"


def postgres_bin_dir() -> Path:
    """The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `pg_ctl`."""
    candidates = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if (p / "initdb").is_file() and (p / "pg_ctl").is_file()
    ]
    if not candidates:
        raise FileNotFoundError(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin "
            "(apt-get install postgresql)"
        )

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)

    return max(candidates, key=version)


def _temp_root(as_root: bool) -> str:
    """The temp folder, or /tmp when the `postgres` user could not enter it."""
    root = tempfile.gettempdir()
    if as_root and not os.stat(root).st_mode & 0o001:
        return "/tmp"  # world-traversable, unlike e.g. /root/tmp
    return root


class PostgresProcess:
    """A throw-away cluster: `initdb` (trust auth) in a temp folder, `pg_ctl` to run it."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = postgres_bin_dir()
        self.port = port or free_port()
        if self.port == SYSTEM_PORT:
            raise ValueError("port 5432 belongs to the system cluster; pick another")
        self.as_root = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="estate-pg-", dir=_temp_root(self.as_root)))
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "socket"
        self.logfile = self.folder / "postgres.log"
        self.socket_dir.mkdir()
        if self.as_root:
            user = pwd.getpwnam(OS_USER)
            for path in (self.folder, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.initialized = False
        self.running = False
        atexit.register(self.destroy)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    # -- running the binaries ------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", OS_USER, "--", *command]
        # Nothing from the caller's environment may point the tools at another cluster.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PG") and k not in {"LC_ALL", "LANG", "LANGUAGE"}
        }
        env["LC_ALL"] = "C"
        return subprocess.run(
            command,
            cwd=self.folder,  # the postgres user may not enter the caller's working folder
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = ""
            with contextlib.suppress(OSError):
                log = self.logfile.read_text()[-2000:]
            raise RuntimeError(
                f"{what} failed ({result.returncode}): {result.stderr.strip()} "
                f"{result.stdout.strip()[-1000:]}\n{log}".strip()
            )

    def _initdb(self) -> None:
        result = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        self._check(result, "initdb")
        self.initialized = True

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PostgresProcess:
        """Start the cluster (running `initdb` the first time); return once it accepts."""
        if self.running:
            return self
        if not self.folder.exists():
            raise RuntimeError(f"{self.folder} was destroyed")
        if not self.initialized:
            self._initdb()
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=50 -c shared_buffers=16MB"
        )
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-o",
            options,
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )
        self._check(result, f"pg_ctl start on port {self.port}")
        self.running = True
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"PostgreSQL did not listen on port {self.port} in {timeout}s"
                    ) from None
                time.sleep(0.05)

    def _pg_ctl_stop(self, mode: str) -> None:
        # the pid file also covers a server left starting by a failed or timed-out start
        if not self.running and not (self.data / "postmaster.pid").exists():
            return
        result = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        # "PID file does not exist": the server is already gone
        if result.returncode != 0 and (self.data / "postmaster.pid").exists():
            self._check(result, f"pg_ctl stop -m {mode}")
        self.running = False

    def stop(self) -> None:
        """Fast shutdown (sessions are ended, the data is kept); `start()` runs it again."""
        self._pg_ctl_stop("fast")

    def kill(self) -> None:
        """Immediate shutdown, like a crash: the next `start()` runs crash recovery."""
        self._pg_ctl_stop("immediate")

    def destroy(self) -> None:
        """Stop the cluster if it runs and remove its folder; safe to call twice."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            atexit.unregister(self.destroy)

    def __enter__(self) -> PostgresProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.destroy()
