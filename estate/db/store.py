"""Queries and writes of the local cache, as plain functions on a connection."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

import attrs
from sqlalchemy import Connection, and_, bindparam, case, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from estate.central_wire import CentralDevice
from estate.db.models import CommandRow, DeviceRow, LedgerEntryRow, ReadingRow
from estate.messages import (
    DeviceRecord,
    RecordCommand,
    RecordCutOff,
    RecordDeviceState,
    StoreReading,
)
from estate.sct_contract import normalise_address
from estate.types import CentralId, DeviceId, DevicePk

__all__ = [
    "CONNECTION_TYPES",
    "Charging",
    "DeviceExists",
    "Written",
    "apply_central_devices",
    "load_devices",
    "register_device",
    "write_batch",
]

CONNECTION_TYPES = ("Consumer", "Producer")


class DeviceExists(ValueError):
    """A device with this device_id is already registered."""


@attrs.frozen
class Charging:
    """Token accounting is on: each `wh_per_token` a consumer uses is charged 1 SCT."""

    wh_per_token: float


@attrs.frozen
class Written:
    """What one flush wrote: new readings (not duplicates) and new ledger entries."""

    inserted: int
    charged: int = 0


def _now() -> datetime:
    return datetime.now(UTC)


def load_devices(
    conn: Connection, resume_known: frozenset[str] = frozenset()
) -> tuple[DeviceRecord, ...]:
    """Every device not removed, with the boot, seq and last reading its actor resumes from.

    The resume state is looked up (two indexed queries a device) only for devices not in
    `resume_known`, the ones whose actor runs already, so that a periodic reload reads
    the devices table alone.
    """
    devices = DeviceRow.__table__
    rows = conn.execute(
        select(devices).where(devices.c.status != "removed").order_by(devices.c.device_id)
    )
    records = []
    for row in rows:
        record = DeviceRecord(
            pk=DevicePk(row.id),
            device_id=DeviceId(row.device_id),
            connection_type=row.connection_type,
            central_id=CentralId(row.central_id) if row.central_id is not None else None,
            account_address=row.account_address,
            status=row.status,
            load_on=row.load_on,
            balance=row.balance,
            energy_total_wh=row.energy_total_wh,
            load_cut_off=row.load_cut_off,
            charge_wh=row.charge_wh,
        )
        if row.device_id not in resume_known:
            record = _with_resume_state(conn, record)
        records.append(record)
    return tuple(records)


def _with_resume_state(conn: Connection, record: DeviceRecord) -> DeviceRecord:
    """`record` with its latest boot and seq, and its last reading's time and power."""
    mine = ReadingRow.device_pk == record.pk
    latest = conn.execute(
        select(ReadingRow.boot, ReadingRow.seq)
        .where(mine, ReadingRow.seq.is_not(None))
        .order_by(ReadingRow.boot.desc(), ReadingRow.seq.desc())
        .limit(1)
    ).first()
    last = conn.execute(
        select(ReadingRow.ts, ReadingRow.power).where(mine).order_by(ReadingRow.ts.desc()).limit(1)
    ).first()
    return attrs.evolve(
        record,
        boot=latest.boot if latest else 0,
        last_seq=latest.seq if latest else None,
        last_reading_at=last.ts if last else None,
        last_power=last.power if last else 0.0,
    )


def register_device(
    conn: Connection,
    device_id: str,
    connection_type: str,
    account_address: str | None = None,
    central_id: int | None = None,
) -> DevicePk:
    """Add a board; raise DeviceExists if its device_id is taken."""
    if connection_type not in CONNECTION_TYPES:
        raise ValueError(
            f"connection type {connection_type!r}: expected {' or '.join(CONNECTION_TYPES)}"
        )
    if conn.execute(select(DeviceRow.id).where(DeviceRow.device_id == device_id)).first():
        raise DeviceExists(f"device {device_id!r} is already registered")
    now = _now()
    return DevicePk(
        conn.execute(
            insert(DeviceRow)
            .values(
                device_id=device_id,
                connection_type=connection_type,
                account_address=account_address,
                central_id=central_id,
                status="offline",
                balance=0,
                energy_total_wh=0.0,
                created_at=now,
                updated_at=now,
            )
            .returning(DeviceRow.id)
        ).scalar_one()
    )


def _insert_ignoring_duplicates(conn: Connection):
    dialect = {"postgresql": postgresql, "sqlite": sqlite}[conn.dialect.name]
    return dialect.insert(ReadingRow).on_conflict_do_nothing(
        index_elements=["device_pk", "boot", "seq", "digest"]
    )


def write_batch(
    conn: Connection,
    readings: Sequence[StoreReading],
    states: Sequence[RecordDeviceState] = (),
    commands: Sequence[RecordCommand] = (),
    cut_offs: Sequence[RecordCutOff] = (),
    charging: Charging | None = None,
) -> Written:
    """Write one flush in the caller's transaction.

    A reading whose message is already stored (a redelivery) is skipped, and only new
    readings add to their device's energy total and last-seen time. With `charging`,
    their energy also fills each consumer's accumulator (`charge_wh`, for devices with
    an owner account), and every full `wh_per_token` becomes a pending ledger entry in
    this same transaction: a crash can neither lose the energy nor charge it twice.
    """
    inserted = charged = 0
    # states first: a reading in this flush carries a newer load state than a state event
    for state in states:
        conn.execute(
            update(DeviceRow)
            .where(DeviceRow.id == state.device_pk)
            .values(status=state.status, load_on=state.load_on, updated_at=state.at)
        )
    for cut in cut_offs:
        conn.execute(
            update(DeviceRow).where(DeviceRow.id == cut.device_pk).values(load_cut_off=cut.cut_off)
        )
    if readings:
        statement = _insert_ignoring_duplicates(conn).returning(
            ReadingRow.device_pk, ReadingRow.received_at, ReadingRow.energy_wh, ReadingRow.load_on
        )
        energy: dict[int, float] = defaultdict(float)
        used: dict[int, float] = defaultdict(float)
        seen: dict[int, tuple[datetime, bool | None]] = {}
        for pk, received_at, energy_wh, load_on in conn.execute(
            statement, [reading.row() for reading in readings]
        ):
            inserted += 1
            energy[pk] += energy_wh
            used[pk] += max(energy_wh, 0.0)  # energy flowing back is never a credit
            if pk not in seen or received_at >= seen[pk][0]:
                seen[pk] = (received_at, load_on)
        if energy:
            newer = or_(DeviceRow.last_seen.is_(None), DeviceRow.last_seen < bindparam("seen"))
            values = {
                "energy_total_wh": DeviceRow.energy_total_wh + bindparam("energy"),
                "last_seen": case((newer, bindparam("seen")), else_=DeviceRow.last_seen),
                "load_on": case((newer, bindparam("load")), else_=DeviceRow.load_on),
            }
            if charging is not None:
                values["charge_wh"] = DeviceRow.charge_wh + case(
                    (_chargeable(), bindparam("used")), else_=literal(0.0)
                )
            conn.execute(
                update(DeviceRow).where(DeviceRow.id == bindparam("pk")).values(**values),
                [
                    {"pk": pk, "energy": energy[pk], "used": used[pk], "seen": at, "load": load}
                    for pk, (at, load) in seen.items()
                ],
            )
            if charging is not None:
                charged = _charge(conn, list(energy), charging)
    if commands:
        conn.execute(
            insert(CommandRow),
            [
                {
                    "device_pk": c.device_pk,
                    "at": c.at,
                    "balance": c.balance,
                    "instruction": c.instruction,
                    "reason": c.reason,
                }
                for c in commands
            ],
        )
    return Written(inserted, charged)


def _chargeable():
    """Devices whose energy is charged: consumers with an owner account."""
    return and_(DeviceRow.connection_type == "Consumer", DeviceRow.account_address.is_not(None))


# A float accumulator of many small readings lands a hair under a whole token's worth
CHARGE_EPSILON_WH = 1e-9


def _charge(conn: Connection, pks: list[int], charging: Charging) -> int:
    """Turn every full token's worth in these devices' accumulators into a ledger entry."""
    wh = charging.wh_per_token
    full = conn.execute(
        select(DeviceRow.id, DeviceRow.account_address, DeviceRow.charge_wh).where(
            DeviceRow.id.in_(pks), _chargeable(), DeviceRow.charge_wh >= wh - CHARGE_EPSILON_WH
        )
    ).all()
    now = _now()
    charged = 0
    for pk, address, charge_wh in full:
        try:
            account = normalise_address(address)
        except ValueError:
            continue  # charged once a sync fixes the address (the signer warns of it)
        tokens = int((charge_wh + CHARGE_EPSILON_WH) // wh)
        conn.execute(
            update(DeviceRow)
            .where(DeviceRow.id == pk)
            .values(charge_wh=DeviceRow.charge_wh - tokens * wh)
        )
        conn.execute(
            insert(LedgerEntryRow).values(
                device_pk=pk,
                account_address=account,
                amount=tokens,
                status="pending",
                created_at=now,
                attempts=0,
            )
        )
        charged += 1
    return charged


def apply_central_devices(conn: Connection, devices: Sequence[CentralDevice]) -> int:
    """Make the local devices match the central's list; return how many were removed.

    Devices in the list are inserted or updated (a removed one comes back offline);
    every other device is marked `removed`: the central is the source of truth once
    configured. Removed devices keep their readings.
    """
    table = DeviceRow.__table__
    now = _now()
    listed = {d.device_id for d in devices}
    central_ids = {d.id for d in devices}
    existing = {
        row.device_id: row
        for row in conn.execute(select(table.c.device_id, table.c.central_id, table.c.status))
    }
    # a central id that moved to another board: free it before reassigning
    conn.execute(
        update(DeviceRow)
        .where(DeviceRow.central_id.in_(central_ids), DeviceRow.device_id.not_in(listed))
        .values(central_id=None)
    )
    for device in devices:
        values = {
            "central_id": device.id,
            "connection_type": device.connection_type,
            "account_address": device.account_address,
            "updated_at": now,
        }
        row = existing.get(device.device_id)
        if row is None:
            conn.execute(
                insert(DeviceRow).values(
                    device_id=device.device_id,
                    status="offline",
                    balance=0,
                    energy_total_wh=0.0,
                    created_at=now,
                    **values,
                )
            )
            continue
        if row.status == "removed":
            values["status"] = "offline"
        if row.central_id != device.id:
            conn.execute(
                update(DeviceRow).where(DeviceRow.central_id == device.id).values(central_id=None)
            )
        conn.execute(
            update(DeviceRow).where(DeviceRow.device_id == device.device_id).values(**values)
        )
    removed = conn.execute(
        update(DeviceRow)
        .where(DeviceRow.device_id.not_in(listed), DeviceRow.status != "removed")
        .values(status="removed", central_id=None, updated_at=now)
    )
    return removed.rowcount
