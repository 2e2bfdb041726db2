"""The gateway's Starknet client: SCT balances, signed consume multicalls, receipts, events.

A blocking facade over starknet-py (which is asyncio): each call runs on this object's
own event loop, so the one actor that owns it (the StarknetSigner) calls it like any
other blocking resource. The private key lives in the starknet-py account inside and
is never in a repr, a log line or an exception.

Errors are typed, so that the caller knows what to do:
ChainUnavailable (retry later), NonceError (re-read the nonce), ChainReverted (the
contract refused a call: isolate it), ChainRejected (the node refused the
transaction for another reason).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

import aiohttp
import attrs
from starknet_py.abi.v2 import AbiParser
from starknet_py.hash.selector import get_selector_from_name
from starknet_py.net.account.account import Account
from starknet_py.net.client_errors import ClientError
from starknet_py.net.client_models import (
    Call,
    ResourceBoundsMapping,
    TransactionExecutionStatus,
    TransactionStatus,
)
from starknet_py.net.client_utils import _create_broadcasted_txn
from starknet_py.net.full_node_client import FullNodeClient
from starknet_py.net.http_client import ServerError
from starknet_py.net.models.chains import StarknetChainId
from starknet_py.net.signer.key_pair import KeyPair
from starknet_py.serialization.factory import serializer_for_function_v1, serializer_for_payload

from estate.sct_contract import EVENT_SELECTORS, SCT_ABI, normalise_address

__all__ = [
    "CHAINS",
    "ChainError",
    "ChainEvent",
    "ChainRejected",
    "ChainReverted",
    "ChainUnavailable",
    "NonceError",
    "SignedInvoke",
    "StarknetChain",
    "TxOutcome",
]

logger = logging.getLogger(__name__)

CHAINS = {"SN_SEPOLIA": StarknetChainId.SEPOLIA, "SN_MAIN": StarknetChainId.MAINNET}

# JSON-RPC error codes of the Starknet API (starknet_api_openrpc.json)
CONTRACT_ERROR, TRANSACTION_EXECUTION_ERROR = 40, 41
TXN_HASH_NOT_FOUND = 29
INVALID_TRANSACTION_NONCE = 52
DUPLICATE_TX = 59
EVENTS_CHUNK = 200

T = TypeVar("T")


class ChainError(Exception):
    """Something about Starknet failed; `str()` says what and what to do."""


class ChainUnavailable(ChainError):
    """The node is unreachable, too slow or answered garbage: retry later."""


class NonceError(ChainError):
    """The node refused the transaction's nonce: re-read it."""


class ChainReverted(ChainError):
    """The contract reverted (in a fee estimate or a call); `reason` is its message."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the contract reverted: {reason}")
        self.reason = reason


class ChainRejected(ChainError):
    """The node refused the request for good (signature, fee, malformed, wrong chain)."""


@attrs.frozen
class SignedInvoke:
    """A signed invoke v3, ready to broadcast (and to broadcast again, unchanged)."""

    tx_hash: str
    nonce: int
    payload: str
    """The broadcast form (starknet_addInvokeTransaction's `invoke_transaction`), JSON."""


@attrs.frozen
class TxOutcome:
    """Where a transaction is: `pending`, `accepted`, `reverted` or `unknown` to the node."""

    status: str
    block_number: int | None = None
    reason: str | None = None


@attrs.frozen
class ChainEvent:
    """An SCT event: its name, its block and the accounts it touches (normalised)."""

    name: str
    block_number: int
    accounts: tuple[str, ...]
    amount: int


def _felt(value: int) -> str:
    return f"0x{value:064x}"


class StarknetChain:
    """SCT reads and consumes for one gateway account on one chain."""

    def __init__(
        self,
        rpc_url: str,
        account_address: str,
        private_key: str,
        sct_address: str,
        chain: str = "SN_SEPOLIA",
        timeout: float = 20.0,
        fee_margin: float = 1.5,
    ) -> None:
        if chain not in CHAINS:
            raise ValueError(f"chain {chain!r}: expected one of {', '.join(CHAINS)}")
        self.rpc_url, self.chain, self.timeout, self.fee_margin = (
            rpc_url,
            chain,
            timeout,
            fee_margin,
        )
        self.account_address = normalise_address(account_address)
        self.sct_address = normalise_address(sct_address)
        self.answers = 0
        """Calls the node answered (a caller can tell that it is reachable again)."""
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._key = KeyPair.from_private_key(int(private_key, 16))
        self._client: FullNodeClient | None = None
        self._account: Account | None = None
        functions = AbiParser(SCT_ABI).parse().interfaces["sct::ISCT"].items
        self._functions = {name: serializer_for_function_v1(fn) for name, fn in functions.items()}
        self._selectors = {name: get_selector_from_name(name) for name in functions}
        events = AbiParser(SCT_ABI).parse().events
        self._event_data = {
            name: serializer_for_payload(
                {
                    member: kind
                    for member, kind in events[f"sct::SCT::{name}"].types.items()
                    if member not in events[f"sct::SCT::{name}"].keys
                }
            )
            for name in EVENT_SELECTORS.values()
        }

    def __repr__(self) -> str:
        return (
            f"StarknetChain({self.rpc_url!r}, account={self.account_address}, "
            f"sct={self.sct_address}, chain={self.chain})"
        )

    @property
    def public_key(self) -> int:
        return self._key.public_key

    def close(self) -> None:
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
            self._session = None
        self._loop.close()

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, make: Awaitable[T], timeout: float | None = None) -> T:
        """Run one coroutine on this client's loop (for `timeout`, default the client's);
        translate its failures."""
        timeout = self.timeout if timeout is None else timeout
        try:
            result = self._loop.run_until_complete(asyncio.wait_for(make, timeout))
        except TimeoutError:
            raise ChainUnavailable(
                f"the Starknet node {self.rpc_url} did not answer within {timeout:.0f}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ChainUnavailable(
                f"cannot reach the Starknet node {self.rpc_url} ({type(exc).__name__}: {exc})"
            ) from None
        except ServerError:
            raise ChainUnavailable(
                f"the Starknet node {self.rpc_url} answered without a result or an error"
            ) from None
        except ClientError as exc:
            raise _translate(exc, self.rpc_url) from None
        except (ValueError, KeyError, TypeError) as exc:  # a malformed answer
            raise ChainUnavailable(
                f"the Starknet node {self.rpc_url} gave an answer the gateway cannot read: {exc}"
            ) from None
        self.answers += 1
        return result

    async def _ensure(self) -> Account:
        if self._account is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            self._client = FullNodeClient(node_url=self.rpc_url, session=self._session)
            self._account = Account(
                address=self.account_address,
                client=self._client,
                key_pair=self._key,
                chain=CHAINS[self.chain],
            )
            self._account._cairo_version = 1  # the gateway's account is a Cairo 1 account
        return self._account

    async def _rpc(self, method: str, params: dict[str, Any]) -> Any:
        await self._ensure()
        assert self._client is not None
        return await self._client._client.call(method_name=method, params=params)

    # -- reads -----------------------------------------------------------------------------

    def check_chain(self) -> None:
        """Raise ChainRejected if the node serves another chain than the configured one."""

        async def chain_id() -> str:
            await self._ensure()
            assert self._client is not None
            return await self._client.get_chain_id()

        answer = self._run(chain_id())
        if int(answer, 16) != CHAINS[self.chain]:
            raise ChainRejected(
                f"the Starknet node {self.rpc_url} serves chain {_chain_name(answer)}, not "
                f"{self.chain}: set STARKNET_CHAIN or STARKNET_RPC_URL to match"
            )

    def block_number(self) -> int:
        async def block() -> int:
            await self._ensure()
            assert self._client is not None
            return await self._client.get_block_number()

        return self._run(block())

    def nonce(self, block: str = "pre_confirmed") -> int:
        """The account's next nonce at `block` (`pre_confirmed` or `latest`).

        Transactions still waiting for a block are not counted (as on a real node).
        """

        async def nonce() -> int:
            return await (await self._ensure()).get_nonce(block_number=block)

        return self._run(nonce())

    async def _balance(self, address: str) -> int:
        await self._ensure()
        assert self._client is not None
        calldata = self._functions["balanceOf"].serialize(account=int(address, 16))
        result = await self._client.call_contract(
            Call(int(self.sct_address, 16), self._selectors["balanceOf"], calldata),
            block_number="latest",
        )
        return int(self._functions["balanceOf"].deserialize(result)[0])

    def balance_of(self, address: str) -> int:
        return self._run(self._balance(normalise_address(address)))

    def balances(
        self, addresses: Iterable[str], concurrency: int = 8
    ) -> dict[str, int | ChainError]:
        """Each account's balance, `concurrency` calls at a time; a failure per account."""
        wanted = sorted({normalise_address(a) for a in addresses})
        limit = asyncio.Semaphore(concurrency)

        async def one(address: str) -> int | ChainError:
            async with limit:
                try:
                    return await asyncio.wait_for(self._balance(address), self.timeout)
                except ClientError as exc:
                    return _translate(exc, self.rpc_url)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    return ChainUnavailable(f"cannot reach {self.rpc_url}: {exc}")

        async def every() -> list[int | ChainError]:
            return await asyncio.gather(*(one(a) for a in wanted))

        if not wanted:
            return {}
        # every account has the client's timeout: the whole read may take that per round
        rounds = -(-len(wanted) // concurrency)
        results = self._run(every(), timeout=self.timeout * rounds)
        return dict(zip(wanted, results, strict=True))

    def events(self, from_block: int, to_block: int) -> list[ChainEvent]:
        """SCT's Transfer, Consume and Mint events in these blocks, in chain order."""

        async def fetch() -> list[ChainEvent]:
            await self._ensure()
            assert self._client is not None
            found: list[ChainEvent] = []
            token: str | None = None
            while True:
                chunk = await self._client.get_events(
                    address=int(self.sct_address, 16),
                    keys=[list(EVENT_SELECTORS)],
                    from_block_number=from_block,
                    to_block_number=to_block,
                    continuation_token=token,
                    chunk_size=EVENTS_CHUNK,
                )
                for emitted in chunk.events:
                    try:
                        event = self._event(emitted)
                    except (ValueError, KeyError, TypeError, IndexError) as exc:
                        logger.warning(
                            "skipping an SCT event the ABI does not describe (block %s): %s",
                            emitted.block_number,
                            exc,
                        )
                        continue
                    if event is not None:
                        found.append(event)
                token = chunk.continuation_token
                if token is None:
                    return found

        return self._run(fetch())

    def _event(self, event: Any) -> ChainEvent | None:
        name = EVENT_SELECTORS.get(event.keys[0]) if event.keys else None
        if name is None:
            return None
        data = self._event_data[name].deserialize(list(event.data))
        accounts = tuple(normalise_address(k) for k in event.keys[1:])
        return ChainEvent(name, int(event.block_number or 0), accounts, int(data.amount))

    # -- consumes --------------------------------------------------------------------------

    def consume_calls(self, consumes: Sequence[tuple[str, int]]) -> list[Call]:
        """One `consume(account, amount)` call per (account, amount)."""
        sct, selector = int(self.sct_address, 16), self._selectors["consume"]
        serialize = self._functions["consume"].serialize
        return [
            Call(sct, selector, serialize(account=int(account, 16), amount=amount))
            for account, amount in consumes
        ]

    def simulate(self, consumes: Sequence[tuple[str, int]], nonce: int) -> None:
        """Estimate a multicall of these consumes; raise ChainReverted if it would revert."""
        self._run(self._estimate(self.consume_calls(consumes), nonce))

    async def _estimate(self, calls: list[Call], nonce: int) -> Any:
        account = await self._ensure()
        # unsigned: estimate_fee signs its own query version (a signature costs ~0.1 s)
        draft = await account._prepare_invoke_v3(
            calls, nonce=nonce, resource_bounds=ResourceBoundsMapping.init_with_zeros()
        )
        return await account.estimate_fee(draft)

    def sign_consumes(self, consumes: Sequence[tuple[str, int]], nonce: int) -> SignedInvoke:
        """Estimate the fee (ChainReverted if the multicall would revert), add the margin, sign."""

        async def sign() -> SignedInvoke:
            account = await self._ensure()
            calls = self.consume_calls(consumes)
            estimate = await self._estimate(calls, nonce)
            bounds = estimate.to_resource_bounds(self.fee_margin, self.fee_margin)
            tx = await account.sign_invoke_v3(calls, nonce=nonce, resource_bounds=bounds)
            tx_hash = tx.calculate_hash(CHAINS[self.chain])
            payload = json.dumps(_create_broadcasted_txn(tx), sort_keys=True)
            return SignedInvoke(_felt(tx_hash), nonce, payload)

        return self._run(sign())

    def send(self, payload: str) -> None:
        """Broadcast a signed transaction (again, if need be).

        A node that knows it already (duplicate) is fine: the same signed transaction
        can be included once only.
        """
        try:
            self._run(
                self._rpc("addInvokeTransaction", {"invoke_transaction": json.loads(payload)})
            )
        except ChainRejected as exc:
            if getattr(exc, "code", None) != DUPLICATE_TX:
                raise

    def outcome(self, tx_hash: str) -> TxOutcome:
        """Where `tx_hash` is; `unknown` if the node never heard of it (or lost it)."""

        async def look() -> TxOutcome:
            await self._ensure()
            assert self._client is not None
            try:
                status = await self._client.get_transaction_status(int(tx_hash, 16))
            except ClientError as exc:
                if _code(exc) == TXN_HASH_NOT_FOUND:
                    return TxOutcome("unknown")
                raise
            if status.finality_status not in (
                TransactionStatus.ACCEPTED_ON_L2,
                TransactionStatus.ACCEPTED_ON_L1,
            ):
                return TxOutcome("pending")
            receipt = await self._client.get_transaction_receipt(int(tx_hash, 16))
            if receipt.execution_status is TransactionExecutionStatus.REVERTED:
                return TxOutcome("reverted", receipt.block_number, receipt.revert_reason or "")
            return TxOutcome("accepted", receipt.block_number)

        return self._run(look())

    def actual_fee(self, tx_hash: str) -> int:
        """The fee a transaction in a block paid (in FRI for a v3 invoke)."""

        async def fee() -> int:
            await self._ensure()
            assert self._client is not None
            receipt = await self._client.get_transaction_receipt(int(tx_hash, 16))
            return int(receipt.actual_fee.amount)

        return self._run(fee())


def _chain_name(felt: str) -> str:
    try:
        return bytes.fromhex(felt.removeprefix("0x").rjust(2, "0")).decode("ascii").lstrip("\0")
    except (ValueError, UnicodeDecodeError):
        return felt


def _code(exc: ClientError) -> int | None:
    try:
        return int(exc.code) if exc.code is not None else None
    except (TypeError, ValueError):
        return None


def _translate(exc: ClientError, url: str) -> ChainError:
    """A starknet-py ClientError as the gateway's error, keeping the node's code."""
    code = _code(exc)
    detail = f"{exc.message}"
    if exc.data is not None and str(exc.data) not in detail:
        detail += f" {exc.data}"
    error: ChainError
    if code is not None and (code >= 500 or code in (408, 429)):
        error = ChainUnavailable(f"the Starknet node {url} failed (HTTP {code})")
    elif code == INVALID_TRANSACTION_NONCE:
        error = NonceError(f"the node refused the nonce: {detail}")
    elif code in (CONTRACT_ERROR, TRANSACTION_EXECUTION_ERROR):
        reason = _revert_reason(exc)
        # a simulation with a used nonce fails in the account's validation, not the contract
        is_nonce = "nonce" in reason.lower() and "invalid" in reason.lower()
        error = NonceError(f"the node refused the nonce: {reason}") if is_nonce else (
            ChainReverted(reason)
        )
    else:
        error = ChainRejected(f"the Starknet node refused the request: {detail}")
    error.code = code  # type: ignore[attr-defined]
    return error


def _revert_reason(exc: ClientError) -> str:
    """The contract's own message, as far as it can be found in the error's data."""
    data = exc.data
    if isinstance(data, dict):
        for key in ("revert_error", "execution_error", "error"):
            if key in data:
                return _flatten(data[key])
        return json.dumps(data, sort_keys=True)
    return str(data if data is not None else exc.message)


def _flatten(value: Any) -> str:
    if isinstance(value, dict):
        inner = value.get("error", value)
        return _flatten(inner) if inner is not value else json.dumps(value, sort_keys=True)
    return str(value)
