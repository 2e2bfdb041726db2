"""The DbWriter actor on its own, with a Recorder as its `mqtt` peer, on both databases.

A flush the database refuses for its data (here: rows of a device that does not
exist) must not block the rest: the good rows are stored, every reading is
acknowledged, the refused ones are counted. A database that cannot be reached keeps
everything waiting, unacknowledged, for the retry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pykka
import pytest
from helpers import command_rows, device_row, reading_rows, register, wait_for

from actors.db_writer import DbWriter
from actors.testing import Recorder
from estate.embedded_broker import free_port
from estate.messages import (
    AckMessages,
    AckToken,
    GetRecorded,
    GetStats,
    PeersChanged,
    RecordCommand,
    RecordDeviceState,
    StoreReading,
)
from estate.types import DevicePk

pytestmark = pytest.mark.integration

START = datetime(2025, 1, 1, tzinfo=UTC)
MISSING_PK = 987_654


def reading(pk: int, seq: int, mid: int) -> StoreReading:
    at = START + timedelta(seconds=seq)
    return StoreReading(
        device_pk=DevicePk(pk),
        boot=0,
        seq=seq,
        digest=f"d{pk}-{seq}",
        ts=at,
        received_at=at,
        voltage=12.0,
        current=0.5,
        power=6.0,
        energy_wh=0.01,
        load_on=True,
        current_1=None,
        voltage_1=None,
        ack=AckToken(generation=1, mid=mid),
    )


@pytest.fixture
def recorder() -> Iterator[pykka.ActorRef[Any]]:
    ref = Recorder.start("mqtt")
    yield ref
    if ref.is_alive():
        ref.stop()


def start_writer(url: str, recorder: pykka.ActorRef[Any], **options: Any) -> pykka.ActorRef[Any]:
    return DbWriter.start(url, peers=PeersChanged({"mqtt": recorder}), **options)


def acked(recorder: pykka.ActorRef[Any]) -> list[AckToken]:
    messages = recorder.ask(GetRecorded(), timeout=5)
    return [t for m in messages if isinstance(m, AckMessages) for t in m.tokens]


def stats(writer: pykka.ActorRef[Any]) -> dict[str, Any]:
    return writer.ask(GetStats(), timeout=10)


def test_refused_rows_are_counted_acked_and_do_not_block(
    db_url: str,
    engine_for: Any,
    recorder: pykka.ActorRef[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = engine_for(db_url)
    pk = register(engine, "H001")["H001"]
    # a long flush interval: everything below lands in one batch, which the database refuses
    writer = start_writer(db_url, recorder, flush_interval=0.3)
    good = [reading(pk, seq, mid=seq) for seq in range(1, 6)]
    bad = reading(MISSING_PK, 3, mid=100)
    batch = [*good[:2], bad, *good[2:]]
    with caplog.at_level(logging.WARNING, logger="estate.db"):
        for message in batch:
            writer.tell(message)
        writer.tell(RecordDeviceState(DevicePk(pk), "online", True, START))
        writer.tell(RecordCommand(DevicePk(MISSING_PK), START, 0, 1, "handshake"))
        writer.tell(RecordCommand(DevicePk(pk), START, 0, 1, "handshake"))

        wait_for(lambda: len(acked(recorder)) >= len(batch), 10, "every reading acknowledged")
        wait_for(lambda: stats(writer)["pending"] == 0, 5, "nothing pending")

    # every reading acknowledged once, the refused one included
    assert sorted(t.mid for t in acked(recorder)) == sorted(r.ack.mid for r in batch)
    rows = reading_rows(engine)
    assert [(r.device_pk, r.seq) for r in rows] == [(pk, seq) for seq in range(1, 6)]
    assert device_row(engine, "H001").status == "online"
    assert device_row(engine, "H001").energy_total_wh == pytest.approx(0.05)
    assert [(c.instruction, c.reason) for c in command_rows(engine, pk)] == [(1, "handshake")]
    s = stats(writer)
    assert s["rejected_by_db"] == 1
    assert s["commands_rejected_by_db"] == 1
    assert s.get("states_rejected_by_db", 0) == 0
    assert s["stored"] == 5
    assert s["flushes_one_by_one"] == 1
    assert s.get("flush_failures", 0) == 0
    assert s["failing"] is False
    # a clear error names the device and the reason
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"device pk {MISSING_PK} (seq 3)" in e and "reading" in e for e in errors), errors
    assert any(f"command of device pk {MISSING_PK}" in e for e in errors), errors
    assert all("foreign key" in e.lower() for e in errors), errors

    # the writer goes on: later readings are stored by ordinary batch flushes
    later = [reading(pk, seq, mid=seq) for seq in range(6, 9)]
    for message in later:
        writer.tell(message)
    wait_for(lambda: len(acked(recorder)) == len(batch) + 3, 10, "the later readings acked")
    assert [r.seq for r in reading_rows(engine)] == list(range(1, 9))
    s = stats(writer)
    assert s["flushes"] >= 1
    assert s["flushes_one_by_one"] == 1
    assert s["rejected_by_db"] == 1
    writer.stop()


def test_unreachable_database_is_retried_and_nothing_is_acked(
    recorder: pykka.ActorRef[Any],
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens
    writer = start_writer(url, recorder, flush_interval=0.01)
    for seq in range(1, 4):
        writer.tell(reading(1, seq, mid=seq))
    s = wait_for(
        lambda: (s := stats(writer)).get("flush_failures", 0) >= 2 and s,
        10,
        "two failed flushes (the first retry after 0.5 s)",
    )
    assert s["failing"] is True
    assert s["pending"] == 3
    assert s.get("rejected_by_db", 0) == 0
    writer.stop()
    assert acked(recorder) == []
