"""A faithful fake of a Starknet full node (JSON-RPC 0.10 as starknet-py 0.30 speaks it), for tests.

Real JSON-RPC 2.0 over HTTP/1.1 on loopback, on daemon threads. The chain holds Cairo 1
accounts (`add_account`) and one SCT contract (PROTOCOL section 4). Requests are checked
as a node checks them, independently of starknet-py's serialisation (so that it checks the
client rather than agreeing with it by construction); only the cryptography is
starknet-py's (the v3 invoke hash, ECDSA verification). Results carry exactly the fields
starknet-py's marshmallow schemas know (they refuse unknown fields).

Life of an invoke: `starknet_addInvokeTransaction` checks it and answers its hash; it is
RECEIVED (status RECEIVED, receipt error 29) until a block takes it, `block_time` seconds
later (0: in the same call); the block executes it (a reverting multicall changes no SCT
state but consumes the nonce and is charged) and it becomes ACCEPTED_ON_L2. Blocks are
made only when there is something to put in them. Reads by block tag: "latest" and
"pre_confirmed" both read the state of the last block (received transactions are not
executed before their block); "l1_accepted" is Block not found (nothing settles on L1).

Nonces: `starknet_getNonce` does not count waiting transactions (a node's neither), but
an invoke must carry the account's next nonce after them. Fees: an invoke of n calls
consumes 0 L1 gas, 128 + 64n L1 data gas and 400k + 300k n L2 gas at `gas_prices` (FRI);
`resource_bounds(n)` covers it.

Refusals of an invoke, in the order a node checks (codes of the 0.10 spec):

- malformed body -> -32602 `Invalid params` (data says which field);
- version other than 0x3 (e.g. a query version) -> 61 `the transaction version is not supported`;
- sender is the SCT -> 58 `Sender address is not an account contract`; sender not deployed
  -> 55 `Account validation failed` (data: `Requested contract address ... is not deployed.`);
- a resource bound whose max amount or max price is below what the fake charges -> 53
  `The transaction's resources don't cover validation or the minimal transaction fee`;
- the hash of a transaction still waiting for its block -> 59 `A transaction with the same
  hash already exists in the mempool`;
- nonce other than the account's next one (its nonce plus its waiting transactions) -> 52
  `Invalid transaction nonce` (an already included transaction sent again lands here);
- signature not `[r, s]` of the v3 hash by the account's key -> 55 `Account validation
  failed` (data names `Account: invalid signature`).

`starknet_estimateFee` simulates on the requested block's state: a validation failure
(signature, unless SKIP_VALIDATE; nonce below the account's) or a revert is error 41
`Transaction execution error` with `{"transaction_index", "execution_error"}`, the error
nested as the spec's CONTRACT_EXECUTION_ERROR, its innermost text carrying the reason as
Cairo prints a panic (`0x494e...45 ('INSUFFICIENT BALANCE')`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from poseidon_py.poseidon_hash import poseidon_hash_many
from starknet_py.cairo.felt import encode_shortstring
from starknet_py.constants import EC_ORDER, FIELD_PRIME, QUERY_VERSION_BASE
from starknet_py.hash.address import compute_address
from starknet_py.hash.selector import get_selector_from_name
from starknet_py.hash.transaction import (
    CommonTransactionV3Fields,
    TransactionHashPrefix,
    compute_invoke_v3_transaction_hash,
)
from starknet_py.hash.utils import verify_message_signature
from starknet_py.net.client_models import DAMode, ResourceBounds, ResourceBoundsMapping
from starknet_py.net.models import StarknetChainId
from starknet_py.net.signer.key_pair import KeyPair

from estate.loopback_http import LoopbackService, TrackingHTTPServer
from estate.sct_contract import SCT_ABI

__all__ = [
    "DEFAULT_OWNER",
    "DEFAULT_SCT_ADDRESS",
    "SPEC_VERSION",
    "DecodedCall",
    "FakeStarknetNode",
    "SentInvoke",
    "make_test_account",
]

logger = logging.getLogger(__name__)

SPEC_VERSION = "0.10.2"
"""The JSON-RPC spec version the fake answers (starknet-py 0.30 warns on any other)."""

ACCOUNT_CLASS_HASH = get_selector_from_name("fake_starknet::Account")
SCT_CLASS_HASH = get_selector_from_name("fake_starknet::SCT")
DEFAULT_SCT_ADDRESS = 0x05C7B6A5E3F2D1C0B9A8F7E6D5C4B3A2918F7E6D5C4B3A2918F7E6D5C4B3A291


def make_test_account(seed: int) -> tuple[int, int, int]:
    """A deterministic `(address, private_key, public_key)` for tests (address as deployed)."""
    digest = hashlib.sha256(f"fake-starknet-account-{seed}".encode()).digest()
    private_key = int.from_bytes(digest) % (EC_ORDER - 1) + 1
    public_key = KeyPair.from_private_key(private_key).public_key
    address = compute_address(
        class_hash=ACCOUNT_CLASS_HASH, constructor_calldata=[public_key], salt=seed
    )
    return address, private_key, public_key


DEFAULT_OWNER = make_test_account(0)[0]
"""The SCT's default owner: the address of `make_test_account(0)` (not registered)."""

# -- errors ---------------------------------------------------------------------------------

_PARSE_ERROR = (-32700, "Parse error")
_INVALID_REQUEST = (-32600, "Invalid Request")
_METHOD_NOT_FOUND = (-32601, "Method not found")
_INVALID_PARAMS = (-32602, "Invalid params")
_INTERNAL_ERROR = (-32603, "Internal error")
_CONTRACT_NOT_FOUND = (20, "Contract not found")
_ENTRYPOINT_NOT_FOUND = (21, "Requested entrypoint does not exist in the contract")
_BLOCK_NOT_FOUND = (24, "Block not found")
_TXN_HASH_NOT_FOUND = (29, "Transaction hash not found")
_PAGE_SIZE_TOO_BIG = (31, "Requested page size is too big")
_INVALID_CONTINUATION_TOKEN = (33, "The supplied continuation token is invalid or unknown")
_TOO_MANY_KEYS_IN_FILTER = (34, "Too many keys provided in a filter")
_CONTRACT_ERROR = (40, "Contract error")
_TRANSACTION_EXECUTION_ERROR = (41, "Transaction execution error")
_INVALID_TRANSACTION_NONCE = (52, "Invalid transaction nonce")
_INSUFFICIENT_RESOURCES = (
    53,
    "The transaction's resources don't cover validation or the minimal transaction fee",
)
_VALIDATION_FAILURE = (55, "Account validation failed")
_NON_ACCOUNT = (58, "Sender address is not an account contract")
_DUPLICATE_TX = (59, "A transaction with the same hash already exists in the mempool")
_UNSUPPORTED_TX_VERSION = (61, "the transaction version is not supported")

_MAX_CHUNK_SIZE = 1024
_MAX_KEYS = 16


class RpcError(Exception):
    """A JSON-RPC error answer."""

    def __init__(self, error: tuple[int, str], data: Any = None) -> None:
        super().__init__(error[1])
        self.code, self.message = error
        self.data = data

    def document(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class _Revert(Exception):
    """A contract call that failed: `error` is the innermost CONTRACT_EXECUTION_ERROR text."""

    def __init__(self, error: str, address: int = 0, selector: int = 0) -> None:
        super().__init__(error)
        self.error, self.address, self.selector = error, address, selector

    @classmethod
    def panic(cls, text: str) -> _Revert:
        """A Cairo panic with a short string, printed as the sequencer prints it."""
        return cls(f"{encode_shortstring(text):#x} ('{text}')")


# -- wire parsing (strict, as a node validates its params) ----------------------------------

_FELT = re.compile(r"0x[0-9a-fA-F]{1,64}")


def _felt(value: Any, name: str, bound: int = FIELD_PRIME) -> int:
    if not isinstance(value, str) or not _FELT.fullmatch(value) or int(value, 16) >= bound:
        raise RpcError(_INVALID_PARAMS, f"{name}: {value!r} is not a felt in hex below {bound:#x}")
    return int(value, 16)


def _felts(value: Any, name: str) -> list[int]:
    if not isinstance(value, list):
        raise RpcError(_INVALID_PARAMS, f"{name}: expected a list of felts")
    return [_felt(item, f"{name}[{i}]") for i, item in enumerate(value)]


def _object(value: Any, name: str, required: Iterable[str], optional: Iterable[str] = ()):
    if not isinstance(value, dict):
        raise RpcError(_INVALID_PARAMS, f"{name}: expected an object")
    required = set(required)
    if missing := required - value.keys():
        raise RpcError(_INVALID_PARAMS, f"{name}: missing {sorted(missing)}")
    if unknown := value.keys() - required - set(optional):
        raise RpcError(_INVALID_PARAMS, f"{name}: unknown {sorted(unknown)}")
    return value


def _resource_bounds(value: Any) -> ResourceBoundsMapping:
    _object(value, "resource_bounds", ("l1_gas", "l2_gas", "l1_data_gas"))
    bounds = {}
    for resource in ("l1_gas", "l2_gas", "l1_data_gas"):
        name = f"resource_bounds.{resource}"
        item = _object(value[resource], name, ("max_amount", "max_price_per_unit"))
        bounds[resource] = ResourceBounds(
            max_amount=_felt(item["max_amount"], f"{name}.max_amount", 2**64),
            max_price_per_unit=_felt(item["max_price_per_unit"], f"{name}.price", 2**128),
        )
    return ResourceBoundsMapping(**bounds)


def _da_mode(value: Any, name: str) -> DAMode:
    if value not in ("L1", "L2"):
        raise RpcError(_INVALID_PARAMS, f"{name}: expected L1 or L2")
    return DAMode[value]


_INVOKE_FIELDS = (
    "type",
    "version",
    "signature",
    "nonce",
    "resource_bounds",
    "tip",
    "paymaster_data",
    "account_deployment_data",
    "nonce_data_availability_mode",
    "fee_data_availability_mode",
    "calldata",
    "sender_address",
)


@dataclass(frozen=True)
class _Invoke:
    """A broadcasted INVOKE_TXN_V3, parsed; `body` is its wire form."""

    version: int
    sender: int
    nonce: int
    calldata: list[int]
    signature: list[int]
    bounds: ResourceBoundsMapping
    tip: int
    body: dict[str, Any]

    @classmethod
    def parse(cls, value: Any, name: str) -> _Invoke:
        if isinstance(value, dict) and value.get("type") != "INVOKE":
            raise RpcError(_INVALID_PARAMS, f"{name}.type: the fake takes INVOKE transactions")
        _object(value, name, _INVOKE_FIELDS, ("proof_facts", "proof"))
        if value.get("proof_facts") or value.get("proof"):
            raise RpcError(_INVALID_PARAMS, f"{name}: the fake takes no proofs")
        if _felts(value["paymaster_data"], f"{name}.paymaster_data"):
            raise RpcError(_INVALID_PARAMS, f"{name}: the fake takes no paymaster data")
        if _felts(value["account_deployment_data"], f"{name}.account_deployment_data"):
            raise RpcError(_INVALID_PARAMS, f"{name}: the fake takes no account deployment")
        for mode in ("nonce_data_availability_mode", "fee_data_availability_mode"):
            if _da_mode(value[mode], f"{name}.{mode}") != DAMode.L1:
                raise RpcError(_INVALID_PARAMS, f"{name}.{mode}: only L1 is supported")
        return cls(
            version=_felt(value["version"], f"{name}.version"),
            sender=_felt(value["sender_address"], f"{name}.sender_address"),
            nonce=_felt(value["nonce"], f"{name}.nonce"),
            calldata=_felts(value["calldata"], f"{name}.calldata"),
            signature=_felts(value["signature"], f"{name}.signature"),
            bounds=_resource_bounds(value["resource_bounds"]),
            tip=_felt(value["tip"], f"{name}.tip", 2**64),
            body={k: v for k, v in value.items() if k in _INVOKE_FIELDS},
        )

    def hash(self, chain_id: int) -> int:
        common = CommonTransactionV3Fields(
            tx_prefix=TransactionHashPrefix.INVOKE,
            version=self.version,
            address=self.sender,
            tip=self.tip,
            resource_bounds=self.bounds,
            paymaster_data=[],
            chain_id=chain_id,
            nonce=self.nonce,
            nonce_data_availability_mode=DAMode.L1,
            fee_data_availability_mode=DAMode.L1,
        )
        return compute_invoke_v3_transaction_hash(
            account_deployment_data=[], calldata=self.calldata, common_fields=common
        )


DecodedCall = tuple[int, int, list[int]]
"""A call of a multicall, decoded: (to, selector, calldata)."""


def _decode_multicall(calldata: list[int]) -> list[DecodedCall]:
    """The calls of a Cairo 1 `__execute__(calls: Array<Call>)`; a _Revert when malformed."""
    bad = _Revert.panic("Failed to deserialize param #1")
    if not calldata:
        raise bad
    calls, at = [], 1
    for _ in range(calldata[0]):
        if at + 3 > len(calldata):
            raise bad
        to, selector, length = calldata[at : at + 3]
        if at + 3 + length > len(calldata):
            raise bad
        calls.append((to, selector, calldata[at + 3 : at + 3 + length]))
        at += 3 + length
    if at != len(calldata):
        raise _Revert.panic("Input too long for arguments")
    return calls


# -- chain state ----------------------------------------------------------------------------


@dataclass
class _State:
    balances: dict[int, int] = field(default_factory=dict)
    nonces: dict[int, int] = field(default_factory=dict)
    hubs: set[int] = field(default_factory=set)

    def copy(self) -> _State:
        return _State(dict(self.balances), dict(self.nonces), set(self.hubs))


@dataclass(frozen=True)
class _Event:
    block_number: int
    block_hash: int
    transaction_hash: int
    transaction_index: int
    event_index: int
    from_address: int
    keys: list[int]
    data: list[int]


_Emitted = tuple[int, list[int], list[int]]
"""An event as a contract emits it: (from_address, keys, data)."""


@dataclass
class _Tx:
    """A transaction the chain knows: waiting for its block, then included."""

    hash: int
    sender: int
    nonce: int
    calldata: list[int]
    body: dict[str, Any]
    fee: tuple[int, int, int]  # consumed l1_gas, l1_data_gas, l2_gas
    amount: int  # the fee charged, in FRI
    received_at: float
    external: bool = False  # sent by "someone else" through a helper: no nonce of ours
    block_number: int | None = None
    block_hash: int | None = None
    revert_reason: str | None = None
    events: list[_Emitted] = field(default_factory=list)


@dataclass
class _Block:
    number: int
    hash: int
    parent_hash: int
    timestamp: int
    transactions: list[int]
    state: _State
    event_count: int = 0


@dataclass
class _Failure:
    count: int
    code: int
    message: str
    data: Any
    http_status: int | None


@dataclass(frozen=True)
class SentInvoke:
    """An invoke the fake accepted (what a test reads in `transactions`)."""

    hash: int
    sender: int
    nonce: int
    calls: list[DecodedCall]
    resource_bounds: ResourceBoundsMapping
    tip: int
    lost: bool


_L2_GAS_BASE, _L2_GAS_PER_CALL = 400_000, 300_000
_L1_DATA_GAS_BASE, _L1_DATA_GAS_PER_CALL = 128, 64
_SELECTORS = {get_selector_from_name(n): n for n in ("balanceOf", "consume", "mint", "transfer")}
_EVENT = {n: get_selector_from_name(n) for n in ("Transfer", "Consume", "Mint")}
_EXECUTE = get_selector_from_name("__execute__")
_GET_PUBLIC_KEY = get_selector_from_name("get_public_key")
_U128 = 2**128


def _consumption(calldata: list[int]) -> tuple[int, int, int]:
    """(l1_gas, l1_data_gas, l2_gas) the fake charges an invoke of these calls."""
    try:
        n_calls = max(1, len(_decode_multicall(calldata)))
    except _Revert:
        n_calls = 1
    return (
        0,
        _L1_DATA_GAS_BASE + _L1_DATA_GAS_PER_CALL * n_calls,
        (_L2_GAS_BASE + _L2_GAS_PER_CALL * n_calls),
    )


def _sierra_class(abi: list[dict[str, Any]], externals: Iterable[str]) -> dict[str, Any]:
    """A minimal Sierra class (enough for `Account.cairo_version` to see Cairo 1)."""
    entry_points = [
        {"selector": hex(get_selector_from_name(n)), "function_idx": i}
        for i, n in enumerate(sorted(externals, key=get_selector_from_name))
    ]
    return {
        "sierra_program": ["0x1", "0x7", "0x0"],
        "contract_class_version": "0.1.0",
        "entry_points_by_type": {"CONSTRUCTOR": [], "EXTERNAL": entry_points, "L1_HANDLER": []},
        "abi": json.dumps(abi),
    }


_ACCOUNT_ABI = [
    {
        "type": "function",
        "name": name,
        "inputs": inputs,
        "outputs": outputs,
        "state_mutability": mutability,
    }
    for name, inputs, outputs, mutability in (
        (
            "__execute__",
            [{"name": "calls", "type": "core::array::Array::<core::starknet::account::Call>"}],
            [{"type": "core::array::Array::<core::array::Span::<core::felt252>>"}],
            "external",
        ),
        (
            "__validate__",
            [{"name": "calls", "type": "core::array::Array::<core::starknet::account::Call>"}],
            [{"type": "core::felt252"}],
            "external",
        ),
        ("get_public_key", [], [{"type": "core::felt252"}], "view"),
    )
]
_ACCOUNT_CLASS = _sierra_class(_ACCOUNT_ABI, ("__execute__", "__validate__", "get_public_key"))
_SCT_CLASS = _sierra_class(SCT_ABI, _SELECTORS.values())


# -- the HTTP server ------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TrackingHTTPServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, payload = self.server.fake.handle(body)
        self._send(status, payload)

    def do_GET(self) -> None:
        self._send(405, b'{"detail": "JSON-RPC is served on POST"}')

    def _send(self, status: int, payload: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up or the fake went down
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # FakeStarknetNode.handle logs each call


# -- the fake -------------------------------------------------------------------------------

_Method = Callable[[dict[str, Any]], Any]


class FakeStarknetNode(LoopbackService):
    """A Starknet node on `http://127.0.0.1:PORT` (`url`), with one SCT, for tests.

    All state is guarded by one lock; every method is thread-safe. Addresses are given as
    ints or hex strings.
    """

    def __init__(
        self,
        port: int = 0,
        chain_id: int = StarknetChainId.SEPOLIA,
        sct_address: int | str = DEFAULT_SCT_ADDRESS,
        owner: int | str = DEFAULT_OWNER,
        block_time: float = 0.05,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(host, port)
        self.chain_id = int(chain_id)
        self.sct_address = _address(sct_address)
        self.owner = _address(owner)
        self.block_time = block_time
        self.delay = 0.0
        """Seconds to wait before answering each request (a slow node)."""
        self.gas_prices = {
            "l1_gas": 30_000_000_000_000,
            "l1_data_gas": 100_000,
            "l2_gas": 8_000_000_000,
        }
        """Current prices in FRI of each resource (a test may raise them)."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._public_keys: dict[int, int] = {}
        self._blocks: list[_Block] = []
        self._events: list[_Event] = []
        self._txs: dict[int, _Tx] = {}
        self._queue: list[_Tx] = []
        self._sent: list[SentInvoke] = []
        self._calls_by_method: dict[str, int] = {}
        self._failures: dict[str, _Failure] = {}
        self._lose = 0
        self._paused = False
        self._producer: threading.Thread | None = None
        with self._changed:
            self._seal(time.time(), [])  # genesis
        self._methods: dict[str, tuple[_Method, tuple[str, ...], tuple[str, ...]]] = {
            "starknet_specVersion": (lambda _p: SPEC_VERSION, (), ()),
            "starknet_chainId": (lambda _p: hex(self.chain_id), (), ()),
            "starknet_blockNumber": (self._block_number, (), ()),
            "starknet_blockHashAndNumber": (self._block_hash_and_number, (), ()),
            "starknet_getNonce": (self._get_nonce, ("block_id", "contract_address"), ()),
            "starknet_call": (self._call, ("request", "block_id"), ()),
            "starknet_estimateFee": (
                self._estimate_fee,
                ("request", "simulation_flags", "block_id"),
                (),
            ),
            "starknet_addInvokeTransaction": (self._add_invoke, ("invoke_transaction",), ()),
            "starknet_getTransactionReceipt": (self._receipt, ("transaction_hash",), ()),
            "starknet_getTransactionStatus": (self._status, ("transaction_hash",), ()),
            "starknet_getTransactionByHash": (
                self._transaction,
                ("transaction_hash",),
                ("response_flags",),
            ),
            "starknet_getEvents": (self._get_events, ("filter",), ()),
            "starknet_getClassAt": (self._class_at, ("block_id", "contract_address"), ()),
            "starknet_getClassHashAt": (
                self._class_hash_at,
                ("block_id", "contract_address"),
                (),
            ),
            "starknet_getBlockWithTxHashes": (self._block_with_tx_hashes, ("block_id",), ()),
            "starknet_getBlockWithTxs": (
                self._block_with_txs,
                ("block_id",),
                ("response_flags",),
            ),
        }

    handler = _Handler
    thread_name = "fake-starknet"

    def __repr__(self) -> str:
        state = "up" if self._server else "down"
        return f"FakeStarknetNode(url={self.url!r}, block={self.block_number}, {state})"

    # -- life cycle (LoopbackService: down, up, port, url) -----------------------------------

    def start(self) -> FakeStarknetNode:
        """Listen (on `port`, or a free one when 0) and make blocks, on daemon threads."""
        super().start()
        self._producer = threading.Thread(
            target=self._produce, name=f"fake-starknet-blocks-{self._port}", daemon=True
        )
        self._producer.start()
        return self

    def stop(self) -> None:
        """Stop listening, drop open connections and stop making blocks."""
        super().stop()
        with self._changed:
            self._changed.notify_all()
        if self._producer is not None:
            self._producer.join(timeout=5)

    # -- what the test sets -------------------------------------------------------------------

    def add_account(self, address: int | str, public_key: int) -> int:
        """Deploy a Cairo 1 account (nonce 0) checking signatures with `public_key`."""
        address = _address(address)
        with self._lock:
            self._public_keys[address] = public_key
            self._blocks[-1].state.nonces.setdefault(address, 0)
        return address

    def authorise(self, hub: int | str) -> None:
        """Add `hub` to the SCT's authorised hubs (as the owner's `addHub`)."""
        with self._lock:
            self._blocks[-1].state.hubs.add(_address(hub))

    def mint(self, account: int | str, amount: int) -> int:
        """Mint as the owner, in a new block with its `Mint` event; the transaction hash."""
        return self._external("mint", self.owner, _address(account), amount)

    def transfer(self, frm: int | str, to: int | str, amount: int) -> int:
        """Transfer as `frm`, in a new block with its `Transfer` event; the transaction hash.

        ValueError when `frm` has less than `amount`.
        """
        return self._external("transfer", _address(frm), _address(to), amount)

    def fail_next(
        self,
        method: str,
        count: int = 1,
        code: int = -32603,
        message: str = "Internal error",
        data: Any = None,
        http_status: int | None = None,
    ) -> None:
        """Answer the next `count` calls of `method` ("*": any) with a JSON-RPC error.

        With `http_status`, answer that HTTP status with a text body instead (a proxy's 503).
        """
        with self._lock:
            self._failures[method] = _Failure(count, code, message, data, http_status)

    def lose_next_invoke(self, count: int = 1) -> None:
        """Accept the next `count` invokes and answer their hashes, then drop them.

        They never reach a block; status and receipt answer 29, their nonce stays free.
        """
        with self._lock:
            self._lose += count

    def pause_blocks(self) -> None:
        """Make no block until `resume_blocks` (accepted invokes stay RECEIVED)."""
        with self._lock:
            self._paused = True

    def resume_blocks(self) -> None:
        """Make blocks again (the waiting invokes go into the next one)."""
        with self._changed:
            self._paused = False
            if self.block_time <= 0 and self._queue:
                self._seal(time.time(), self._queue)
            self._changed.notify_all()

    def resource_bounds(self, n_calls: int = 1, margin: float = 2.0) -> ResourceBoundsMapping:
        """Resource bounds covering an invoke of `n_calls` calls at `margin` x today's prices."""
        _, data_gas, l2_gas = _consumption([n_calls] + [0, 0, 0] * n_calls)
        with self._lock:
            prices = dict(self.gas_prices)

        def bound(amount: int, price: int) -> ResourceBounds:
            return ResourceBounds(int(amount * margin), int(price * margin))

        return ResourceBoundsMapping(
            l1_gas=bound(0, prices["l1_gas"]),
            l1_data_gas=bound(data_gas, prices["l1_data_gas"]),
            l2_gas=bound(l2_gas, prices["l2_gas"]),
        )

    # -- what the test reads ------------------------------------------------------------------

    def balance_of(self, account: int | str) -> int:
        """The SCT balance of `account` at the latest block."""
        with self._lock:
            return self._blocks[-1].state.balances.get(_address(account), 0)

    def nonce_of(self, account: int | str) -> int:
        """The nonce of `account` at the latest block."""
        with self._lock:
            return self._blocks[-1].state.nonces.get(_address(account), 0)

    @property
    def block_number(self) -> int:
        with self._lock:
            return self._blocks[-1].number

    @property
    def invoke_count(self) -> int:
        """Invokes accepted by `starknet_addInvokeTransaction` (lost ones included)."""
        with self._lock:
            return len(self._sent)

    @property
    def transactions(self) -> list[SentInvoke]:
        """The invokes accepted, in order (calls decoded; empty when the calldata is bad)."""
        with self._lock:
            return list(self._sent)

    @property
    def calls_by_method(self) -> dict[str, int]:
        """How many requests each JSON-RPC method received (failed ones included)."""
        with self._lock:
            return dict(self._calls_by_method)

    def wait_until_included(self, timeout: float = 5.0) -> bool:
        """Wait until no accepted invoke waits for a block; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue, timeout)

    # -- serving ------------------------------------------------------------------------------

    def handle(self, body: bytes) -> tuple[int, bytes]:
        """Answer one HTTP body: `(HTTP status, JSON payload)`."""
        if self.delay:
            self._stopping.wait(self.delay)
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return 200, _dump(_answer(None, error=RpcError(_PARSE_ERROR)))
        if isinstance(document, list):
            if not document:
                return 200, _dump(_answer(None, error=RpcError(_INVALID_REQUEST)))
            answers = [self._answer(request) for request in document]
            return 200, _dump([a for a in answers if a is not None])
        failure = self._begin(document)
        if failure and failure.http_status is not None:
            return failure.http_status, b"Service Unavailable"
        answer = self._answer(document, failure, counted=True)
        return 200, b"" if answer is None else _dump(answer)

    def _begin(self, request: Any) -> _Failure | None:
        """Count a request and take the failure planned for it, if any."""
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return None
        method = request["method"]
        with self._lock:
            self._calls_by_method[method] = self._calls_by_method.get(method, 0) + 1
            for key in (method, "*"):
                failure = self._failures.get(key)
                if failure:
                    failure.count -= 1
                    if failure.count <= 0:
                        del self._failures[key]
                    return failure
        return None

    def _answer(
        self, request: Any, failure: _Failure | None = None, counted: bool = False
    ) -> dict[str, Any] | None:
        """The answer to one request; None for a notification (no `id`)."""
        if not counted:
            failure = self._begin(request)
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
            return _answer(None, error=RpcError(_INVALID_REQUEST))
        request_id, method = request.get("id"), request.get("method")
        if not isinstance(method, str):
            return _answer(request_id, error=RpcError(_INVALID_REQUEST))
        try:
            result = self._dispatch(method, request.get("params", []), failure)
        except RpcError as exc:
            logger.debug("%s -> error %s %s", method, exc.code, exc.message)
            return _answer(request_id, error=exc) if "id" in request else None
        except Exception:
            logger.exception("the fake Starknet node failed on %s", method)
            return _answer(request_id, error=RpcError(_INTERNAL_ERROR))
        logger.debug("%s -> ok", method)
        return _answer(request_id, result=result) if "id" in request else None

    def _dispatch(self, method: str, params: Any, failure: _Failure | None) -> Any:
        if failure:
            raise RpcError((failure.code, failure.message), failure.data)
        if method not in self._methods:
            raise RpcError(_METHOD_NOT_FOUND)
        handler, required, optional = self._methods[method]
        names = required + optional
        if isinstance(params, list):
            if len(params) > len(names):
                raise RpcError(_INVALID_PARAMS, f"{method} takes {len(names)} params")
            params = dict(zip(names, params, strict=False))
        return handler(_object(params, "params", required, optional))

    # -- blocks -------------------------------------------------------------------------------

    def _produce(self) -> None:
        while not self._stopping.is_set():
            with self._changed:
                self._changed.wait_for(
                    lambda: self._stopping.is_set() or (self._queue and not self._paused)
                )
                if self._stopping.is_set():
                    return
                due = self._queue[0].received_at + self.block_time
            self._stopping.wait(max(0.0, due - time.time()))
            with self._changed:
                if self._queue and not self._paused:
                    self._seal(time.time(), self._queue)

    def _seal(self, now: float, txs: list[_Tx]) -> _Block:
        """Execute `txs` in a new block (the lock held); the queue loses them."""
        parent = self._blocks[-1] if self._blocks else None
        state = parent.state.copy() if parent else _State()
        number = parent.number + 1 if parent else 0
        parent_hash = parent.hash if parent else 0
        timestamp = max(int(now), parent.timestamp if parent else 0)
        txs = list(txs)
        block_hash = poseidon_hash_many([number, parent_hash, timestamp, *(t.hash for t in txs)])
        block = _Block(number, block_hash, parent_hash, timestamp, [t.hash for t in txs], state)
        for index, tx in enumerate(txs):
            tx.events, tx.revert_reason = self._execute(state, tx.sender, tx.calldata)
            if not tx.external:
                state.nonces[tx.sender] = state.nonces.get(tx.sender, 0) + 1
            tx.block_number, tx.block_hash = number, block_hash
            for event_index, (address, keys, data) in enumerate(tx.events):
                self._events.append(
                    _Event(number, block_hash, tx.hash, index, event_index, address, keys, data)
                )
            block.event_count += len(tx.events)
        self._blocks.append(block)
        sealed = {t.hash for t in txs}
        self._queue = [t for t in self._queue if t.hash not in sealed]
        self._changed.notify_all()
        return block

    def _external(self, function: str, caller: int, account: int, amount: int) -> int:
        """Run an SCT call as if another client had sent it, alone in a new block."""
        args = [account, amount % _U128, amount // _U128]
        calldata = [1, self.sct_address, get_selector_from_name(function), len(args), *args]
        with self._changed:
            _, reason = self._execute(self._blocks[-1].state.copy(), caller, calldata)
            if reason is not None:
                raise ValueError(f"{function} would revert: {reason}")
            tx_hash = poseidon_hash_many([encode_shortstring("external"), len(self._txs), caller])
            body = _external_body(caller, calldata)
            tx = _Tx(tx_hash, caller, 0, calldata, body, (0, 0, 0), 0, time.time(), external=True)
            self._txs[tx_hash] = tx
            self._seal(time.time(), [tx])
        return tx_hash

    # -- execution ----------------------------------------------------------------------------

    def _execute(
        self, state: _State, sender: int, calldata: list[int]
    ) -> tuple[list[_Emitted], str | None]:
        """Run `__execute__` on `state` atomically: (events, None) or ([], revert reason)."""
        try:
            events = self._multicall(state, sender, calldata)
        except _Revert as exc:
            return [], _revert_reason(exc, sender)
        return events, None

    def _multicall(self, state: _State, sender: int, calldata: list[int]) -> list[_Emitted]:
        """Run the calls of `calldata` on `state`, all or none: their events, or a _Revert."""
        work = state.copy()
        events: list[_Emitted] = []
        for to, selector, data in _decode_multicall(calldata):
            if to in self._public_keys:
                raise _Revert(_entry_point_not_found(selector))
            if to != self.sct_address:
                raise _Revert(f"Requested contract address {to:#066x} is not deployed.")
            try:
                events += self._sct(work, sender, selector, data)[1]
            except _Revert as exc:
                exc.address, exc.selector = to, selector
                raise
        state.balances, state.hubs = work.balances, work.hubs
        return events

    def _sct(
        self, state: _State, caller: int, selector: int, data: list[int]
    ) -> tuple[list[int], list[_Emitted]]:
        """One SCT entry point on `state`: (its return values, its events), or a _Revert."""
        name = _SELECTORS.get(selector)
        if name is None:
            raise _Revert(_entry_point_not_found(selector))
        account = _arg_address(data, 0)
        balances = state.balances
        if name == "balanceOf":
            _arg_end(data, 1)
            balance = balances.get(account, 0)
            return [balance % _U128, balance // _U128], []
        amount = _arg_u256(data, 1)
        _arg_end(data, 3)
        amount_data = [amount % _U128, amount // _U128]
        if name == "consume":
            if caller != self.owner and caller not in state.hubs:
                raise _Revert.panic("UNAUTHORIZED")
            if balances.get(account, 0) < amount:
                raise _Revert.panic("INSUFFICIENT BALANCE")
            balances[account] = balances.get(account, 0) - amount
            return [], [(self.sct_address, [_EVENT["Consume"], account], amount_data)]
        if name == "mint":
            if caller != self.owner:
                raise _Revert.panic("UNAUTHORIZED")
            if balances.get(account, 0) + amount >= 2**256:
                raise _Revert.panic("u256_add Overflow")
            balances[account] = balances.get(account, 0) + amount
            return [], [(self.sct_address, [_EVENT["Mint"], account], amount_data)]
        if balances.get(caller, 0) < amount:  # transfer(reciepient, amount) from the caller
            raise _Revert.panic("INSUFFICIENT BALANCE")
        balances[caller] = balances.get(caller, 0) - amount
        balances[account] = balances.get(account, 0) + amount
        return [], [(self.sct_address, [_EVENT["Transfer"], caller, account], amount_data)]

    def _validate(self, tx: _Invoke, tx_hash: int) -> str | None:
        """Why the account's `__validate__` refuses `tx` (None when it accepts)."""
        public_key = self._public_keys[tx.sender]
        signature = tx.signature
        valid = (
            len(signature) == 2
            and 0 < signature[0] < 2**251
            and 0 < signature[1] < EC_ORDER
            and verify_message_signature(tx_hash, signature, public_key)
        )
        if valid:
            return None
        return _Revert.panic("Account: invalid signature").error

    # -- JSON-RPC methods ---------------------------------------------------------------------

    def _block_number(self, _params: dict[str, Any]) -> int:
        return self.block_number

    def _block_hash_and_number(self, _params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            block = self._blocks[-1]
            return {"block_hash": hex(block.hash), "block_number": block.number}

    def _block(self, block_id: Any) -> _Block | None:
        """The block `block_id` names (None: the pre-confirmed one); the lock held."""
        if block_id == "latest":
            return self._blocks[-1]
        if block_id == "pre_confirmed":
            return None
        if block_id == "l1_accepted":
            raise RpcError(_BLOCK_NOT_FOUND)
        if isinstance(block_id, dict) and block_id.keys() == {"block_number"}:
            number = block_id["block_number"]
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise RpcError(_INVALID_PARAMS, "block_id.block_number: expected an integer")
            if number >= len(self._blocks):
                raise RpcError(_BLOCK_NOT_FOUND)
            return self._blocks[number]
        if isinstance(block_id, dict) and block_id.keys() == {"block_hash"}:
            wanted = _felt(block_id["block_hash"], "block_id.block_hash")
            for block in self._blocks:
                if block.hash == wanted:
                    return block
            raise RpcError(_BLOCK_NOT_FOUND)
        raise RpcError(_INVALID_PARAMS, f"block_id: {block_id!r} is not a block id")

    def _state(self, block_id: Any) -> _State:
        block = self._block(block_id)
        return (block or self._blocks[-1]).state

    def _contract(self, address: int) -> str:
        """What is deployed at `address`: `account` or `sct`; error 20 when nothing."""
        if address == self.sct_address:
            return "sct"
        if address in self._public_keys:
            return "account"
        raise RpcError(_CONTRACT_NOT_FOUND)

    def _get_nonce(self, params: dict[str, Any]) -> str:
        address = _felt(params["contract_address"], "contract_address")
        with self._lock:
            state = self._state(params["block_id"])
            self._contract(address)
            return hex(state.nonces.get(address, 0))

    def _class_at(self, params: dict[str, Any]) -> dict[str, Any]:
        address = _felt(params["contract_address"], "contract_address")
        with self._lock:
            self._block(params["block_id"])
            kind = self._contract(address)
        return _SCT_CLASS if kind == "sct" else _ACCOUNT_CLASS

    def _class_hash_at(self, params: dict[str, Any]) -> str:
        address = _felt(params["contract_address"], "contract_address")
        with self._lock:
            self._block(params["block_id"])
            kind = self._contract(address)
        return hex(SCT_CLASS_HASH if kind == "sct" else ACCOUNT_CLASS_HASH)

    def _call(self, params: dict[str, Any]) -> list[str]:
        request = _object(
            params["request"], "request", ("contract_address", "entry_point_selector", "calldata")
        )
        address = _felt(request["contract_address"], "request.contract_address")
        selector = _felt(request["entry_point_selector"], "request.entry_point_selector")
        calldata = _felts(request["calldata"], "request.calldata")
        with self._lock:
            state = self._state(params["block_id"]).copy()
            kind = self._contract(address)
            public_key = self._public_keys.get(address)
        if kind == "account":
            if selector != _GET_PUBLIC_KEY:
                raise RpcError(_ENTRYPOINT_NOT_FOUND)
            return [hex(public_key or 0)]
        if selector not in _SELECTORS:
            raise RpcError(_ENTRYPOINT_NOT_FOUND)
        try:
            result, _ = self._sct(state, 0, selector, calldata)  # a call has no caller
        except _Revert as exc:
            error = _execution_error(address, SCT_CLASS_HASH, selector, exc.error)
            raise RpcError(_CONTRACT_ERROR, {"revert_error": error}) from None
        return [hex(v) for v in result]

    def _estimate_fee(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(params["request"], list):
            raise RpcError(_INVALID_PARAMS, "request: expected a list of transactions")
        txs = [_Invoke.parse(t, f"request[{i}]") for i, t in enumerate(params["request"])]
        flags = params["simulation_flags"]
        if not isinstance(flags, list) or not set(flags) <= {"SKIP_VALIDATE"}:
            raise RpcError(_INVALID_PARAMS, "simulation_flags: expected [] or [SKIP_VALIDATE]")
        estimates = []
        with self._lock:
            state = self._state(params["block_id"]).copy()
            prices = dict(self.gas_prices)
            for index, tx in enumerate(txs):
                if tx.version not in (3, QUERY_VERSION_BASE + 3):
                    raise RpcError(_UNSUPPORTED_TX_VERSION)
                if tx.sender == self.sct_address:
                    raise RpcError(_NON_ACCOUNT)

                def failed(error: Any, index: int = index) -> RpcError:
                    data = {"transaction_index": index, "execution_error": error}
                    return RpcError(_TRANSACTION_EXECUTION_ERROR, data)

                if tx.sender not in self._public_keys:
                    raise failed(f"Requested contract address {tx.sender:#066x} is not deployed.")
                nonce = state.nonces.get(tx.sender, 0)
                if tx.nonce < nonce:
                    raise failed(
                        f"Invalid transaction nonce of contract at address {tx.sender:#066x}."
                        f" Account nonce: {nonce:#x}; got: {tx.nonce:#x}."
                    )
                if "SKIP_VALIDATE" not in flags:
                    refusal = self._validate(tx, tx.hash(self.chain_id))
                    if refusal:
                        raise failed(_validate_error(tx.sender, refusal))
                try:
                    self._multicall(state, tx.sender, tx.calldata)
                except _Revert as exc:
                    raise failed(_nested_error(exc, tx.sender)) from None
                state.nonces[tx.sender] = nonce + 1
                estimates.append(_fee_estimate(_consumption(tx.calldata), prices, tx.tip))
        return estimates

    def _add_invoke(self, params: dict[str, Any]) -> dict[str, str]:
        tx = _Invoke.parse(params["invoke_transaction"], "invoke_transaction")
        if tx.version != 3:
            raise RpcError(_UNSUPPORTED_TX_VERSION)
        if tx.sender == self.sct_address:
            raise RpcError(_NON_ACCOUNT)
        tx_hash = tx.hash(self.chain_id)
        with self._changed:
            if tx.sender not in self._public_keys:
                raise RpcError(
                    _VALIDATION_FAILURE,
                    f"Requested contract address {tx.sender:#066x} is not deployed.",
                )
            consumed = _consumption(tx.calldata)
            self._check_bounds(tx.bounds, consumed)
            if any(t.hash == tx_hash for t in self._queue):
                raise RpcError(_DUPLICATE_TX)
            expected = self._blocks[-1].state.nonces.get(tx.sender, 0) + sum(
                1 for t in self._queue if t.sender == tx.sender
            )
            if tx.nonce != expected:
                raise RpcError(
                    _INVALID_TRANSACTION_NONCE,
                    f"Invalid transaction nonce of contract at address {tx.sender:#066x}."
                    f" Account nonce: {expected:#x}; got: {tx.nonce:#x}.",
                )
            refusal = self._validate(tx, tx_hash)
            if refusal:
                raise RpcError(_VALIDATION_FAILURE, _validate_error(tx.sender, refusal))
            lost = self._lose > 0
            self._lose -= lost
            try:
                calls = _decode_multicall(tx.calldata)
            except _Revert:
                calls = []
            self._sent.append(
                SentInvoke(tx_hash, tx.sender, tx.nonce, calls, tx.bounds, tx.tip, lost)
            )
            if not lost:
                amount = _fee_estimate(consumed, self.gas_prices, tx.tip)["overall_fee"]
                record = _Tx(
                    tx_hash,
                    tx.sender,
                    tx.nonce,
                    tx.calldata,
                    tx.body,
                    consumed,
                    int(amount, 16),
                    time.time(),
                )
                self._txs[tx_hash] = record
                self._queue.append(record)
                if self.block_time <= 0 and not self._paused:
                    self._seal(time.time(), self._queue)
                self._changed.notify_all()
        return {"transaction_hash": hex(tx_hash)}

    def _check_bounds(self, bounds: ResourceBoundsMapping, consumed: tuple[int, int, int]) -> None:
        for (resource, bound), amount in zip(
            (
                ("l1_gas", bounds.l1_gas),
                ("l1_data_gas", bounds.l1_data_gas),
                ("l2_gas", bounds.l2_gas),
            ),
            consumed,
            strict=True,
        ):
            if bound.max_amount < amount or bound.max_price_per_unit < self.gas_prices[resource]:
                raise RpcError(_INSUFFICIENT_RESOURCES)

    def _known_tx(self, params: dict[str, Any]) -> _Tx:
        """The transaction `params` names (lock held); 29 when unknown or lost."""
        tx_hash = _felt(params["transaction_hash"], "transaction_hash")
        tx = self._txs.get(tx_hash)
        if tx is None:
            raise RpcError(_TXN_HASH_NOT_FOUND)
        return tx

    def _status(self, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            tx = self._known_tx(params)
            if tx.block_number is None:
                return {"finality_status": "RECEIVED"}
            status = {"finality_status": "ACCEPTED_ON_L2", "execution_status": "SUCCEEDED"}
            if tx.revert_reason is not None:
                status.update(execution_status="REVERTED", failure_reason=tx.revert_reason)
            return status

    def _receipt(self, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            tx = self._known_tx(params)
            if tx.block_number is None:
                raise RpcError(_TXN_HASH_NOT_FOUND)
            return _receipt(tx)

    def _transaction(self, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            tx = self._known_tx(params)
            return {"transaction_hash": hex(tx.hash), **tx.body}

    def _block_header(self, block: _Block | None) -> dict[str, Any]:
        """The header of `block` (None: the pre-confirmed one); the lock held."""
        prices = {
            f"{resource}_price": {
                "price_in_fri": hex(price),
                "price_in_wei": hex(max(1, price // 4000)),
            }
            for resource, price in self.gas_prices.items()
        }
        common = {
            "sequencer_address": hex(
                0x1176A1BD84444C89232EC27754698E5D2E7E1A7F1539F12027F28B23EC9F3D8
            ),
            **prices,
            "l1_da_mode": "BLOB",
            "starknet_version": "0.14.0",
        }
        if block is None:
            latest = self._blocks[-1]
            return {"block_number": latest.number + 1, "timestamp": int(time.time()), **common}
        return {
            "status": "ACCEPTED_ON_L2",
            "block_hash": hex(block.hash),
            "parent_hash": hex(block.parent_hash),
            "block_number": block.number,
            "new_root": hex(poseidon_hash_many([block.hash, 1])),
            "timestamp": block.timestamp,
            **common,
            "event_commitment": "0x0",
            "transaction_commitment": "0x0",
            "receipt_commitment": "0x0",
            "state_diff_commitment": "0x0",
            "event_count": block.event_count,
            "transaction_count": len(block.transactions),
            "state_diff_length": len(block.transactions),
        }

    def _block_with_tx_hashes(self, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            block = self._block(params["block_id"])
            hashes = [hex(h) for h in block.transactions] if block else []
            return {**self._block_header(block), "transactions": hashes}

    def _block_with_txs(self, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            block = self._block(params["block_id"])
            txs = [
                {"transaction_hash": hex(h), **self._txs[h].body}
                for h in (block.transactions if block else [])
            ]
            return {**self._block_header(block), "transactions": txs}

    def _get_events(self, params: dict[str, Any]) -> dict[str, Any]:
        spec = _object(
            params["filter"],
            "filter",
            ("chunk_size",),
            ("from_block", "to_block", "address", "keys", "continuation_token"),
        )
        chunk_size = spec["chunk_size"]
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise RpcError(_INVALID_PARAMS, "filter.chunk_size: expected a positive integer")
        if chunk_size > _MAX_CHUNK_SIZE:
            raise RpcError(_PAGE_SIZE_TOO_BIG)
        addresses = spec.get("address")
        if addresses is not None:
            many = addresses if isinstance(addresses, list) else [addresses]
            addresses = {_felt(a, "filter.address") for a in many}
        keys = spec.get("keys") or []
        if not isinstance(keys, list) or not all(isinstance(k, list) for k in keys):
            raise RpcError(_INVALID_PARAMS, "filter.keys: expected a list of lists of felts")
        if len(keys) > _MAX_KEYS:
            raise RpcError(_TOO_MANY_KEYS_IN_FILTER)
        wanted = [{_felt(k, "filter.keys") for k in position} for position in keys]
        token = spec.get("continuation_token")
        start = 0
        if token is not None:
            if not isinstance(token, str) or not token.isdigit():
                raise RpcError(_INVALID_CONTINUATION_TOKEN)
            start = int(token)
        with self._lock:
            if start > len(self._events):
                raise RpcError(_INVALID_CONTINUATION_TOKEN)
            low = self._block_bound(spec.get("from_block", {"block_number": 0}))
            high = self._block_bound(spec.get("to_block", "pre_confirmed"))
            found, next_token = [], None
            for index in range(start, len(self._events)):
                event = self._events[index]
                if not low <= event.block_number <= high or not _matches(event, addresses, wanted):
                    continue
                if len(found) == chunk_size:
                    next_token = str(index)
                    break
                found.append(_emitted(event))
        answer: dict[str, Any] = {"events": found}
        if next_token is not None:
            answer["continuation_token"] = next_token
        return answer

    def _block_bound(self, block_id: Any) -> int:
        block = self._block(block_id)
        return block.number if block else self._blocks[-1].number + 1


# -- answers --------------------------------------------------------------------------------


def _address(value: int | str) -> int:
    number = int(value, 16) if isinstance(value, str) else int(value)
    if not 0 <= number < 2**251:
        raise ValueError(f"{value!r} is not a Starknet address")
    return number


def _dump(document: Any) -> bytes:
    return json.dumps(document).encode()


def _answer(request_id: Any, result: Any = None, error: RpcError | None = None) -> dict[str, Any]:
    if error is not None:
        return {"jsonrpc": "2.0", "id": request_id, "error": error.document()}
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _arg_address(data: list[int], at: int) -> int:
    if len(data) <= at or data[at] >= 2**251:
        raise _Revert.panic(f"Failed to deserialize param #{at + 1}")
    return data[at]


def _arg_u256(data: list[int], at: int) -> int:
    if len(data) < at + 2 or data[at] >= _U128 or data[at + 1] >= _U128:
        raise _Revert.panic("Failed to deserialize param #2")
    return data[at] + data[at + 1] * _U128


def _arg_end(data: list[int], length: int) -> None:
    if len(data) > length:
        raise _Revert.panic("Input too long for arguments")


def _entry_point_not_found(selector: int) -> str:
    return f"Entry point EntryPointSelector({selector:#x}) not found in contract."


def _execution_error(address: int, class_hash: int, selector: int, error: Any) -> dict[str, Any]:
    return {
        "contract_address": hex(address),
        "class_hash": hex(class_hash),
        "selector": hex(selector),
        "error": error,
    }


def _nested_error(exc: _Revert, sender: int) -> dict[str, Any]:
    """CONTRACT_EXECUTION_ERROR of a reverted multicall: the account's call, then the callee's."""
    inner: Any = f"Execution failed. Failure reason:\n{exc.error}."
    if exc.address:
        inner = _execution_error(exc.address, SCT_CLASS_HASH, exc.selector, inner)
    return _execution_error(sender, ACCOUNT_CLASS_HASH, _EXECUTE, inner)


def _validate_error(sender: int, reason: str) -> dict[str, Any]:
    validate = get_selector_from_name("__validate__")
    return _execution_error(
        sender, ACCOUNT_CLASS_HASH, validate, f"Execution failed. Failure reason:\n{reason}."
    )


def _revert_reason(exc: _Revert, sender: int) -> str:
    """A receipt's `revert_reason`, written as the sequencer writes it."""
    lines = [
        "Transaction execution has failed:",
        f"0: Error in the called contract (contract address: {sender:#066x}, class hash: "
        f"{ACCOUNT_CLASS_HASH:#066x}, selector: {_EXECUTE:#066x}):",
    ]
    if exc.address:
        lines.append(
            f"1: Error in the called contract (contract address: {exc.address:#066x}, class hash: "
            f"{SCT_CLASS_HASH:#066x}, selector: {exc.selector:#066x}):"
        )
    lines.append(f"Execution failed. Failure reason:\n{exc.error}.")
    return "\n".join(lines) + "\n"


def _fee_estimate(
    consumed: tuple[int, int, int], prices: dict[str, int], tip: int
) -> dict[str, Any]:
    l1_gas, l1_data_gas, l2_gas = consumed
    overall = (
        l1_gas * prices["l1_gas"]
        + l1_data_gas * prices["l1_data_gas"]
        + l2_gas * (prices["l2_gas"] + tip)
    )
    return {
        "l1_gas_consumed": hex(l1_gas),
        "l1_gas_price": hex(prices["l1_gas"]),
        "l2_gas_consumed": hex(l2_gas),
        "l2_gas_price": hex(prices["l2_gas"]),
        "l1_data_gas_consumed": hex(l1_data_gas),
        "l1_data_gas_price": hex(prices["l1_data_gas"]),
        "overall_fee": hex(overall),
        "unit": "FRI",
    }


def _receipt(tx: _Tx) -> dict[str, Any]:
    l1_gas, l1_data_gas, l2_gas = tx.fee
    receipt = {
        "type": "INVOKE",
        "transaction_hash": hex(tx.hash),
        "actual_fee": {"amount": hex(tx.amount), "unit": "FRI"},
        "execution_status": "SUCCEEDED" if tx.revert_reason is None else "REVERTED",
        "finality_status": "ACCEPTED_ON_L2",
        "block_hash": hex(tx.block_hash or 0),
        "block_number": tx.block_number,
        "messages_sent": [],
        "events": [
            {"from_address": hex(a), "keys": [hex(k) for k in keys], "data": [hex(d) for d in data]}
            for a, keys, data in tx.events
        ],
        "execution_resources": {"l1_gas": l1_gas, "l1_data_gas": l1_data_gas, "l2_gas": l2_gas},
    }
    if tx.revert_reason is not None:
        receipt["revert_reason"] = tx.revert_reason
    return receipt


def _matches(event: _Event, addresses: set[int] | None, keys: list[set[int]]) -> bool:
    if addresses is not None and event.from_address not in addresses:
        return False
    if len(keys) > len(event.keys):
        return False
    return all(
        not allowed or key in allowed for allowed, key in zip(keys, event.keys, strict=False)
    )


def _emitted(event: _Event) -> dict[str, Any]:
    return {
        "from_address": hex(event.from_address),
        "keys": [hex(k) for k in event.keys],
        "data": [hex(d) for d in event.data],
        "block_hash": hex(event.block_hash),
        "block_number": event.block_number,
        "transaction_hash": hex(event.transaction_hash),
        "transaction_index": event.transaction_index,
        "event_index": event.event_index,
    }


def _external_body(caller: int, calldata: list[int]) -> dict[str, Any]:
    """The wire form of an invoke sent by someone else (for getBlockWithTxs)."""
    zero = {"max_amount": "0x0", "max_price_per_unit": "0x0"}
    return {
        "type": "INVOKE",
        "version": "0x3",
        "signature": [],
        "nonce": "0x0",
        "resource_bounds": {"l1_gas": zero, "l2_gas": zero, "l1_data_gas": zero},
        "tip": "0x0",
        "paymaster_data": [],
        "account_deployment_data": [],
        "nonce_data_availability_mode": "L1",
        "fee_data_availability_mode": "L1",
        "calldata": [hex(v) for v in calldata],
        "sender_address": hex(caller),
    }
