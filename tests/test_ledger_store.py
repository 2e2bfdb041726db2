"""The token ledger in the database: charging in the readings' transaction, submissions,
settlement, balances and the event cursor, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, select
from test_store import reading

from estate.db.ledger import (
    LedgerConflict,
    get_cursor,
    ledger_summary,
    pending_entries,
    record_balances,
    record_replacement,
    record_submission,
    reject_entries,
    set_cursor,
    settle,
    submissions,
)
from estate.db.models import ChainTransactionRow, DeviceRow, LedgerEntryRow
from estate.db.store import Charging, load_devices, register_device, write_batch
from estate.messages import RecordCutOff
from estate.types import DevicePk

OWNER = "0x04a1"
OWNER_FULL = "0x" + "4a1".rjust(64, "0")
NOW = datetime(2024, 6, 1, 13, tzinfo=UTC)
WH = Charging(wh_per_token=1.0)
GATEWAY = "0x" + "9".rjust(64, "0")


@pytest.fixture
def engine(db_url: str, engine_for: Callable[[str], Engine]) -> Engine:
    return engine_for(db_url)


@pytest.fixture
def consumer(engine: Engine) -> DevicePk:
    with engine.begin() as conn:
        return register_device(conn, "H001", "Consumer", account_address=OWNER)


def charge(engine: Engine, pk: DevicePk, seqs: range, energy_wh: float = 0.4, **kwargs):
    """Store readings of `energy_wh` each (seq = second) with charging on."""
    batch = [reading(pk, s, seq=s, energy_wh=energy_wh) for s in seqs]
    with engine.begin() as conn:
        return write_batch(conn, batch, charging=kwargs.get("charging", WH))


def entries(engine: Engine) -> list[tuple[int, str, int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                LedgerEntryRow.device_pk,
                LedgerEntryRow.account_address,
                LedgerEntryRow.amount,
                LedgerEntryRow.status,
            ).order_by(LedgerEntryRow.id)
        )
        return [tuple(row) for row in rows]


def charge_wh(engine: Engine, pk: DevicePk) -> float:
    with engine.connect() as conn:
        return conn.execute(select(DeviceRow.charge_wh).where(DeviceRow.id == pk)).scalar_one()


# -- charging ----------------------------------------------------------------------------------


def test_each_full_token_of_energy_becomes_one_pending_entry(
    engine: Engine, consumer: DevicePk
) -> None:
    assert charge(engine, consumer, range(1, 3)).charged == 0  # 0.8 Wh
    assert entries(engine) == []
    written = charge(engine, consumer, range(3, 5))  # 1.6 Wh
    assert written.charged == 1
    assert entries(engine) == [(consumer, OWNER_FULL, 1, "pending")]
    assert charge_wh(engine, consumer) == pytest.approx(0.6)


def test_several_tokens_in_one_flush_are_one_entry_of_that_amount(
    engine: Engine, consumer: DevicePk
) -> None:
    charge(engine, consumer, range(1, 8), energy_wh=0.5)  # 3.5 Wh
    assert entries(engine) == [(consumer, OWNER_FULL, 3, "pending")]
    assert charge_wh(engine, consumer) == pytest.approx(0.5)


def test_redelivered_readings_are_not_charged_again(engine: Engine, consumer: DevicePk) -> None:
    charge(engine, consumer, range(1, 4))  # 1.2 Wh: 1 token, 0.2 left
    assert charge(engine, consumer, range(1, 4)).inserted == 0
    assert [e[2] for e in entries(engine)] == [1]
    assert charge_wh(engine, consumer) == pytest.approx(0.2)


def test_the_accumulator_survives_a_restart(engine: Engine, consumer: DevicePk) -> None:
    charge(engine, consumer, range(1, 3))  # 0.8 Wh
    with engine.connect() as conn:
        (record,) = load_devices(conn)
    assert record.charge_wh == pytest.approx(0.8)
    charge(engine, consumer, range(3, 4))  # 1.2 Wh in all
    assert [e[2] for e in entries(engine)] == [1]


def test_energy_flowing_back_is_not_credited(engine: Engine, consumer: DevicePk) -> None:
    charge(engine, consumer, range(1, 3), energy_wh=0.6)  # 1.2 Wh: 1 token, 0.2 left
    charge(engine, consumer, range(3, 6), energy_wh=-0.5)
    assert charge_wh(engine, consumer) == pytest.approx(0.2)
    assert [e[2] for e in entries(engine)] == [1]


def test_producers_and_consumers_without_account_are_not_charged(engine: Engine) -> None:
    with engine.begin() as conn:
        producer = register_device(conn, "P001", "Producer", account_address=OWNER)
        anonymous = register_device(conn, "H009", "Consumer")
    charge(engine, producer, range(1, 10))
    charge(engine, anonymous, range(1, 10))
    assert entries(engine) == []
    assert charge_wh(engine, producer) == 0.0
    assert charge_wh(engine, anonymous) == 0.0


def test_without_charging_energy_is_stored_but_not_charged(
    engine: Engine, consumer: DevicePk
) -> None:
    written = charge(engine, consumer, range(1, 10), charging=None)
    assert written.inserted == 9
    assert entries(engine) == []
    assert charge_wh(engine, consumer) == 0.0


def test_cut_off_is_stored_and_loaded(engine: Engine, consumer: DevicePk) -> None:
    with engine.begin() as conn:
        write_batch(conn, [], cut_offs=[RecordCutOff(consumer, True)])
        (record,) = load_devices(conn)
    assert record.load_cut_off is True


# -- submission and settlement -----------------------------------------------------------------


def pending_ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return [e.id for e in pending_entries(conn)]


def submit(engine: Engine, tx_hash: str, ids: list[int], nonce: int = 7) -> None:
    with engine.begin() as conn:
        record_submission(conn, GATEWAY, tx_hash, nonce, '{"signed": true}', ids, NOW)


def test_submission_is_recorded_with_its_payload_then_accepted(
    engine: Engine, consumer: DevicePk
) -> None:
    charge(engine, consumer, range(1, 4))
    ids = pending_ids(engine)
    submit(engine, "0xaa", ids)
    with engine.connect() as conn:
        (left,) = submissions(conn, GATEWAY)
        assert pending_entries(conn) == ()
        assert submissions(conn, "0x1") == ()  # another gateway's account has none
    assert (left.nonce, left.candidates) == (7, (("0xaa", '{"signed": true}'),))
    assert [(e.id, e.device_id, e.status) for e in left.entries] == [
        (ids[0], "H001", "submitted")
    ]
    with engine.begin() as conn:
        settled = settle(conn, GATEWAY, 7, "accepted", NOW, "0xaa", block_number=12)
        assert settle(conn, GATEWAY, 7, "accepted", NOW, "0xaa") == ()  # once only
        assert submissions(conn, GATEWAY) == ()
        block = conn.execute(select(ChainTransactionRow.block_number)).scalar_one()
    assert [e.id for e in settled] == ids
    assert block == 12
    assert [e[3] for e in entries(engine)] == ["accepted"]


@pytest.mark.parametrize("outcome", ["reverted", "dropped"])
def test_reverted_or_dropped_entries_are_pending_again(
    engine: Engine, consumer: DevicePk, outcome: str
) -> None:
    charge(engine, consumer, range(1, 4))
    ids = pending_ids(engine)
    submit(engine, "0xbb", ids)
    with engine.begin() as conn:
        winner = "0xbb" if outcome == "reverted" else None
        settle(conn, GATEWAY, 7, outcome, NOW, winner, reason="INSUFFICIENT BALANCE")
        (entry,) = pending_entries(conn)
    assert (entry.id, entry.tx_hash, entry.nonce, entry.attempts) == (ids[0], None, None, 1)


def test_entries_no_longer_pending_cannot_be_submitted_twice(
    engine: Engine, consumer: DevicePk
) -> None:
    charge(engine, consumer, range(1, 4))
    ids = pending_ids(engine)
    submit(engine, "0xcc", ids)
    with pytest.raises(LedgerConflict, match="no longer pending"):
        submit(engine, "0xdd", ids, nonce=8)
    with engine.connect() as conn:
        assert [s.candidates[0][0] for s in submissions(conn, GATEWAY)] == ["0xcc"]


def test_a_replacement_charges_the_same_entries_whichever_is_included(
    engine: Engine, consumer: DevicePk
) -> None:
    charge(engine, consumer, range(1, 4))
    ids = pending_ids(engine)
    submit(engine, "0xee", ids)
    with engine.begin() as conn:
        record_replacement(conn, GATEWAY, "0xff", 7, '{"again": true}', NOW)
        (left,) = submissions(conn, GATEWAY)
        assert [h for h, _p in left.candidates] == ["0xee", "0xff"]
        assert [e.tx_hash for e in left.entries] == ["0xff"]
        # the first one was included after all: it settles the nonce, the other is replaced
        settled = settle(conn, GATEWAY, 7, "accepted", NOW, "0xee", block_number=3)
        statuses = dict(
            conn.execute(select(ChainTransactionRow.tx_hash, ChainTransactionRow.status)).all()
        )
        (entry,) = conn.execute(select(LedgerEntryRow.status, LedgerEntryRow.tx_hash)).all()
    assert [e.id for e in settled] == ids
    assert statuses == {"0xee": "accepted", "0xff": "replaced"}
    assert tuple(entry) == ("accepted", "0xee")


def test_a_replacement_needs_a_nonce_in_flight(engine: Engine) -> None:
    with engine.begin() as conn, pytest.raises(LedgerConflict, match="no transaction"):
        record_replacement(conn, GATEWAY, "0x11", 3, "{}", NOW)


def test_pending_entries_of_skipped_accounts_are_left_out(
    engine: Engine, consumer: DevicePk
) -> None:
    charge(engine, consumer, range(1, 4))
    with engine.connect() as conn:
        assert pending_entries(conn, skip_accounts=[OWNER_FULL]) == ()
        assert len(pending_entries(conn, skip_accounts=["0x" + "1".rjust(64, "0")])) == 1


def test_rejected_entries_leave_the_queue(engine: Engine, consumer: DevicePk) -> None:
    charge(engine, consumer, range(1, 4))
    with engine.begin() as conn:
        assert reject_entries(conn, pending_ids(engine), "bad account", NOW) == 1
        summary = ledger_summary(conn)
    assert pending_ids(engine) == []
    assert summary == {"rejected": 1, "rejected_sct": 1}


# -- balances and cursor -----------------------------------------------------------------------


def test_balances_are_stored_on_every_device_of_the_account(engine: Engine) -> None:
    with engine.begin() as conn:
        register_device(conn, "H001", "Consumer", account_address=OWNER)
        register_device(conn, "H002", "Producer", account_address=OWNER_FULL.upper())
        register_device(conn, "H003", "Consumer", account_address="0x5")
        record_balances(conn, {OWNER_FULL: 41}, NOW)
        balances = dict(conn.execute(select(DeviceRow.device_id, DeviceRow.balance)).all())
    assert balances == {"H001": 41, "H002": 41, "H003": 0}


def test_cursor_is_stored_and_moved(engine: Engine) -> None:
    with engine.begin() as conn:
        assert get_cursor(conn, "sct_events") is None
        set_cursor(conn, "sct_events", 10, NOW)
        set_cursor(conn, "sct_events", 15, NOW)
        assert get_cursor(conn, "sct_events") == 15
