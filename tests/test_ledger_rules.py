"""The ledger's batching and isolation rules, as plain calls."""

from __future__ import annotations

from collections.abc import Sequence

from estate.db.ledger import LedgerEntry
from estate.ledger import ConsumeCall, isolate_reverting, plan_consumes
from estate.sct_contract import normalise_address
from estate.types import DeviceId, DevicePk

A, B, C = (normalise_address(x) for x in ("0xa", "0xb", "0xc"))


def entry(entry_id: int, account: str, amount: int = 1) -> LedgerEntry:
    return LedgerEntry(
        entry_id, DevicePk(entry_id), DeviceId(f"H{entry_id:03}"), account, amount, "pending"
    )


def test_one_call_per_account_summing_its_entries() -> None:
    plan = plan_consumes(
        [entry(1, A), entry(2, B), entry(3, A, 2), entry(4, "0xA")], {}, set(), max_calls=10
    )
    assert [(c.account, c.amount, c.entry_ids) for c in plan.calls] == [
        (A, 4, (1, 3, 4)),
        (B, 1, (2,)),
    ]
    assert not plan.more


def test_an_account_pays_only_what_its_known_balance_covers() -> None:
    plan = plan_consumes([entry(1, A), entry(2, A, 3), entry(3, B)], {A: 2, B: 0}, set(), 10)
    assert [(c.account, c.amount) for c in plan.calls] == [(A, 1)]
    assert plan.waiting == {A: 3, B: 1}


def test_a_skipped_account_waits_with_what_it_owes() -> None:
    pending = [entry(1, A), entry(2, B, 2)]
    plan = plan_consumes(pending, {A: 5}, {A}, 10)
    assert [c.account for c in plan.calls] == [B]
    assert plan.waiting == {A: 1}


def test_at_most_max_calls_accounts_oldest_first() -> None:
    plan = plan_consumes([entry(1, C), entry(2, A), entry(3, B)], {}, set(), max_calls=2)
    assert [c.account for c in plan.calls] == [C, A]
    assert plan.more


def calls(*accounts: str) -> list[ConsumeCall]:
    return [ConsumeCall(a, 1, (entry(i, a),)) for i, a in enumerate(accounts)]


def test_isolation_finds_every_reverting_call() -> None:
    broke = {normalise_address(f"0x{i}") for i in (3, 9)}
    every = calls(*(normalise_address(f"0x{i}") for i in range(1, 13)))
    asked: list[int] = []

    def revert_reason(subset: Sequence[ConsumeCall]) -> str | None:
        asked.append(len(subset))
        return "INSUFFICIENT BALANCE" if broke & {c.account for c in subset} else None

    good, bad = isolate_reverting(every, revert_reason)
    assert {c.account for c in good} == {c.account for c in every} - broke
    assert [(c.account, why) for c, why in bad] == [
        (normalise_address("0x3"), "INSUFFICIENT BALANCE"),
        (normalise_address("0x9"), "INSUFFICIENT BALANCE"),
    ]
    assert len(asked) <= 2 * 2 * 4 + 1  # about 2 k log2 n, far fewer than one per call pair


def test_isolation_of_a_good_batch_asks_once() -> None:
    good, bad = isolate_reverting(calls(A, B), lambda subset: None)
    assert (len(good), bad) == (2, [])
