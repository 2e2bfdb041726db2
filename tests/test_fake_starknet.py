"""The fake Starknet node, driven through starknet-py 0.30 exactly as the gateway drives a node."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from starknet_py.abi.v2 import AbiParser
from starknet_py.hash.selector import get_selector_from_name
from starknet_py.net.account.account import Account
from starknet_py.net.client_errors import ClientError
from starknet_py.net.client_models import (
    Call,
    PriceUnit,
    ResourceBounds,
    ResourceBoundsMapping,
    TransactionExecutionStatus,
    TransactionFinalityStatus,
    TransactionStatus,
)
from starknet_py.net.full_node_client import FullNodeClient
from starknet_py.net.http_client import IncompatibleRPCVersionWarning
from starknet_py.net.models import StarknetChainId
from starknet_py.net.signer.key_pair import KeyPair
from starknet_py.serialization.factory import serializer_for_function_v1
from starknet_py.transaction_errors import TransactionRevertedError

from estate.fake_starknet import FakeStarknetNode, make_test_account
from estate.sct_contract import EVENT_SELECTORS, SCT_ABI
from estate.starknet_client import ChainReverted, StarknetChain

_FUNCTIONS = AbiParser(SCT_ABI).parse().interfaces["sct::ISCT"].items
_CONSUME = next(s for s, n in EVENT_SELECTORS.items() if n == "Consume")
_MINT = next(s for s, n in EVENT_SELECTORS.items() if n == "Mint")
ALICE, BOB = make_test_account(10)[0], make_test_account(11)[0]


def sct_call(node: FakeStarknetNode, function: str, **arguments: Any) -> Call:
    calldata = serializer_for_function_v1(_FUNCTIONS[function]).serialize(**arguments)
    return Call(node.sct_address, get_selector_from_name(function), calldata)


def consume(node: FakeStarknetNode, account: int, amount: int) -> Call:
    return sct_call(node, "consume", account=account, amount=amount)


def balance(client: FullNodeClient, node: FakeStarknetNode, account: int, **block: Any) -> int:
    raw = client.call_contract_sync(sct_call(node, "balanceOf", account=account), **block)
    (value,) = serializer_for_function_v1(_FUNCTIONS["balanceOf"]).deserialize(raw)
    return value


def make_account(node: FakeStarknetNode, seed: int, key_seed: int | None = None) -> Account:
    """An account deployed on `node`, signing with its key (or the key of `key_seed`)."""
    address, private_key, public_key = make_test_account(seed)
    node.add_account(address, public_key)
    signing_key = private_key if key_seed is None else make_test_account(key_seed)[1]
    return Account(
        address=address,
        client=FullNodeClient(node_url=node.url),
        key_pair=KeyPair.from_private_key(signing_key),
        chain=StarknetChainId.SEPOLIA,
    )


def wait_receipt(account: Account, tx_hash: int):
    return account.client.wait_for_tx_sync(tx_hash, check_interval=0.01, retries=500)


@pytest.fixture
def node() -> Iterator[FakeStarknetNode]:
    with FakeStarknetNode(block_time=0.02) as fake:
        yield fake


@pytest.fixture
def client(node: FakeStarknetNode) -> FullNodeClient:
    return FullNodeClient(node_url=node.url)


@pytest.fixture
def hub(node: FakeStarknetNode) -> Account:
    """The gateway's account, authorised on the SCT."""
    account = make_account(node, 1)
    node.authorise(account.address)
    return account


def rpc(node: FakeStarknetNode, document: Any) -> Any:
    """A raw JSON-RPC exchange, to check what starknet-py does not expose."""
    request = urllib.request.Request(
        node.url, json.dumps(document).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())


# -- reads ----------------------------------------------------------------------------------


def test_chain_reads_without_a_version_warning(node: FakeStarknetNode, client: FullNodeClient):
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompatibleRPCVersionWarning)
        assert client.spec_version_sync() == "0.10.2"
        assert int(client.get_chain_id_sync(), 16) == StarknetChainId.SEPOLIA
        assert client.get_block_number_sync() == 0
    node.mint(ALICE, 5)
    latest = client.get_block_hash_and_number_sync()
    assert latest.block_number == 1
    block = client.get_block_with_tx_hashes_sync(block_number="latest")
    assert (block.block_hash, block.block_number) == (latest.block_hash, 1)
    assert len(block.transactions) == 1
    assert client.get_block_with_tx_hashes_sync(block_number="pre_confirmed").transactions == []
    assert len(client.get_block_with_txs_sync(block_number=1).transactions) == 1


def test_balance_of_by_block(node: FakeStarknetNode, client: FullNodeClient):
    node.mint(ALICE, 2**130 + 7)
    assert balance(client, node, ALICE) == 2**130 + 7  # starknet-py reads "pre_confirmed"
    assert balance(client, node, ALICE, block_number="latest") == 2**130 + 7
    assert balance(client, node, ALICE, block_number=0) == 0
    assert balance(client, node, BOB) == 0
    with pytest.raises(ClientError) as refused:
        balance(client, node, ALICE, block_number=99)
    assert refused.value.code == 24


def test_the_account_is_cairo_1(node: FakeStarknetNode, hub: Account):
    assert asyncio.run(hub.cairo_version) == 1
    assert hub.get_nonce_sync() == 0
    with pytest.raises(ClientError) as refused:
        hub.client.get_contract_nonce_sync(0x1234)
    assert refused.value.code == 20


# -- invokes --------------------------------------------------------------------------------


def test_multicall_of_consumes(node: FakeStarknetNode, hub: Account):
    node.mint(ALICE, 100)
    node.mint(BOB, 50)
    calls = [consume(node, ALICE, 30), consume(node, BOB, 20)]
    sent = hub.execute_v3_sync(calls, resource_bounds=node.resource_bounds(2))
    receipt = wait_receipt(hub, sent.transaction_hash)
    assert receipt.execution_status == TransactionExecutionStatus.SUCCEEDED
    assert receipt.finality_status == TransactionFinalityStatus.ACCEPTED_ON_L2
    assert receipt.actual_fee.unit == PriceUnit.FRI
    assert receipt.actual_fee.amount > 0
    assert [e.keys for e in receipt.events] == [[_CONSUME, ALICE], [_CONSUME, BOB]]
    assert (balance(hub.client, node, ALICE), balance(hub.client, node, BOB)) == (70, 30)
    assert hub.get_nonce_sync() == 1
    chunk = hub.client.get_events_sync(
        address=node.sct_address, keys=[[_CONSUME]], from_block_number=0, chunk_size=10
    )
    assert [(e.keys[1], e.data) for e in chunk.events] == [(ALICE, [30, 0]), (BOB, [20, 0])]
    assert {e.transaction_hash for e in chunk.events} == {sent.transaction_hash}
    assert chunk.events[0].block_number == receipt.block_number
    (recorded,) = node.transactions
    assert (recorded.hash, recorded.nonce) == (sent.transaction_hash, 0)
    assert recorded.sender == hub.address
    assert recorded.calls == [(c.to_addr, c.selector, c.calldata) for c in calls]


def test_auto_estimate_then_send(node: FakeStarknetNode, hub: Account):
    node.mint(ALICE, 10)
    calls = [consume(node, ALICE, 4)]
    tx = hub.sign_invoke_v3_sync(calls, resource_bounds=node.resource_bounds())
    estimate = hub.estimate_fee_sync(tx)
    assert estimate.unit == PriceUnit.FRI
    assert estimate.overall_fee == estimate.calculate_overall_fee() > 0
    assert node.balance_of(ALICE) == 10  # an estimate changes nothing
    sent = hub.execute_v3_sync(calls, auto_estimate=True)
    wait_receipt(hub, sent.transaction_hash)
    assert node.balance_of(ALICE) == 6
    assert node.calls_by_method["starknet_estimateFee"] == 2


def test_a_wrong_key_is_refused(node: FakeStarknetNode):
    node.mint(ALICE, 10)
    forger = make_account(node, 2, key_seed=3)
    node.authorise(forger.address)
    with pytest.raises(ClientError) as refused:
        forger.execute_v3_sync([consume(node, ALICE, 1)], resource_bounds=node.resource_bounds())
    assert refused.value.code == 55
    assert "Account validation failed" in refused.value.message
    with pytest.raises(ClientError) as estimate:
        forger.execute_v3_sync([consume(node, ALICE, 1)], auto_estimate=True)
    assert estimate.value.code == 41
    assert "invalid signature" in estimate.value.message
    assert node.invoke_count == 0
    assert node.nonce_of(forger.address) == 0


def test_a_wrong_nonce_is_refused(node: FakeStarknetNode, hub: Account):
    node.mint(ALICE, 10)
    with pytest.raises(ClientError) as refused:
        hub.execute_v3_sync(
            [consume(node, ALICE, 1)], nonce=1, resource_bounds=node.resource_bounds()
        )
    assert refused.value.code == 52
    assert "Invalid transaction nonce" in refused.value.message
    assert node.invoke_count == 0


def test_resource_bounds_below_the_fee_are_refused(node: FakeStarknetNode, hub: Account):
    node.mint(ALICE, 10)
    enough = node.resource_bounds()
    short = ResourceBoundsMapping(
        l1_gas=enough.l1_gas, l1_data_gas=enough.l1_data_gas, l2_gas=ResourceBounds(1000, 10**12)
    )
    with pytest.raises(ClientError) as refused:
        hub.execute_v3_sync([consume(node, ALICE, 1)], resource_bounds=short)
    assert refused.value.code == 53
    assert node.invoke_count == 0


def test_the_same_transaction_twice_is_a_duplicate(node: FakeStarknetNode, hub: Account):
    node.mint(ALICE, 10)
    node.pause_blocks()
    tx = hub.sign_invoke_v3_sync([consume(node, ALICE, 1)], resource_bounds=node.resource_bounds())
    hub.client.send_transaction_sync(tx)
    with pytest.raises(ClientError) as refused:
        hub.client.send_transaction_sync(tx)
    assert refused.value.code == 59
    node.resume_blocks()
    assert node.wait_until_included()
    assert node.balance_of(ALICE) == 9


def test_a_multicall_with_one_failing_call_reverts_whole(node: FakeStarknetNode, hub: Account):
    node.mint(ALICE, 10)
    node.mint(BOB, 10)
    calls = [consume(node, ALICE, 5), consume(node, BOB, 11)]
    sent = hub.execute_v3_sync(calls, resource_bounds=node.resource_bounds(2))
    with pytest.raises(TransactionRevertedError, match="INSUFFICIENT BALANCE"):
        wait_receipt(hub, sent.transaction_hash)
    receipt = hub.client.get_transaction_receipt_sync(sent.transaction_hash)
    assert receipt.execution_status == TransactionExecutionStatus.REVERTED
    assert "INSUFFICIENT BALANCE" in receipt.revert_reason
    assert receipt.events == []
    assert receipt.actual_fee.amount > 0
    assert (node.balance_of(ALICE), node.balance_of(BOB)) == (10, 10)
    assert hub.get_nonce_sync() == 1  # the nonce is consumed all the same
    chunk = hub.client.get_events_sync(keys=[[_CONSUME]], chunk_size=10)
    assert chunk.events == []


def test_estimating_a_reverting_multicall_fails_with_the_reason(
    node: FakeStarknetNode, hub: Account
):
    node.mint(ALICE, 10)
    with pytest.raises(ClientError) as refused:
        hub.execute_v3_sync([consume(node, ALICE, 5), consume(node, BOB, 1)], auto_estimate=True)
    assert refused.value.code == 41
    assert "INSUFFICIENT BALANCE" in refused.value.message
    assert node.invoke_count == 0
    assert node.balance_of(ALICE) == 10


def test_an_unauthorised_caller_reverts(node: FakeStarknetNode):
    node.mint(ALICE, 10)
    stranger = make_account(node, 4)
    sent = stranger.execute_v3_sync(
        [consume(node, ALICE, 1)], resource_bounds=node.resource_bounds()
    )
    with pytest.raises(TransactionRevertedError, match="UNAUTHORIZED"):
        wait_receipt(stranger, sent.transaction_hash)
    assert node.balance_of(ALICE) == 10


def test_owner_mints_and_a_holder_transfers(node: FakeStarknetNode):
    owner = make_account(node, 0)  # the default owner
    alice = make_account(node, 10)
    sent = owner.execute_v3_sync(
        [sct_call(node, "mint", account=ALICE, amount=8)], resource_bounds=node.resource_bounds()
    )
    wait_receipt(owner, sent.transaction_hash)
    sent = alice.execute_v3_sync(
        [sct_call(node, "transfer", reciepient=BOB, amount=3)],
        resource_bounds=node.resource_bounds(),
    )
    receipt = wait_receipt(alice, sent.transaction_hash)
    assert receipt.events[0].keys == [get_selector_from_name("Transfer"), ALICE, BOB]
    assert (node.balance_of(ALICE), node.balance_of(BOB)) == (5, 3)
    node.transfer(BOB, ALICE, 1)
    assert (node.balance_of(ALICE), node.balance_of(BOB)) == (6, 2)
    with pytest.raises(ValueError, match="INSUFFICIENT BALANCE"):
        node.transfer(BOB, ALICE, 3)


# -- failure switches -----------------------------------------------------------------------


def test_received_until_blocks_resume(node: FakeStarknetNode, hub: Account):
    node.mint(ALICE, 10)
    node.pause_blocks()
    sent = hub.execute_v3_sync([consume(node, ALICE, 1)], resource_bounds=node.resource_bounds())
    assert not node.wait_until_included(timeout=0.1)
    status = hub.client.get_transaction_status_sync(sent.transaction_hash)
    assert status.finality_status == TransactionStatus.RECEIVED
    with pytest.raises(ClientError) as missing:
        hub.client.get_transaction_receipt_sync(sent.transaction_hash)
    assert missing.value.code == 29
    # the next nonce is free while the first waits
    second = hub.execute_v3_sync(
        [consume(node, ALICE, 2)], nonce=1, resource_bounds=node.resource_bounds()
    )
    node.resume_blocks()
    assert wait_receipt(hub, second.transaction_hash).block_number == node.block_number
    status = hub.client.get_transaction_status_sync(sent.transaction_hash)
    assert status.finality_status == TransactionStatus.ACCEPTED_ON_L2
    assert status.execution_status == TransactionExecutionStatus.SUCCEEDED
    assert node.balance_of(ALICE) == 7


def test_a_lost_invoke_never_lands(node: FakeStarknetNode, hub: Account):
    node.mint(ALICE, 10)
    node.lose_next_invoke()
    tx = hub.sign_invoke_v3_sync([consume(node, ALICE, 1)], resource_bounds=node.resource_bounds())
    sent = hub.client.send_transaction_sync(tx)
    assert node.wait_until_included()
    with pytest.raises(ClientError) as missing:
        hub.client.get_transaction_status_sync(sent.transaction_hash)
    assert missing.value.code == 29
    assert hub.get_nonce_sync() == 0
    assert node.balance_of(ALICE) == 10
    assert node.invoke_count == 1
    assert node.transactions[0].lost
    hub.client.send_transaction_sync(tx)  # sent again, it lands
    wait_receipt(hub, sent.transaction_hash)
    assert node.balance_of(ALICE) == 9


def test_down_and_up_on_the_same_port(node: FakeStarknetNode, client: FullNodeClient):
    url = node.url
    node.down()
    with pytest.raises(aiohttp.ClientConnectionError):
        client.get_block_number_sync()
    node.up()
    assert node.url == url
    assert client.get_block_number_sync() == 0


def test_a_slow_node(node: FakeStarknetNode, client: FullNodeClient):
    client.get_block_number_sync()  # the version check is behind us
    node.delay = 0.2
    started = time.monotonic()
    client.get_block_number_sync()
    assert time.monotonic() - started >= 0.2


def test_block_time_zero_includes_at_once():
    with FakeStarknetNode(block_time=0) as node:
        hub = make_account(node, 1)
        node.authorise(hub.address)
        node.mint(ALICE, 3)
        sent = hub.execute_v3_sync(
            [consume(node, ALICE, 3)], resource_bounds=node.resource_bounds()
        )
        status = hub.client.get_transaction_status_sync(sent.transaction_hash)
        assert status.finality_status == TransactionStatus.ACCEPTED_ON_L2
        assert node.balance_of(ALICE) == 0


def test_planned_failures_and_counters(node: FakeStarknetNode, client: FullNodeClient):
    node.fail_next("starknet_blockNumber", 2, code=-32603, message="Internal error")
    for _ in range(2):
        with pytest.raises(ClientError) as failed:
            client.get_block_number_sync()
        assert failed.value.code == -32603
    assert client.get_block_number_sync() == 0
    node.fail_next("*", http_status=503)
    with pytest.raises(ClientError) as unavailable:
        client.get_chain_id_sync()
    assert unavailable.value.code == "503"
    assert node.calls_by_method["starknet_blockNumber"] == 3
    assert node.calls_by_method["starknet_specVersion"] == 1


def test_raw_json_rpc_errors(node: FakeStarknetNode):
    def ask(method: str, params: Any) -> Any:
        return rpc(node, {"jsonrpc": "2.0", "id": 7, "method": method, "params": params})

    assert ask("starknet_nope", {})["error"]["code"] == -32601
    pending = ask("starknet_getNonce", {"block_id": "pending", "contract_address": "0x1"})
    assert pending["error"]["code"] == -32602
    assert ask("starknet_blockNumber", [])["result"] == 0
    answer = ask("starknet_getNonce", ["latest", hex(node.sct_address)])
    assert answer == {"jsonrpc": "2.0", "id": 7, "result": "0x0"}


# -- events ---------------------------------------------------------------------------------


def test_event_pagination(node: FakeStarknetNode, client: FullNodeClient):
    for amount in range(1, 6):
        node.mint(ALICE if amount % 2 else BOB, amount)
    pages, token = [], None
    while True:
        chunk = client.get_events_sync(
            address=node.sct_address, chunk_size=2, continuation_token=token
        )
        pages.append([e.data[0] for e in chunk.events])
        token = chunk.continuation_token
        if token is None:
            break
    assert pages == [[1, 2], [3, 4], [5]]
    everything = client.get_events_sync(chunk_size=2, follow_continuation_token=True)
    assert [e.data[0] for e in everything.events] == [1, 2, 3, 4, 5]
    bob = client.get_events_sync(keys=[[_MINT], [BOB]], chunk_size=10)
    assert [e.data[0] for e in bob.events] == [2, 4]
    window = client.get_events_sync(from_block_number=2, to_block_number=3, chunk_size=10)
    assert [e.block_number for e in window.events] == [2, 3]
    with pytest.raises(ClientError) as bad:
        client.get_events_sync(chunk_size=2, continuation_token="x")
    assert bad.value.code == 33


def test_estate_fake_starknet_serves_a_gateway_account(tmp_path: Path) -> None:
    """The command prints the gateway's environment; the gateway's client works with it."""
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}", "HEALTH_ADDRESS": "off"}
    process = subprocess.Popen(
        [sys.executable, "-m", "estate.cli", "fake-starknet", "--port", "0", "--mint", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(4)]
        told = dict(line.split("=", 1) for line in lines)
        assert set(told) == {
            "STARKNET_RPC_URL",
            "STARKNET_ACCOUNT_ADDRESS",
            "STARKNET_PRIVATE_KEY",
            "SCT_CONTRACT_ADDRESS",
        }
        chain = StarknetChain(
            told["STARKNET_RPC_URL"],
            told["STARKNET_ACCOUNT_ADDRESS"],
            told["STARKNET_PRIVATE_KEY"],
            told["SCT_CONTRACT_ADDRESS"],
        )
        try:
            chain.check_chain()
            assert chain.nonce() == 0
            assert chain.balance_of("0x1234") == 0
            # authorised: a consume reverts on the balance, not on the caller
            with pytest.raises(ChainReverted, match="INSUFFICIENT BALANCE"):
                chain.simulate([("0x1234", 1)], 0)
        finally:
            chain.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
