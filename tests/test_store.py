"""The local cache's queries and writes, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, func, inspect, select

from estate.db.models import Base, CommandRow, DeviceRow, ReadingRow
from estate.db.store import DeviceExists, load_devices, register_device, write_batch
from estate.messages import RecordCommand, RecordDeviceState, StoreReading
from estate.types import DevicePk

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def reading(
    pk: DevicePk,
    second: float,
    *,
    seq: int | None = None,
    boot: int = 0,
    digest: str | None = None,
    power: float = 12.0,
    energy_wh: float = 0.5,
    load_on: bool | None = True,
) -> StoreReading:
    return StoreReading(
        device_pk=pk,
        boot=boot,
        seq=seq,
        digest=digest if digest is not None else f"dig{seq}",
        ts=at(second),
        received_at=at(second),
        voltage=12.0,
        current=power / 12.0,
        power=power,
        energy_wh=energy_wh,
        load_on=load_on,
        current_1=None,
        voltage_1=None,
    )


@pytest.fixture
def engine(db_url: str, engine_for: Callable[[str], Engine]) -> Engine:
    return engine_for(db_url)


@pytest.fixture
def pk(engine: Engine) -> DevicePk:
    with engine.begin() as conn:
        return register_device(conn, "H001", "Consumer", account_address="0xabc", central_id=7)


def write(engine: Engine, readings: list[StoreReading], **kwargs: object) -> int:
    with engine.begin() as conn:
        return write_batch(conn, readings, **kwargs).inserted  # type: ignore[arg-type]


def device(engine: Engine, pk: DevicePk) -> DeviceRow:
    with engine.connect() as conn:
        return conn.execute(select(DeviceRow.__table__).where(DeviceRow.id == pk)).one()


def reading_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(ReadingRow)).scalar_one()


# -- register_device ------------------------------------------------------------------------


def test_register_device_is_loaded_back(engine: Engine, pk: DevicePk) -> None:
    with engine.connect() as conn:
        (record,) = load_devices(conn)
    assert record.pk == pk
    assert record.device_id == "H001"
    assert record.connection_type == "Consumer"
    assert record.account_address == "0xabc"
    assert record.central_id == 7
    assert record.status == "offline"
    assert (record.balance, record.energy_total_wh, record.boot) == (0, 0.0, 0)
    assert record.last_seq is None
    assert record.last_reading_at is None


def test_register_same_device_id_twice_raises(engine: Engine, pk: DevicePk) -> None:
    with engine.begin() as conn, pytest.raises(DeviceExists):
        register_device(conn, "H001", "Producer")


def test_register_bad_connection_type_raises(engine: Engine) -> None:
    with engine.begin() as conn:
        with pytest.raises(ValueError, match="connection type"):
            register_device(conn, "H002", "consumer")
        assert load_devices(conn) == ()


def test_devices_are_loaded_in_device_id_order(engine: Engine) -> None:
    with engine.begin() as conn:
        for device_id in ("H003", "H001", "H002"):
            register_device(conn, device_id, "Producer")
        assert [d.device_id for d in load_devices(conn)] == ["H001", "H002", "H003"]


# -- write_batch: readings ------------------------------------------------------------------


def test_batch_written_twice_is_stored_once(engine: Engine, pk: DevicePk) -> None:
    batch = [reading(pk, s, seq=s) for s in range(1, 4)]
    assert write(engine, batch) == 3
    assert write(engine, batch) == 0
    assert reading_count(engine) == 3
    assert device(engine, pk).energy_total_wh == pytest.approx(1.5)


def test_partly_redelivered_batch_adds_only_new_energy(engine: Engine, pk: DevicePk) -> None:
    write(engine, [reading(pk, 1, seq=1), reading(pk, 2, seq=2)])
    assert write(engine, [reading(pk, 2, seq=2), reading(pk, 3, seq=3)]) == 1
    assert device(engine, pk).energy_total_wh == pytest.approx(1.5)


def test_same_seq_with_other_digest_is_stored(engine: Engine, pk: DevicePk) -> None:
    write(engine, [reading(pk, 1, seq=1, digest="aaaa")])
    assert write(engine, [reading(pk, 2, seq=1, digest="bbbb")]) == 1
    assert reading_count(engine) == 2


def test_same_seq_and_digest_in_another_boot_is_stored(engine: Engine, pk: DevicePk) -> None:
    write(engine, [reading(pk, 1, seq=1, boot=0)])
    assert write(engine, [reading(pk, 2, seq=1, boot=1)]) == 1
    assert reading_count(engine) == 2


def test_readings_without_seq_are_never_deduplicated(engine: Engine, pk: DevicePk) -> None:
    same = reading(pk, 1, seq=None, digest="same")
    assert write(engine, [same, same]) == 2
    assert write(engine, [same]) == 1
    assert reading_count(engine) == 3
    assert device(engine, pk).energy_total_wh == pytest.approx(1.5)


def test_stored_values_round_trip(engine: Engine, pk: DevicePk) -> None:
    row = StoreReading(
        device_pk=pk,
        boot=2,
        seq=2**40,
        digest="0123456789abcdef",
        ts=at(1),
        received_at=at(1.5),
        voltage=12.1,
        current=-0.42,
        power=-5.082,
        energy_wh=0.0014,
        load_on=None,
        current_1=1.5,
        voltage_1=13.2,
    )
    write(engine, [row])
    with engine.connect() as conn:
        stored = conn.execute(select(ReadingRow.__table__)).one()
    assert {k: getattr(stored, k) for k in row.row()} == row.row()
    assert stored.ts.tzinfo is not None


def test_energy_total_and_last_seen_and_load_are_updated(engine: Engine, pk: DevicePk) -> None:
    write(engine, [reading(pk, 1, seq=1, load_on=True), reading(pk, 2, seq=2, load_on=False)])
    row = device(engine, pk)
    assert row.energy_total_wh == pytest.approx(1.0)
    assert row.last_seen == at(2)
    assert row.load_on is False


def test_last_seen_never_goes_backwards(engine: Engine, pk: DevicePk) -> None:
    write(engine, [reading(pk, 10, seq=10, load_on=True)])
    write(engine, [reading(pk, 5, seq=5, load_on=False)])
    row = device(engine, pk)
    assert row.last_seen == at(10)
    assert row.load_on is True
    assert row.energy_total_wh == pytest.approx(1.0)


def test_batch_for_two_devices_updates_each(engine: Engine, pk: DevicePk) -> None:
    with engine.begin() as conn:
        other = register_device(conn, "H002", "Producer")
    write(
        engine,
        [reading(pk, 1, seq=1), reading(other, 3, seq=1), reading(other, 4, seq=2)],
    )
    assert device(engine, pk).energy_total_wh == pytest.approx(0.5)
    assert device(engine, other).energy_total_wh == pytest.approx(1.0)
    assert device(engine, pk).last_seen == at(1)
    assert device(engine, other).last_seen == at(4)


# -- load_devices: where an actor resumes ---------------------------------------------------


def test_load_devices_resumes_from_the_latest_boot(engine: Engine, pk: DevicePk) -> None:
    write(
        engine,
        [
            reading(pk, 1, seq=50, boot=0),
            reading(pk, 2, seq=51, boot=0),
            reading(pk, 3, seq=3, boot=1),
            reading(pk, 4, seq=4, boot=1, power=24.0),
        ],
    )
    with engine.connect() as conn:
        (record,) = load_devices(conn)
    assert record.boot == 1
    assert record.last_seq == 4
    assert record.last_reading_at == at(4)
    assert record.last_power == 24.0
    assert record.energy_total_wh == pytest.approx(2.0)


def test_load_devices_last_reading_is_the_latest_in_time(engine: Engine, pk: DevicePk) -> None:
    write(engine, [reading(pk, 9, seq=1, power=9.0), reading(pk, 5, seq=2, power=5.0)])
    with engine.connect() as conn:
        (record,) = load_devices(conn)
    assert record.last_reading_at == at(9)
    assert record.last_power == 9.0
    assert record.last_seq == 2


def test_load_devices_without_seq_has_no_last_seq(engine: Engine, pk: DevicePk) -> None:
    write(engine, [reading(pk, 1, seq=None)])
    with engine.connect() as conn:
        (record,) = load_devices(conn)
    assert record.last_seq is None
    assert record.last_reading_at == at(1)


# -- write_batch: states and commands -------------------------------------------------------


def test_device_state_is_written(engine: Engine, pk: DevicePk) -> None:
    write(engine, [], states=[RecordDeviceState(pk, "online", True, at(3))])
    row = device(engine, pk)
    assert (row.status, row.load_on, row.updated_at) == ("online", True, at(3))
    with engine.connect() as conn:
        (record,) = load_devices(conn)
    assert record.status == "online"
    assert record.load_on is True


def test_removed_device_is_not_loaded(engine: Engine, pk: DevicePk) -> None:
    write(engine, [], states=[RecordDeviceState(pk, "removed", None, at(3))])
    with engine.connect() as conn:
        assert load_devices(conn) == ()


def test_commands_are_written(engine: Engine, pk: DevicePk) -> None:
    commands = [RecordCommand(pk, at(1), 41, 1, "handshake"), RecordCommand(pk, at(2), 40, 3, "x")]
    assert write(engine, [], commands=commands) == 0
    with engine.connect() as conn:
        rows = conn.execute(
            select(CommandRow.at, CommandRow.balance, CommandRow.instruction, CommandRow.reason)
            .where(CommandRow.device_pk == pk)
            .order_by(CommandRow.at)
        ).all()
    assert [tuple(r) for r in rows] == [(at(1), 41, 1, "handshake"), (at(2), 40, 3, "x")]


def test_failed_transaction_writes_nothing(engine: Engine, pk: DevicePk) -> None:
    conn = engine.connect()
    transaction = conn.begin()
    write_batch(conn, [reading(pk, 1, seq=1)])
    transaction.rollback()
    conn.close()
    assert reading_count(engine) == 0
    assert device(engine, pk).energy_total_wh == 0.0


# -- migrations -----------------------------------------------------------------------------


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert differences == []


def test_alembic_upgrade_head_from_the_command_line(tmp_path: Path) -> None:
    db_file = tmp_path / "cli.db"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{db_file}"}
    alembic = Path(sys.executable).with_name("alembic")
    result = subprocess.run(
        [str(alembic), "-c", "alembic.ini", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    bare = create_engine(f"sqlite:///{db_file}")
    try:
        tables = set(inspect(bare).get_table_names())
    finally:
        bare.dispose()
    assert {"devices", "readings", "commands", "alembic_version"} <= tables
