"""Board: one device's state machine (PROTOCOL section 1), driven by hand-made time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estate.board import (
    ActivityChanged,
    Board,
    BoardPolicy,
    CutOffChanged,
    Effect,
    Repeat,
    RequestBalance,
    SendCommand,
    StateChanged,
    Store,
)
from estate.device_wire import BoardReading, Instruction
from estate.messages import DeviceRecord
from estate.types import DeviceId, DevicePk

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)
BALANCE = 41


def record(**fields: object) -> DeviceRecord:
    values: dict[str, object] = {
        "pk": DevicePk(7),
        "device_id": DeviceId("H001"),
        "connection_type": "Consumer",
        "balance": BALANCE,
    }
    values.update(fields)
    return DeviceRecord(**values)  # type: ignore[arg-type]


def wall(now: float) -> datetime:
    return T0 + timedelta(seconds=now)


def reading(
    current: float = 1.0,
    voltage: float = 12.0,
    *,
    seq: int | None = None,
    update: bool = False,
    req: bool | None = None,
    ts: datetime | None = None,
) -> BoardReading:
    return BoardReading(current=current, voltage=voltage, update=update, req=req, ts=ts, seq=seq)


def feed(board: Board, now: float, value: BoardReading, dup: bool = False) -> list[Effect]:
    return board.reading(value, digest=f"d{now}", dup=dup, received_at=wall(now), now=now)


def stores(effects: list[Effect]) -> list[Store]:
    return [e for e in effects if isinstance(e, Store)]


def commands(effects: list[Effect]) -> list[SendCommand]:
    return [e for e in effects if isinstance(e, SendCommand)]


def only_store(effects: list[Effect]) -> Store:
    (store,) = stores(effects)
    return store


def connected_board(now: float = 0.0, **fields: object) -> Board:
    board = Board(record(**fields))
    board.hello(now)
    return board


# -- hello and readings --------------------------------------------------------------------


def test_hello_answers_persist_with_balance_and_goes_online() -> None:
    board = Board(record())
    effects = board.hello(0.0)
    assert SendCommand(Instruction.PERSIST, BALANCE, "handshake") in effects
    assert StateChanged("online", None) in effects
    assert ActivityChanged(True) in effects
    assert len(effects) == 3
    assert board.connected
    assert board.online


def test_second_hello_while_online_only_answers() -> None:
    board = connected_board()
    assert board.hello(1.0) == [SendCommand(Instruction.PERSIST, BALANCE, "handshake")]


def test_reading_is_stored_with_power_and_device() -> None:
    board = connected_board()
    store = only_store(feed(board, 1.0, reading(0.42, 12.1, seq=3, req=True)))
    row = store.reading
    assert row.device_pk == 7
    assert row.power == pytest.approx(0.42 * 12.1)
    assert (row.current, row.voltage, row.seq, row.load_on) == (0.42, 12.1, 3, True)
    assert row.ts == wall(1.0)
    assert row.received_at == wall(1.0)
    assert row.digest == "d1.0"


def test_reading_uses_the_device_ts_when_given() -> None:
    board = connected_board()
    device_time = datetime(2024, 6, 1, 11, 59, 58, tzinfo=UTC)
    assert only_store(feed(board, 1.0, reading(ts=device_time))).reading.ts == device_time


def test_energy_is_integrated_between_readings() -> None:
    board = connected_board()
    first = only_store(feed(board, 1.0, reading(10.0, 36.0)))
    second = only_store(feed(board, 2.0, reading(10.0, 36.0)))
    assert first.reading.energy_wh == 0.0
    assert second.reading.energy_wh == pytest.approx(360.0 / 3600)
    assert board.energy_total_wh == pytest.approx(0.1)


def test_reading_without_hello_marks_the_board_online_and_connected() -> None:
    board = Board(record())
    effects = feed(board, 0.0, reading())
    assert StateChanged("online", None) in effects
    assert board.connected


def test_req_updates_load_state() -> None:
    board = connected_board()
    feed(board, 1.0, reading(req=True))
    assert board.load_on is True
    feed(board, 2.0, reading(req=False))
    assert board.load_on is False


# -- keep-alive and silence ----------------------------------------------------------------


@given(phase=st.floats(min_value=0.0, max_value=0.999))
def test_connected_board_gets_a_keepalive_within_every_interval(phase: float) -> None:
    board = Board(record())
    sent = [phase] if commands(board.hello(phase)) else []
    for second in range(1, 61):
        now = float(second)
        feed(board, now, reading())
        for command in commands(board.tick(now)):
            assert command == SendCommand(Instruction.PERSIST, BALANCE, "keepalive")
            sent.append(now)
    gaps = [b - a for a, b in pairwise(sent)]
    assert 60 - sent[-1] <= 5.0
    assert max(gaps) <= 5.0
    assert min(gaps) > 3.0  # not on every tick


def test_no_keepalive_before_hello() -> None:
    board = Board(record())
    board.status(True, 0.0)
    assert all(board.tick(float(s)) == [] for s in range(1, 9))


def test_silence_marks_the_board_offline_and_stops_keepalives() -> None:
    board = connected_board(0.0)
    feed(board, 0.0, reading())
    ticks = {s: board.tick(float(s)) for s in range(1, 10)}
    assert not any(isinstance(e, StateChanged) for effects in ticks.values() for e in effects)
    assert board.tick(10.0) == [StateChanged("offline", None), ActivityChanged(False)]
    assert not board.online
    assert all(board.tick(float(s)) == [] for s in range(11, 40))


def test_readings_keep_the_board_online() -> None:
    board = connected_board(0.0)
    for second in range(1, 30):
        feed(board, float(second), reading())
        effects = board.tick(float(second) + 0.5)
        assert not any(isinstance(e, StateChanged) for e in effects)
    assert board.online


def test_status_offline_marks_offline_and_disconnects() -> None:
    board = connected_board(0.0)
    assert board.status(False, 1.0) == [StateChanged("offline", None), ActivityChanged(False)]
    assert not board.connected
    assert all(board.tick(float(s)) == [] for s in range(2, 20))


def test_status_offline_when_already_offline_changes_nothing() -> None:
    assert Board(record()).status(False, 0.0) == []


def test_status_online_marks_online() -> None:
    board = Board(record())
    assert board.status(True, 0.0) == [StateChanged("online", None)]
    assert board.online


def test_board_coming_back_after_offline_goes_online_again_without_old_energy() -> None:
    board = connected_board(0.0)
    feed(board, 0.0, reading(10.0, 36.0))
    board.tick(10.0)
    effects = feed(board, 11.0, reading(10.0, 36.0))
    assert StateChanged("online", None) in effects
    assert only_store(effects).reading.energy_wh == 0.0


# -- update flag ---------------------------------------------------------------------------


def test_update_flag_is_answered_with_balance_updated() -> None:
    board = connected_board()
    effects = feed(board, 1.0, reading(update=True))
    assert commands(effects) == [SendCommand(Instruction.BALANCE_UPDATED, BALANCE, "update")]


def test_update_flag_is_answered_at_most_once_per_two_seconds() -> None:
    board = connected_board()
    answered = []
    for step in range(21):
        now = 1.0 + step * 0.25
        if commands(feed(board, now, reading(update=True))):
            answered.append(now)
    assert answered == [1.0, 3.0, 5.0]


def test_no_answer_without_update_flag() -> None:
    board = connected_board()
    assert commands(feed(board, 1.0, reading(update=False))) == []


def test_redelivered_seq_with_dup_flag_is_a_duplicate() -> None:
    board = connected_board()
    for second in (1, 2, 3):
        feed(board, float(second), reading(10.0, 36.0, seq=second))
    energy_before = board.energy_total_wh
    store = only_store(feed(board, 4.0, reading(10.0, 36.0, seq=2), dup=True))
    assert store.reading.energy_wh == 0.0
    assert store.reading.boot == 0
    assert store.reading.seq == 2
    assert board.boot == 0
    assert board.duplicates == 1
    assert board.readings == 3
    assert board.energy_total_wh == energy_before


def test_duplicate_does_not_answer_the_update_flag() -> None:
    board = connected_board()
    feed(board, 1.0, reading(seq=1))
    assert commands(feed(board, 4.0, reading(seq=1, update=True), dup=True)) == []


def test_lower_seq_without_dup_flag_is_a_reboot() -> None:
    board = connected_board()
    for second in (1, 2, 3):
        feed(board, float(second), reading(10.0, 36.0, seq=second + 10))
    store = only_store(feed(board, 4.0, reading(10.0, 36.0, seq=0)))
    assert board.boot == 1
    assert store.reading.boot == 1
    assert store.reading.energy_wh == 0.0
    assert board.duplicates == 0
    nxt = only_store(feed(board, 5.0, reading(10.0, 36.0, seq=1)))
    assert nxt.reading.boot == 1
    assert nxt.reading.energy_wh == pytest.approx(0.1)


def test_equal_seq_without_dup_flag_is_a_reboot() -> None:
    board = connected_board()
    feed(board, 1.0, reading(seq=5))
    feed(board, 2.0, reading(seq=5))
    assert board.boot == 1


def test_growing_seq_with_dup_flag_is_a_new_reading() -> None:
    board = connected_board()
    feed(board, 1.0, reading(10.0, 36.0, seq=1))
    store = only_store(feed(board, 2.0, reading(10.0, 36.0, seq=2), dup=True))
    assert store.reading.energy_wh == pytest.approx(0.1)
    assert board.duplicates == 0


def test_readings_without_seq_are_never_duplicates() -> None:
    board = connected_board()
    for second in (1, 2, 3):
        feed(board, float(second), reading(10.0, 36.0), dup=True)
    assert board.duplicates == 0
    assert board.readings == 3
    assert board.boot == 0
    assert board.energy_total_wh == pytest.approx(0.2)


# -- resuming from the database ------------------------------------------------------------


def resumed() -> Board:
    return Board(
        record(
            boot=2,
            last_seq=10,
            last_reading_at=wall(0.0),
            last_power=180.0,
            energy_total_wh=5.0,
            load_on=True,
        )
    )


def test_resume_continues_boot_and_energy() -> None:
    board = resumed()
    store = only_store(feed(board, 1.0, reading(10.0, 36.0, seq=11)))
    assert store.reading.boot == 2
    assert store.reading.energy_wh == pytest.approx((180.0 + 360.0) / 2 / 3600)
    assert board.energy_total_wh == pytest.approx(5.0 + 0.075)
    assert board.last_seq == 11


def test_resume_recognises_a_redelivery_of_a_stored_seq() -> None:
    board = resumed()
    store = only_store(feed(board, 1.0, reading(seq=10), dup=True))
    assert store.reading.boot == 2
    assert store.reading.energy_wh == 0.0
    assert board.duplicates == 1


def test_resume_recognises_a_reboot() -> None:
    board = resumed()
    store = only_store(feed(board, 1.0, reading(seq=0)))
    assert store.reading.boot == 3
    assert store.reading.energy_wh == 0.0


def test_resume_does_not_integrate_across_a_long_gap() -> None:
    board = resumed()
    assert only_store(feed(board, 600.0, reading(seq=11))).reading.energy_wh == 0.0


def test_resume_keeps_balance_and_load_state() -> None:
    board = resumed()
    assert board.balance == BALANCE
    assert board.load_on is True
    assert StateChanged("online", True) in board.hello(0.0)


# -- repeats, reboots and restarts -----------------------------------------------------------


def send(board: Board, seq: int, digest: str, now: float, dup: bool = False) -> Store:
    effects = board.reading(reading(seq=seq), digest, dup=dup, received_at=wall(now), now=now)
    return only_store(effects)


def test_a_retransmission_without_the_dup_flag_is_a_repeat_not_a_reboot() -> None:
    board = connected_board()
    send(board, 1, "a", 1.0)
    send(board, 2, "b", 2.0)
    effects = board.reading(reading(seq=1), "a", dup=False, received_at=wall(3.0), now=3.0)
    assert effects == [Repeat()]  # the board resent seq 1 after a lost PUBACK: not stored
    assert (board.boot, board.duplicates) == (0, 1)
    assert send(board, 3, "c", 4.0).reading.boot == 0


def test_an_old_boot_redelivered_after_a_reboot_is_a_repeat() -> None:
    board = connected_board()
    for seq in range(1, 6):
        send(board, seq, f"old{seq}", float(seq))
    assert send(board, 1, "new1", 6.0).reading.boot == 1  # the board rebooted
    send(board, 2, "new2", 7.0)
    late = board.reading(reading(seq=5), "old5", dup=True, received_at=wall(8.0), now=8.0)
    assert late == [Repeat()]  # a late redelivery from before the reboot: not stored again
    assert board.boot == 1
    assert send(board, 3, "new3", 9.0).reading.boot == 1  # not mistaken for a reboot


def test_a_board_online_in_the_database_goes_offline_if_never_heard() -> None:
    board = Board(record(status="online"))
    assert board.tick(100.0) == []
    assert board.tick(109.0) == []
    assert StateChanged("offline", None) in board.tick(110.0)


def test_instruction_0_makes_the_board_idle_without_keepalives() -> None:
    board = connected_board()
    effects = board.instruct(Instruction.DISCONNECT, "repl", 1.0)
    assert commands(effects) == [SendCommand(Instruction.DISCONNECT, BALANCE, "repl")]
    assert ActivityChanged(False) in effects
    assert all(board.tick(1.0 + t) == [] for t in range(1, 9))


# -- tokens: the balance key and balance changes ---------------------------------------------

TOKENS = BoardPolicy(tokens=True)


def token_board(
    now: float = 0.0, policy: BoardPolicy = TOKENS, read: bool = True, **fields: object
) -> Board:
    """A connected board; with `read`, its cached balance was also read on chain."""
    board = Board(record(**fields), policy=policy)
    board.hello(now)
    if read:
        board.balance_changed(board.balance, "sync", now)
    return board


def answers(effects: list[Effect]) -> list[SendCommand]:
    return [c for c in commands(effects) if c.instruction is Instruction.BALANCE_UPDATED]


def toggles(effects: list[Effect]) -> list[SendCommand]:
    return [c for c in commands(effects) if c.instruction is Instruction.TOGGLE]


def test_update_key_with_tokens_asks_once_then_answers_with_the_new_balance() -> None:
    board = token_board()
    effects = feed(board, 1.0, reading(update=True))
    assert RequestBalance() in effects
    assert commands(effects) == []
    assert board.snapshot()["balance_refresh_pending"] is True
    for now in (1.5, 2.0, 3.5):  # the flag stays set until the answer: no second request
        assert RequestBalance() not in feed(board, now, reading(update=True))
    effects = board.balance_changed(30, "update", 3.8)
    assert effects == [SendCommand(Instruction.BALANCE_UPDATED, 30, "update")]
    assert board.balance == 30
    assert board.snapshot()["balance_refresh_pending"] is False


def test_update_key_with_tokens_asks_again_after_the_rate_limit() -> None:
    board = token_board()
    feed(board, 1.0, reading(update=True))
    board.balance_changed(30, "update", 1.2)
    assert RequestBalance() not in feed(board, 2.0, reading(update=True))
    assert RequestBalance() in feed(board, 3.2, reading(update=True))


def test_a_slow_refresh_is_answered_with_the_cached_balance_after_the_timeout() -> None:
    board = token_board()
    feed(board, 1.0, reading(update=True))
    assert answers(board.tick(5.9)) == []
    effects = board.tick(6.0)
    assert answers(effects) == [
        SendCommand(Instruction.BALANCE_UPDATED, BALANCE, "update (cached balance)")
    ]
    assert board.snapshot()["balance_refresh_pending"] is False
    assert answers(feed(board, 6.5, reading())) == []
    assert answers(board.tick(7.0)) == []
    # the balance arriving late still reaches the board
    late = board.balance_changed(30, "update", 7.5)
    assert late == [SendCommand(Instruction.PERSIST, 30, "balance")]


def test_a_failed_refresh_is_answered_with_the_cached_balance() -> None:
    board = token_board()
    assert board.balance_refresh_failed(0.5) == []
    feed(board, 1.0, reading(update=True))
    assert board.balance_refresh_failed(1.5) == [
        SendCommand(Instruction.BALANCE_UPDATED, BALANCE, "update (cached balance)")
    ]
    assert board.snapshot()["balance_refresh_pending"] is False


def test_a_new_balance_goes_to_the_board_at_once() -> None:
    board = token_board()
    assert board.balance_changed(30, "event", 1.0) == [
        SendCommand(Instruction.PERSIST, 30, "balance")
    ]
    assert board.balance_changed(30, "sync", 2.0) == []


def test_a_new_balance_is_kept_for_a_board_not_connected() -> None:
    board = Board(record(), policy=TOKENS)
    assert board.balance_changed(30, "event", 1.0) == []
    assert SendCommand(Instruction.PERSIST, 30, "handshake") in board.hello(2.0)


def test_a_consumption_is_answered_with_instruction_3() -> None:
    board = token_board()
    assert board.balance_changed(40, "consumed", 1.0) == [
        SendCommand(Instruction.BALANCE_UPDATED, 40, "consumed")
    ]


def test_tokens_off_answers_the_update_key_at_once_and_never_toggles() -> None:
    board = connected_board(balance=0)
    effects = feed(board, 1.0, reading(update=True, req=True))
    assert RequestBalance() not in effects
    assert commands(effects) == [SendCommand(Instruction.BALANCE_UPDATED, 0, "update")]
    assert toggles(board.balance_changed(0, "consumed", 2.0)) == []
    assert toggles(feed(board, 3.0, reading(req=True))) == []
    assert board.cut_off is False


# -- tokens: prepaid cut-off ---------------------------------------------------------------


def cut_off_board(now: float = 1.0) -> Board:
    """A consumer at balance 0 whose load the gateway toggled off at `now` (still on)."""
    board = token_board(balance=0)
    assert toggles(feed(board, now, reading(req=True)))
    return board


def test_the_balance_reaching_zero_cuts_the_load_off() -> None:
    board = token_board(balance=1)
    feed(board, 1.0, reading(req=True))
    effects = board.balance_changed(0, "consumed", 2.0)
    assert commands(effects) == [
        SendCommand(Instruction.BALANCE_UPDATED, 0, "consumed"),
        SendCommand(Instruction.TOGGLE, 0, "prepaid cut-off"),
    ]
    assert CutOffChanged(True) in effects
    assert board.snapshot()["cut_off"] is True


def test_a_cached_balance_of_zero_never_read_on_chain_cuts_nothing_off() -> None:
    board = token_board(balance=0, read=False)
    assert toggles(feed(board, 1.0, reading(req=True))) == []
    effects = board.balance_changed(3, "sync", 1.5)
    assert toggles(effects) == []
    assert board.cut_off is False


def test_a_board_connecting_at_zero_with_the_load_on_is_cut_off() -> None:
    board = token_board(balance=0)
    effects = feed(board, 1.0, reading(req=True))
    assert toggles(effects) == [SendCommand(Instruction.TOGGLE, 0, "prepaid cut-off")]
    assert CutOffChanged(True) in effects
    assert board.cut_off


def test_no_toggle_before_a_reading_shows_the_load() -> None:
    board = token_board(balance=1, load_on=True)  # the database's load state may be stale
    assert toggles(board.balance_changed(0, "event", 1.0)) == []
    assert toggles(feed(board, 2.0, reading(req=True)))


def test_readings_in_flight_after_a_toggle_do_not_toggle_again() -> None:
    board = cut_off_board(1.0)
    for now in (2.0, 3.0, 4.0, 5.9):  # sent before the board got the toggle
        assert toggles(feed(board, now, reading(req=True))) == []
    assert toggles(board.balance_changed(0, "event", 5.95)) == []
    for now in (6.5, 12.0, 30.0):  # it took effect
        assert toggles(feed(board, now, reading(req=False))) == []


def test_a_toggle_that_did_not_take_effect_is_repeated_after_the_settle_time() -> None:
    board = cut_off_board(1.0)
    feed(board, 3.0, reading(req=True))
    effects = feed(board, 6.0, reading(req=True))
    assert toggles(effects) == [SendCommand(Instruction.TOGGLE, 0, "prepaid cut-off")]
    assert not any(isinstance(e, CutOffChanged) for e in effects)  # still cut off
    assert toggles(feed(board, 7.0, reading(req=True))) == []  # and settles again


def test_the_load_switched_on_by_hand_at_zero_is_toggled_off_again() -> None:
    board = cut_off_board(1.0)
    feed(board, 2.0, reading(req=False))
    effects = feed(board, 3.0, reading(req=True))
    assert toggles(effects) == [SendCommand(Instruction.TOGGLE, 0, "prepaid cut-off")]
    assert not any(isinstance(e, CutOffChanged) for e in effects)


def test_a_restored_balance_switches_the_load_back_on() -> None:
    board = cut_off_board(1.0)
    feed(board, 2.0, reading(req=False))
    effects = board.balance_changed(10, "event", 3.0)
    assert commands(effects) == [
        SendCommand(Instruction.PERSIST, 10, "balance"),
        SendCommand(Instruction.TOGGLE, 10, "balance restored"),
    ]
    assert board.cut_off  # until a reading shows the load on
    assert feed(board, 4.0, reading(req=False))[1:] == []  # in flight: nothing
    effects = feed(board, 5.0, reading(req=True))
    assert CutOffChanged(False) in effects
    assert toggles(effects) == []
    assert not board.cut_off
    assert toggles(feed(board, 6.0, reading(req=False))) == []  # the owner's to switch now


def test_a_balance_restored_while_the_cut_off_is_in_flight_waits_for_it() -> None:
    board = cut_off_board(1.0)
    assert toggles(board.balance_changed(10, "event", 1.5)) == []
    effects = feed(board, 2.0, reading(req=True))  # in flight: the cut-off is not over
    assert effects[1:] == []
    assert board.cut_off
    assert toggles(feed(board, 3.0, reading(req=False))) == [
        SendCommand(Instruction.TOGGLE, 10, "balance restored")
    ]


def test_a_load_the_gateway_did_not_switch_off_is_not_switched_on() -> None:
    board = token_board(balance=0)
    assert toggles(feed(board, 1.0, reading(req=False))) == []
    assert not board.cut_off
    assert board.balance_changed(10, "event", 2.0) == [
        SendCommand(Instruction.PERSIST, 10, "balance")
    ]
    assert toggles(feed(board, 3.0, reading(req=False))) == []


def test_a_cut_off_from_before_a_restart_is_switched_back_on() -> None:
    board = token_board(balance=0, load_cut_off=True)
    assert board.snapshot()["cut_off"] is True
    assert feed(board, 1.0, reading(req=False))[1:] == []
    assert toggles(board.balance_changed(5, "sync", 2.0)) == [
        SendCommand(Instruction.TOGGLE, 5, "balance restored")
    ]


def test_producers_are_never_cut_off() -> None:
    board = token_board(balance=0, connection_type="Producer")
    assert toggles(feed(board, 1.0, reading(req=True))) == []
    assert toggles(board.balance_changed(0, "event", 2.0)) == []
    assert not board.cut_off


def test_no_cut_off_without_prepaid_cutoff() -> None:
    policy = BoardPolicy(tokens=True, prepaid_cutoff=False)
    board = token_board(balance=0, policy=policy, load_cut_off=True)
    assert toggles(feed(board, 1.0, reading(req=True))) == []
    assert toggles(board.balance_changed(5, "event", 2.0)) == []
    assert toggles(feed(board, 3.0, reading(req=False))) == []
