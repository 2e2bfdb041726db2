"""The database goes away under load and comes back: nothing the broker accepted is lost.

The gateway runs in this process on a private PostgreSQL (estate/postgres.py, never the
system cluster) with the system Mosquitto and three simulated boards. The private
cluster is stopped for about 3 s while readings stream, then started again on the same
port and data. While it is down the DbWriter keeps the readings, unacknowledged, and
retries with backoff; afterwards every accepted reading is stored exactly once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import pykka
import pytest
from helpers import (
    RawClient,
    board_state,
    clear_retained,
    core_ref,
    mqtt_stats,
    quiesce,
    register,
    stored_seqs,
    wait_for,
)

from actors.gateway import Gateway
from actors.simulated_board import SimulatedBoard
from estate.db.engine import upgrade
from estate.device_wire import TopicKind, Topics
from estate.messages import GetStats
from estate.postgres import PostgresProcess

pytestmark = pytest.mark.integration

BOARDS = ("H001", "H002", "H003")
OUTAGE = 3.0


def db_stats(gateway: Gateway) -> dict[str, Any]:
    return core_ref(gateway, "db").ask(GetStats(), timeout=10)


def assert_stored_once(
    engine: Any, pks: dict[str, int], accepted: dict[str, tuple[int, ...]]
) -> None:
    """Wait until the database holds every accepted reading, each exactly once."""
    want = {pks[d]: sorted(seqs) for d, seqs in accepted.items()}
    for seqs in want.values():
        assert seqs == list(range(1, len(seqs) + 1))

    def all_stored() -> bool:
        have = stored_seqs(engine)  # repeats kept: a duplicate never compares equal
        return all(sorted(have.get(pk, [])) == seqs for pk, seqs in want.items())

    try:
        wait_for(all_stored, 15, "every accepted reading stored once")
    except AssertionError:
        have = stored_seqs(engine)
        for device_id, pk in pks.items():
            stored = have.get(pk, [])
            print(
                f"{device_id}: missing {sorted(set(want[pk]) - set(stored))} "
                f"extra {sorted(set(stored) - set(want[pk]))} "
                f"duplicated {sorted({s for s in stored if stored.count(s) > 1})}"
            )
        raise


def test_database_outage_loses_nothing(
    private_pg: PostgresProcess,
    mosquitto_url: str,
    hub: str,
    make_settings: Callable[..., Any],
    engine_for: Callable[[str], Any],
) -> None:
    url = private_pg.url
    upgrade(url)
    engine = engine_for(url)
    pks = register(engine, *BOARDS)
    settings = make_settings(
        DATABASE_URL=url,
        MQTT_URL=mosquitto_url,
        DB_AUTO_MIGRATE="false",
        MQTT_SESSION_EXPIRY="60",  # leave no week-long session on the broker
    )
    gateway: Gateway | None = None
    boards: dict[str, pykka.ActorRef[Any]] = {}
    try:
        # a retained status the gateway receives the moment its subscription is active
        probe = RawClient(mosquitto_url)
        probe.publish(Topics(hub).of(BOARDS[0], TopicKind.STATUS), b"offline", retain=True)
        probe.close()
        gateway = Gateway(settings).start()
        wait_for(
            lambda: mqtt_stats(gateway).get("received", 0) >= 1,
            15,
            "the gateway to connect and subscribe",
        )
        for device_id in BOARDS:
            boards[device_id] = SimulatedBoard.start(
                mosquitto_url, hub, device_id, interval=0.1, hello_interval=0.5
            )
        wait_for(
            lambda: all(len(board_state(b)["accepted"]) >= 10 for b in boards.values()),
            15,
            "10 accepted readings a board",
        )
        wait_for(lambda: stored_seqs(engine), 10, "readings stored before the outage")

        private_pg.stop()
        stopped = time.monotonic()
        accepted_before = sum(len(board_state(b)["accepted"]) for b in boards.values())
        wait_for(lambda: db_stats(gateway).get("flush_failures", 0) > 0, 5, "a failed flush")
        assert db_stats(gateway)["failing"] is True
        time.sleep(max(0.0, stopped + OUTAGE - time.monotonic()))
        # the boards kept publishing to the broker all along
        assert sum(len(board_state(b)["accepted"]) for b in boards.values()) > (
            accepted_before + 30
        )
        private_pg.start()

        wait_for(lambda: not db_stats(gateway)["failing"], 20, "the DbWriter to recover")
        assert_stored_once(engine, pks, quiesce(boards))

        stats = db_stats(gateway)
        assert stats["flush_failures"] > 0
        assert stats["failing"] is False
        assert stats.get("rejected_by_db", 0) == 0
        assert stats["pending"] == 0
    finally:
        for ref in boards.values():
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                ref.stop(block=True, timeout=10)
        if gateway is not None:
            gateway.stop()
        clear_retained(mosquitto_url, hub, pks)
