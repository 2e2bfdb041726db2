"""A DeviceActor driven in-process through the public DeviceHarness (no broker, no database)."""

from __future__ import annotations

from actors.testing import DeviceHarness
from estate.board import BoardPolicy
from estate.messages import PeersChanged, RecordCutOff, RefreshBalance
from estate.types import DeviceId, DevicePk

TOKENS = BoardPolicy(tokens=True)


def test_handshake_then_keepalive_at_least_every_five_seconds():
    with DeviceHarness("H001", balance=7) as board:
        board.hello()
        assert board.commands() == ["7,1"]
        for seq in range(1, 13):
            board.advance(1.0)
            board.reading(current=0.2, voltage=12.0, seq=seq)
            board.tick()
        # 12 s after the handshake: at least one command in every 5 s window
        assert len(board.commands()) >= 1 + 12 // 5
        assert set(board.commands()) == {"7,1"}


def test_reading_is_stored_with_its_ack_and_integrated_energy():
    with DeviceHarness("H001") as board:
        board.hello()
        first = board.reading(current=0.5, voltage=12.0, seq=1)
        second = board.reading(current=0.5, voltage=12.0, seq=2)
        stored = board.stored()
        assert [r.ack for r in stored] == [first, second]
        assert [r.power for r in stored] == [6.0, 6.0]
        assert board.state()["readings"] == 2


def test_silent_board_goes_offline_and_gets_no_more_keepalives():
    with DeviceHarness("H001") as board:
        board.hello()
        board.reading(current=0.1, voltage=12.0, seq=1)
        board.advance(10.5)
        board.tick()
        assert board.state()["status"] == "offline"
        sent = len(board.commands())
        board.advance(6.0)
        board.tick()
        assert len(board.commands()) == sent
        assert [s.status for s in board.recorded_states()] == ["online", "offline"]


def test_update_flag_is_answered_with_instruction_3():
    with DeviceHarness("H001", balance=41) as board:
        board.hello()
        board.reading(current=0.1, voltage=12.0, seq=1, update=True)
        assert board.commands()[-1] == "41,3"


def test_toggle_from_outside_reaches_the_board_and_is_recorded():
    with DeviceHarness("H001", balance=3) as board:
        board.instruct(2, reason="central")
        assert board.commands() == ["3,2"]
        assert [(c.instruction, c.reason) for c in board.recorded_commands()] == [(2, "central")]


def test_balance_key_asks_the_signer_and_the_new_balance_is_answered_with_3():
    with DeviceHarness("H001", balance=5, policy=TOKENS) as board:
        board.hello()
        board.reading(current=0.1, voltage=12.0, seq=1, update=True)
        assert board.signer_messages() == [RefreshBalance(DeviceId("H001"))]
        assert board.commands() == ["5,1"]
        board.balance(4, reason="update")
        assert board.commands() == ["5,1", "4,3"]
        assert board.state()["balance_refresh_pending"] is False


def test_a_failed_refresh_answers_the_cached_balance():
    with DeviceHarness("H001", balance=5, policy=TOKENS) as board:
        board.hello()
        board.reading(current=0.1, voltage=12.0, seq=1, update=True)
        board.refresh_failed()
        assert board.commands() == ["5,1", "5,3"]


def test_without_a_signer_the_balance_key_gets_the_cached_balance():
    with DeviceHarness("H001", balance=5, policy=TOKENS) as board:
        assert board.device is not None
        board.device.tell(PeersChanged({"mqtt": board.mqtt, "db": board.db}))
        board.hello()
        board.reading(current=0.1, voltage=12.0, seq=1, update=True)
        assert board.commands() == ["5,1", "5,3"]
        assert board.signer_messages() == []


def test_consumed_to_zero_answers_3_cuts_the_load_off_and_records_it():
    with DeviceHarness("H001", balance=1, policy=TOKENS) as board:
        board.hello()
        board.reading(current=2.0, voltage=12.0, seq=1, req=True)
        board.balance(0, reason="consumed", tx_hash="0x1")
        assert board.commands() == ["1,1", "0,3", "0,2"]
        assert board.recorded_cut_offs() == [RecordCutOff(DevicePk(1), True)]
        recorded = [(c.instruction, c.reason) for c in board.recorded_commands()]
        assert recorded == [(1, "handshake"), (3, "consumed"), (2, "prepaid cut-off")]
        assert board.state()["cut_off"] is True
