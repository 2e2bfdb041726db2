"""Shared fixtures: the real PostgreSQL and Mosquitto on loopback, unique hubs, clean actors.

A missing service fails the tests that need it (never a silent skip): CI starts both.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator

import pykka
import pytest
from helpers import starknet_node
from sqlalchemy import create_engine, text

from estate.config import Settings, load_settings
from estate.db.engine import driver_url, make_engine, upgrade
from estate.db.scratch import scratch_database
from estate.fake_starknet import FakeStarknetNode
from estate.postgres import PostgresProcess

PG_ADMIN_URL = os.environ.get("ESTATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
MOSQUITTO_URL = os.environ.get("ESTATE_TEST_MQTT", "mqtt://127.0.0.1:1883")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    """The machine's Mosquitto; fails loudly when it is not running."""
    if not _reachable("127.0.0.1", 1883):
        pytest.fail(
            "Mosquitto is not listening on 127.0.0.1:1883: start it with "
            "`mosquitto -d -c /etc/mosquitto/mosquitto.conf` (bash .ci/run does)"
        )
    return MOSQUITTO_URL


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """An admin URL of the machine's PostgreSQL; fails loudly when it is down."""
    engine = create_engine(driver_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # noqa: BLE001  (any failure means: not usable)
        pytest.fail(
            f"PostgreSQL is not usable at {PG_ADMIN_URL} ({exc}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    yield PG_ADMIN_URL
    engine.dispose()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test, dropped afterwards."""
    with scratch_database(pg_server, "estate_test") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'estate.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs on both databases."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def hub() -> str:
    """A hub name no other test uses, so topics and broker sessions never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_settings(hub: str) -> Callable[..., Settings]:
    def make(**env: str) -> Settings:
        defaults = {"HUB_NAME": hub, "HEALTH_ADDRESS": "127.0.0.1:0", "REPL_SOCKET": "off"}
        return load_settings({**defaults, **env}, env_file=None)

    return make


@pytest.fixture(autouse=True)
def _no_leftover_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=10)


@pytest.fixture
def engine_for() -> Iterator[Callable[[str], object]]:
    engines = []

    def make(url: str):
        engine = make_engine(url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def node() -> Iterator[FakeStarknetNode]:
    """A fake Starknet node where the gateway's test account may consume SCT."""
    fake = starknet_node()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PostgresProcess]:
    """A private PostgreSQL cluster (not the system one) that a test may stop, kill, restart.

    One per test module, destroyed (process and folder) at the module's end. Its `url`
    is the cluster's `postgres` database, not migrated.
    """
    pg = PostgresProcess()
    try:
        yield pg.start()
    finally:
        pg.destroy()
