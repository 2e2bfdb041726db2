"""The relay outbox (estate/db/outbox.py) on SQLite and PostgreSQL: claims, sends, prunes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from estate.central_wire import ReadingsBatch, RelayedReading
from estate.db.models import ReadingRow, RelayBatchRow
from estate.db.outbox import OutboxState, claim_batch, mark_sent, outbox_state, prune_relayed
from estate.db.store import register_device, write_batch
from estate.messages import StoreReading
from estate.types import DevicePk

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)
AGE = timedelta(seconds=60)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def reading(pk: DevicePk, seq: int, received: float, *, lag: float = 0.25) -> StoreReading:
    """A reading received at `received` s, measured `lag` s earlier; its power is `seq`."""
    return StoreReading(
        device_pk=pk,
        boot=0,
        seq=seq,
        digest=f"dig{seq}",
        ts=at(received - lag),
        received_at=at(received),
        voltage=12.0,
        current=seq / 12.0,
        power=float(seq),
        energy_wh=0.5,
        load_on=True,
        current_1=None,
        voltage_1=None,
    )


def relayed(device_id: str, r: StoreReading) -> RelayedReading:
    return RelayedReading(device_id, r.ts, r.voltage, r.current, r.power, r.energy_wh)


@pytest.fixture
def engine(db_url: str, engine_for: Callable[[str], Engine]) -> Engine:
    return engine_for(db_url)


@pytest.fixture
def devices(engine: Engine) -> tuple[DevicePk, DevicePk]:
    with engine.begin() as conn:
        return (
            register_device(conn, "H001", "Consumer"),
            register_device(conn, "H002", "Producer"),
        )


def write(engine: Engine, readings: list[StoreReading]) -> None:
    with engine.begin() as conn:
        assert write_batch(conn, readings).inserted == len(readings)


def claim(
    engine: Engine, now: datetime, max_size: int = 3, max_age: timedelta = AGE
) -> ReadingsBatch | None:
    with engine.begin() as conn:
        return claim_batch(conn, max_size, max_age, now)


def sent(engine: Engine, batch_id: str, now: datetime) -> None:
    with engine.begin() as conn:
        mark_sent(conn, batch_id, now)


def state(engine: Engine) -> OutboxState:
    with engine.connect() as conn:
        return outbox_state(conn)


def prune(engine: Engine, older_than: datetime) -> int:
    with engine.begin() as conn:
        return prune_relayed(conn, older_than)


def reading_batches(engine: Engine) -> dict[int, str | None]:
    """Every stored reading's id and its relay batch."""
    with engine.connect() as conn:
        rows = conn.execute(select(ReadingRow.id, ReadingRow.relay_batch).order_by(ReadingRow.id))
        return {row.id: row.relay_batch for row in rows}


def batch_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(RelayBatchRow.batch_id)).scalars())


def test_claim_returns_none_when_nothing_waits(engine: Engine, devices: object) -> None:
    assert claim(engine, at(10_000)) is None
    assert batch_ids(engine) == set()


def test_claim_waits_until_the_size_or_the_age_bound(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    pk, _ = devices
    write(engine, [reading(pk, 1, 0), reading(pk, 2, 10)])
    # two of three wait and the oldest waited 59.999 s of 60: no batch, and none made
    assert claim(engine, at(30)) is None
    assert claim(engine, at(59.999)) is None
    assert batch_ids(engine) == set()
    assert set(reading_batches(engine).values()) == {None}
    # the oldest has waited max_age: a batch of the two
    batch = claim(engine, at(60))
    assert batch is not None
    assert [r.power for r in batch.readings] == [1.0, 2.0]


def test_claim_takes_a_full_batch_before_the_age_bound(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    pk, _ = devices
    write(engine, [reading(pk, 1, 0), reading(pk, 2, 1)])
    assert claim(engine, at(2)) is None
    write(engine, [reading(pk, 3, 2)])
    batch = claim(engine, at(3))
    assert batch is not None
    assert [r.power for r in batch.readings] == [1.0, 2.0, 3.0]


def test_batch_holds_readings_in_id_order_with_device_id_and_iso_ts(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    a, b = devices
    # received out of time order, so that only the id order explains the batch's order
    first = [reading(a, 1, 5), reading(b, 2, 1), reading(a, 3, 3)]
    later = [reading(b, 4, 0), reading(a, 5, 2)]
    write(engine, first)
    write(engine, later)
    batch = claim(engine, at(1), max_size=3)
    assert batch is not None
    assert len(batch.readings) == 3
    names = {a: "H001", b: "H002"}
    assert batch.readings == tuple(relayed(names[r.device_pk], r) for r in first)
    assert [r.device_id for r in batch.readings] == ["H001", "H002", "H001"]
    # the measurement time (not the receive time), as ISO 8601 UTC with Z
    assert batch.readings[0].ts == "2024-06-01T12:00:04.750Z"
    assert batch.readings[1].ts == "2024-06-01T12:00:00.750Z"
    # the claim marked exactly those readings, in the batch's table with its size
    marked = reading_batches(engine)
    ids = sorted(marked)
    assert [marked[i] for i in ids] == [batch.batch_id] * 3 + [None] * 2
    with engine.connect() as conn:
        row = conn.execute(select(RelayBatchRow.__table__)).one()
    assert (row.batch_id, row.size, row.created_at, row.sent_at) == (
        batch.batch_id,
        3,
        at(1),
        None,
    )


def test_a_large_max_size_takes_every_waiting_reading(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    pk, _ = devices
    readings = [reading(pk, seq, seq) for seq in range(1, 6)]
    write(engine, readings)
    batch = claim(engine, at(5 + 60), max_size=1000)
    assert batch is not None
    assert batch.readings == tuple(relayed("H001", r) for r in readings)


def test_an_unsent_batch_is_claimed_again_unchanged(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    pk, _ = devices
    write(engine, [reading(pk, seq, 0) for seq in range(1, 5)])
    batch = claim(engine, at(1))
    assert batch is not None
    assert [r.power for r in batch.readings] == [1.0, 2.0, 3.0]
    assert claim(engine, at(2)) == batch
    # new readings, a full batch of them and old enough: still the unsent batch first
    write(engine, [reading(pk, seq, 3) for seq in range(5, 9)])
    assert claim(engine, at(500)) == batch
    assert claim(engine, at(500), max_size=1) == batch
    assert claim(engine, at(500), max_size=100) == batch
    assert batch_ids(engine) == {batch.batch_id}


def test_after_mark_sent_the_next_claim_takes_the_next_readings(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    a, b = devices
    readings = [reading(a if seq % 2 else b, seq, seq) for seq in range(1, 9)]
    write(engine, readings)
    batches = []
    now = at(100)
    while (batch := claim(engine, now)) is not None:
        assert batch.batch_id not in {earlier.batch_id for earlier in batches}
        batches.append(batch)
        sent(engine, batch.batch_id, now)
        now += timedelta(seconds=1)
    assert [len(b.readings) for b in batches] == [3, 3, 2]
    names = {a: "H001", b: "H002"}
    got = [r for batch in batches for r in batch.readings]
    assert got == [relayed(names[r.device_pk], r) for r in readings]
    # new readings after all were relayed: only those, never a relayed one
    more = [reading(a, seq, 200) for seq in range(9, 11)]
    write(engine, more)
    batch = claim(engine, at(300))
    assert batch is not None
    assert batch.readings == tuple(relayed("H001", r) for r in more)


def test_outbox_state_counts_unclaimed_and_unsent_readings(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    pk, _ = devices
    assert state(engine) == OutboxState(0, None)
    write(engine, [reading(pk, 1, 7), reading(pk, 2, 3)])
    write(engine, [reading(pk, seq, 10 + seq) for seq in range(3, 8)])
    assert state(engine) == OutboxState(7, at(3))
    first = claim(engine, at(100))
    assert first is not None
    # claimed but unsent: still waiting, the oldest included
    assert state(engine) == OutboxState(7, at(3))
    sent(engine, first.batch_id, at(101))
    assert state(engine) == OutboxState(4, at(14))
    second = claim(engine, at(102))
    assert second is not None
    assert state(engine) == OutboxState(4, at(14))
    sent(engine, second.batch_id, at(103))
    assert state(engine) == OutboxState(1, at(17))
    third = claim(engine, at(104))
    assert third is not None
    sent(engine, third.batch_id, at(105))
    assert state(engine) == OutboxState(0, None)


def test_outbox_state_oldest_is_an_aware_utc_datetime(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    pk, _ = devices
    write(engine, [reading(pk, 1, 1.5)])
    oldest = state(engine).oldest
    assert oldest == at(1.5)
    assert oldest is not None
    assert oldest.utcoffset() == timedelta(0)


def test_prune_deletes_only_readings_of_batches_sent_before_the_cutoff(
    engine: Engine, devices: tuple[DevicePk, DevicePk]
) -> None:
    pk, _ = devices
    write(engine, [reading(pk, seq, seq) for seq in range(1, 11)])
    old = claim(engine, at(100))
    assert old is not None
    sent(engine, old.batch_id, at(100))
    recent = claim(engine, at(101))
    assert recent is not None
    sent(engine, recent.batch_id, at(200))
    unsent = claim(engine, at(201))
    assert unsent is not None
    before = reading_batches(engine)
    assert list(before.values()).count(None) == 1
    assert prune(engine, at(150)) == 3
    after = reading_batches(engine)
    assert after == {i: b for i, b in before.items() if b != old.batch_id}
    assert batch_ids(engine) == {recent.batch_id, unsent.batch_id}
    # nothing more is old enough; a batch sent exactly at the cutoff stays
    assert prune(engine, at(150)) == 0
    assert prune(engine, at(200)) == 0
    assert reading_batches(engine) == after
    # the unsent batch and the unclaimed reading still wait, and are still relayed
    assert state(engine) == OutboxState(4, at(7))
    assert claim(engine, at(202)) == unsent
    sent(engine, unsent.batch_id, at(202))
    last = claim(engine, at(203))
    assert last is not None
    assert [r.power for r in last.readings] == [10.0]
    sent(engine, last.batch_id, at(203))
    assert prune(engine, at(1000)) == 7
    assert reading_batches(engine) == {}
    assert batch_ids(engine) == set()
    assert state(engine) == OutboxState(0, None)
