"""Settling consumption on Starknet: transactions and time, batched against one per consume.

    python -m benchmarks.settle --consumes 1000 --boards 100

`--consumes` consumes of 1 SCT from `--boards` boards (each board's owner its own
account) arrive evenly over `--spread` seconds, against the fake Starknet node (real
JSON-RPC, signatures checked) making a block every `--block-time` seconds. In one run,
`--repeat` times each:

1. baseline, one transaction per consume: each consume is estimated, signed and sent
   as it arrives with the gateway's chain client, nonces counted locally so that
   transactions are pipelined (never waiting for the previous one);
2. the gateway: readings whose energy fills each consume go through the DbWriter
   (PostgreSQL) into the ledger, and the StarknetSigner settles them in multicalls,
   one per `--window` seconds.

It prints, for each, the median number of transactions, the median time from the
first consume to the last one accepted on chain, the fee paid (FRI), and the ratios;
and fails unless every consume was charged exactly once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import attrs
import pykka
from sqlalchemy import func, select, update

from actors.db_writer import DbWriter
from actors.starknet_signer import StarknetSigner
from actors.testing import Recorder
from estate.config import load_settings
from estate.db.engine import make_engine
from estate.db.models import DeviceRow, LedgerEntryRow
from estate.db.scratch import scratch_database
from estate.db.store import Charging, register_device
from estate.fake_starknet import FakeStarknetNode, make_test_account
from estate.messages import AccountsChanged, PeersChanged, StoreReading, TokenAccount
from estate.sct_contract import normalise_address
from estate.starknet_client import StarknetChain
from estate.types import DeviceId, DevicePk

WH_PER_TOKEN = 1.0
GATEWAY, GATEWAY_KEY, GATEWAY_PUBLIC = make_test_account(1)


@attrs.frozen
class Outcome:
    transactions: int
    seconds: float
    fee_fri: int


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumes", type=int, default=1000)
    parser.add_argument("--boards", type=int, default=100)
    parser.add_argument("--spread", type=float, default=10.0, help="seconds consumes arrive over")
    parser.add_argument("--window", type=float, default=5.0, help="STARKNET_BATCH_WINDOW")
    parser.add_argument("--block-time", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    return parser.parse_args()


def _owner(board: int) -> str:
    return normalise_address(0x10_0000 + board)


def _node(args: argparse.Namespace) -> FakeStarknetNode:
    node = FakeStarknetNode(block_time=args.block_time).start()
    node.add_account(GATEWAY, GATEWAY_PUBLIC)
    node.authorise(GATEWAY)
    for board in range(args.boards):
        node.mint(_owner(board), args.consumes)  # every consume can be paid
    return node


def _pace(args: argparse.Namespace, started: float, n: int) -> None:
    """Sleep until consume `n` is due."""
    due = started + args.spread * n / max(args.consumes, 1)
    delay = due - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _fees(node: FakeStarknetNode, chain: StarknetChain) -> int:
    """The fees the node charged the gateway's account, from the receipts."""
    total = 0
    for tx in node.transactions:
        if not tx.lost:
            total += chain.actual_fee(hex(tx.hash))
    return total


def _charged(node: FakeStarknetNode, args: argparse.Namespace) -> int:
    return sum(args.consumes - node.balance_of(_owner(b)) for b in range(args.boards))


def _chain(node: FakeStarknetNode) -> StarknetChain:
    return StarknetChain(node.url, hex(GATEWAY), hex(GATEWAY_KEY), hex(node.sct_address))


def baseline(args: argparse.Namespace) -> Outcome:
    """One transaction per consume, pipelined."""
    node = _node(args)
    chain = _chain(node)
    try:
        nonce = chain.nonce()
        started = time.perf_counter()
        for n in range(args.consumes):
            _pace(args, started, n)
            signed = chain.sign_consumes([(_owner(n % args.boards), 1)], nonce)
            chain.send(signed.payload)
            nonce += 1
        while not node.wait_until_included(timeout=60):
            pass
        seconds = time.perf_counter() - started
        if _charged(node, args) != args.consumes:
            raise SystemExit(f"baseline charged {_charged(node, args)} of {args.consumes}")
        return Outcome(node.invoke_count, seconds, _fees(node, chain))
    finally:
        chain.close()
        node.stop()


def gateway(args: argparse.Namespace) -> Outcome:
    """The DbWriter's ledger and the StarknetSigner's multicalls."""
    node = _node(args)
    chain = _chain(node)
    with scratch_database(args.pg, "estate_bench") as url:
        engine = make_engine(url)
        settings = load_settings(
            {
                "DATABASE_URL": url,
                "STARKNET_RPC_URL": node.url,
                "STARKNET_ACCOUNT_ADDRESS": hex(GATEWAY),
                "STARKNET_PRIVATE_KEY": hex(GATEWAY_KEY),
                "SCT_CONTRACT_ADDRESS": hex(node.sct_address),
                "STARKNET_BATCH_WINDOW": str(args.window),
                "WH_PER_TOKEN": str(WH_PER_TOKEN),
            },
            env_file=None,
        )
        pks: list[DevicePk] = []
        with engine.begin() as conn:
            for board in range(args.boards):
                pk = register_device(conn, f"B{board:04}", "Consumer", _owner(board))
                pks.append(pk)
            conn.execute(update(DeviceRow).values(balance=args.consumes))
        db = DbWriter.start(url, charging=Charging(WH_PER_TOKEN))
        boards = [Recorder.start(f"board:{n}") for n in range(args.boards)]
        signer = StarknetSigner.start(settings, peers=PeersChanged({"db": db}))
        db.tell(PeersChanged({"signer": signer}))
        signer.tell(
            AccountsChanged(
                tuple(
                    TokenAccount(DeviceId(f"B{n:04}"), pks[n], _owner(n), boards[n])
                    for n in range(args.boards)
                )
            )
        )
        try:
            started = time.perf_counter()
            for n in range(args.consumes):
                _pace(args, started, n)
                at = datetime.now(UTC)
                pk = pks[n % args.boards]
                db.tell(
                    StoreReading(pk, 0, n + 1, f"{n:016x}", at, at, 12.0, 1.0, 12.0,
                                 WH_PER_TOKEN, True, None, None)
                )  # fmt: skip
            while _accepted(engine) < args.consumes:
                if time.perf_counter() - started > args.spread + 300:
                    raise SystemExit(f"only {_accepted(engine)} consumes settled in time")
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            if _charged(node, args) != args.consumes:
                raise SystemExit(f"gateway charged {_charged(node, args)} of {args.consumes}")
            return Outcome(node.invoke_count, seconds, _fees(node, chain))
        finally:
            for ref in (signer, db, *boards):
                ref.stop()
            engine.dispose()
            chain.close()
            node.stop()


def _accepted(engine: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(
            select(func.coalesce(func.sum(LedgerEntryRow.amount), 0)).where(
                LedgerEntryRow.status == "accepted"
            )
        ).scalar_one()


def main() -> None:
    args = _arguments()
    runs: dict[str, list[Outcome]] = {"one per consume": [], "gateway (batched)": []}
    for round_ in range(args.repeat):
        for name, run in (("one per consume", baseline), ("gateway (batched)", gateway)):
            outcome = run(args)
            runs[name].append(outcome)
            print(
                f"round {round_ + 1} {name}: {outcome.transactions} transactions, "
                f"{outcome.seconds:.2f} s, fee {outcome.fee_fri:,} FRI",
                flush=True,
            )
    print(
        f"\n{args.consumes} consumes from {args.boards} boards over {args.spread:.0f} s, "
        f"block time {args.block_time} s, window {args.window} s, medians of {args.repeat}:"
    )
    print(f"{'':20} {'transactions':>12} {'settle s':>9} {'fee FRI':>22}")
    medians = {}
    for name, outcomes in runs.items():
        medians[name] = (
            statistics.median(o.transactions for o in outcomes),
            statistics.median(o.seconds for o in outcomes),
            statistics.median(o.fee_fri for o in outcomes),
        )
        txs, seconds, fee = medians[name]
        print(f"{name:20} {txs:12.0f} {seconds:9.2f} {fee:22,.0f}")
    base, ours = medians["one per consume"], medians["gateway (batched)"]
    print(
        f"ratio gateway/baseline: transactions {ours[0] / base[0]:.4f}, "
        f"settle time {ours[1] / base[1]:.2f}, fee {ours[2] / base[2]:.4f}"
    )
    pykka.ActorRegistry.stop_all()


if __name__ == "__main__":
    main()
