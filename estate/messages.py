"""Every message the actors exchange: frozen attrs classes, nothing mutable.

Commands are in the imperative (`StoreReading`), events in the past tense
(`BoardSaidHello`). pykka does not copy messages, so none holds a mutable value.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

import attrs

from estate.device_wire import BoardReading, Instruction
from estate.types import CentralId, DeviceId, DevicePk

# -- values -------------------------------------------------------------------------------


@attrs.frozen
class AckToken:
    """Names one inbound MQTT message to acknowledge, on one connection of the client."""

    generation: int
    mid: int


@attrs.frozen
class DeviceRecord:
    """A known board as the database has it, with what its actor resumes from."""

    pk: DevicePk
    device_id: DeviceId
    connection_type: str
    central_id: CentralId | None = None
    account_address: str | None = None
    status: str = "offline"
    load_on: bool | None = None
    balance: int = 0
    energy_total_wh: float = 0.0
    boot: int = 0
    last_seq: int | None = None
    last_reading_at: datetime | None = None
    last_power: float = 0.0
    load_cut_off: bool = False
    """The gateway switched the load off for want of tokens (prepaid cut-off)."""
    charge_wh: float = 0.0
    """Energy consumed and not yet charged: less than one token's worth."""


def frozen_mapping(items: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """A read-only copy of `items`, safe to put in a message."""
    return MappingProxyType(dict(items))


# -- MQTT connection ----------------------------------------------------------------------


@attrs.frozen
class MqttMessageReceived:
    """Paho's message as the MqttConnection's own value (made on paho's thread)."""

    topic: str
    payload: bytes
    qos: int
    dup: bool
    received_at: datetime
    ack: AckToken | None


@attrs.frozen
class MqttConnected:
    generation: int
    session_present: bool


@attrs.frozen
class MqttDisconnected:
    generation: int
    reason: str


@attrs.frozen
class PublishMessage:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@attrs.frozen
class AckMessages:
    """Acknowledge these inbound messages to the broker (their data is committed)."""

    tokens: tuple[AckToken, ...]


@attrs.frozen
class Reconnect:
    """Re-open the broker connection, so that unacknowledged messages come again."""


@attrs.frozen
class PeersChanged:
    """The current refs of the actors this one talks to, by role (`mqtt`, `db`, ...)."""

    peers: Mapping[str, Any] = attrs.field(converter=frozen_mapping)


@attrs.frozen
class RoutesChanged:
    """The boards the MqttConnection routes to, by device id (a read-only mapping)."""

    routes: Mapping[DeviceId, Any] = attrs.field(converter=frozen_mapping)


# -- boards -> device actors --------------------------------------------------------------


@attrs.frozen
class BoardSaidHello:
    device_id: DeviceId
    at: datetime


@attrs.frozen
class BoardSentReading:
    device_id: DeviceId
    reading: BoardReading
    digest: str
    dup: bool
    received_at: datetime
    ack: AckToken | None


@attrs.frozen
class BoardStatusChanged:
    device_id: DeviceId
    online: bool
    at: datetime


@attrs.frozen
class SendInstruction:
    """Send `instruction` to the board now (from the central, the REPL, a test)."""

    instruction: Instruction
    reason: str


@attrs.frozen
class Tick:
    """Time passes: check keep-alives and silence."""


@attrs.frozen
class GetDeviceState:
    """Ask a DeviceActor for a snapshot of its state (a dict of plain values)."""


# -- device actors -> database ------------------------------------------------------------


@attrs.frozen
class StoreReading:
    device_pk: DevicePk
    boot: int
    seq: int | None
    digest: str
    ts: datetime
    received_at: datetime
    voltage: float
    current: float
    power: float
    energy_wh: float
    load_on: bool | None
    current_1: float | None
    voltage_1: float | None
    ack: AckToken | None = attrs.field(default=None, eq=False)

    def row(self) -> dict[str, Any]:
        """The column values of this reading."""
        values = attrs.asdict(self, recurse=False)
        del values["ack"]
        return values


@attrs.frozen
class RecordCommand:
    device_pk: DevicePk
    at: datetime
    balance: int
    instruction: int
    reason: str


@attrs.frozen
class RecordDeviceState:
    device_pk: DevicePk
    status: str
    load_on: bool | None
    at: datetime


@attrs.frozen
class FlushDue:
    """The DbWriter's timer: write what waits if it has waited long enough."""


@attrs.frozen
class LoadDevices:
    """Ask the DbWriter to tell `reply_to` the known devices as DevicesLoaded.

    Devices in `running` have an actor already: their resume state is not looked up.
    """

    reply_to: Any
    running: frozenset[str] = frozenset()


@attrs.frozen
class DevicesLoaded:
    devices: tuple[DeviceRecord, ...]
    synced: bool = False
    """Loaded right after a sync with the central."""


@attrs.frozen
class ProbeDatabase:
    """Ask the DbWriter to run a tiny transaction now: answers (ok, reason)."""


# -- supervision --------------------------------------------------------------------------


@attrs.frozen
class ActorFailed:
    name: str
    reason: str


@attrs.frozen
class RestartActor:
    name: str


@attrs.frozen
class ReloadDevices:
    """Reload the known devices from the database and start/stop actors to match."""


@attrs.frozen
class ActorInfo:
    """One running actor as the Supervisor knows it."""

    name: str
    kind: str
    ref: Any
    restarts: int


@attrs.frozen
class GetActors:
    """Ask the Supervisor for every actor it runs (a tuple of ActorInfo)."""


@attrs.frozen
class GetStats:
    """Ask an actor for its counters (a dict of plain values)."""


# -- health -------------------------------------------------------------------------------


@attrs.frozen
class GetHealthAddress:
    """Ask the HealthServer where it listens: "host:port" (None when disabled)."""


# -- simulated boards ---------------------------------------------------------------------


@attrs.frozen
class SimTick:
    """A simulated board's clock: send hello or a reading, check the command timeout."""


@attrs.frozen
class SimCommandArrived:
    payload: bytes
    at: float


@attrs.frozen
class SimConnected:
    """The simulated board's MQTT connection is up."""


@attrs.frozen
class SimPublishAcked:
    mid: int


@attrs.frozen
class PressBalanceKey:
    """The owner presses the balance key: set the board's `update` flag."""


@attrs.frozen
class SetLoad:
    """Switch the load relay by hand."""

    on: bool


@attrs.frozen
class PauseReadings:
    """Stop (or resume) sending readings, as if the board were unplugged."""

    paused: bool


@attrs.frozen
class GetBoardState:
    """Ask a simulated board for its state (a dict of plain values)."""


@attrs.frozen
class GetRecorded:
    """Ask a Recorder for every message it received, in order."""


# -- central backend ----------------------------------------------------------------------


@attrs.frozen
class ApplyCentralDevices:
    """Make the database's devices match the central's list, then tell `reply_to` the
    known devices as DevicesLoaded."""

    devices: tuple[Any, ...]
    reply_to: Any


@attrs.frozen
class SyncNow:
    """Sync the devices with the central now (on demand)."""


@attrs.frozen
class CentralTick:
    """The CentralApi's clock: due syncs and retries."""


@attrs.frozen
class DeviceActivityChanged:
    """A board completed the handshake (active) or went offline (inactive)."""

    device_id: DeviceId
    active: bool


@attrs.frozen
class ClaimRelayBatch:
    """Ask the DbWriter for the next batch of readings to relay: it tells `reply_to`
    RelayBatchReady, or RelayOutboxIdle when no batch is due."""

    max_size: int
    max_age: float
    reply_to: Any


@attrs.frozen
class RelayBatchReady:
    batch: Any
    """An `estate.central_wire.ReadingsBatch` (frozen)."""


@attrs.frozen
class RelayOutboxIdle:
    """No batch is due yet."""


@attrs.frozen
class MarkRelayed:
    """The central accepted this batch."""

    batch_id: str


@attrs.frozen
class PruneRelayed:
    """Delete readings the central accepted more than `retention_days` ago."""

    retention_days: float


@attrs.frozen
class GetOutboxState:
    """Ask the DbWriter how many readings the central does not have yet (an OutboxState)."""


@attrs.frozen
class NotifyShutdown:
    """Tell the central the gateway is going down (`POST /shutdown`); answers True if done."""


# -- uplink (the central's broker) --------------------------------------------------------


@attrs.frozen
class CentralRoutesChanged:
    """The device actors the UplinkConnection routes to, by CENTRAL id (read-only mapping)."""

    routes: Mapping[CentralId, Any] = attrs.field(converter=frozen_mapping)


@attrs.frozen
class StartPowerStream:
    """Publish the board's power to the central about every 3 s (until stopped or offline)."""


@attrs.frozen
class StopPowerStream:
    """End the board's live power stream."""


@attrs.frozen
class MqttSubscribed:
    """The broker answered a SUBSCRIBE (SUBACK): whether every filter was granted."""

    generation: int
    granted: bool


# -- tokens (Starknet) --------------------------------------------------------------------


@attrs.frozen
class BalanceChanged:
    """The SCT balance of the board's owner as just read on chain, and why it was read.

    `reason`: `sync` (start, device sync), `event` (a Transfer, Consume or Mint touched
    the account), `update` (the board's balance key), `consumed` (a consumption of this
    board was accepted, in `tx_hash`).
    """

    balance: int
    reason: str
    tx_hash: str | None = None


@attrs.frozen
class RefreshBalance:
    """A DeviceActor asks the StarknetSigner to read its owner's balance now."""

    device_id: DeviceId


@attrs.frozen
class BalanceRefreshFailed:
    """The StarknetSigner could not read the balance a DeviceActor asked for."""

    reason: str


@attrs.frozen
class RecordCutOff:
    """The gateway switched a board's load off for want of tokens (or ended that)."""

    device_pk: DevicePk
    cut_off: bool


@attrs.frozen
class TokenAccount:
    """A board whose owner's balance the StarknetSigner follows, with its actor."""

    device_id: DeviceId
    device_pk: DevicePk
    account_address: str
    ref: Any


@attrs.frozen
class AccountsChanged:
    """The boards with an owner account (from the Supervisor after each device load)."""

    accounts: tuple[TokenAccount, ...]


@attrs.frozen
class LedgerChanged:
    """The DbWriter committed new pending consumptions."""


@attrs.frozen
class SignerTick:
    """The StarknetSigner's clock: batch windows, receipts, event polling."""


@attrs.frozen
class NotifyConsumption:
    """Tell the central (`POST /token_consumption`) that a board's tokens were consumed.

    Once the central has it, the CentralApi tells the DbWriter MarkNotified(entry_ids).
    """

    device_id: DeviceId
    tx_hash: str
    balance: int
    entry_ids: tuple[int, ...] = ()


# -- the ledger (StarknetSigner -> DbWriter; asked, with a timeout) ------------------------


@attrs.frozen
class GetPendingLedger:
    """The oldest pending ledger entries (a tuple of `estate.db.ledger.LedgerEntry`),
    but those of `skip_accounts`."""

    limit: int = 10_000
    skip_accounts: frozenset[str] = frozenset()


@attrs.frozen
class GetSubmissions:
    """`sender`'s nonces not settled yet (a tuple of `estate.db.ledger.Submission`)."""

    sender: str


@attrs.frozen
class RecordSubmission:
    """Commit a signed transaction and its entries' `submitted` state (before sending it)."""

    sender: str
    tx_hash: str
    nonce: int
    payload: str
    entry_ids: tuple[int, ...]


@attrs.frozen
class RecordReplacement:
    """Commit a transaction signed anew, same nonce and calls, for one the node lost."""

    sender: str
    tx_hash: str
    nonce: int
    payload: str


@attrs.frozen
class SettleNonce:
    """Settle a nonce: `tx_hash` `accepted` or `reverted`, or `dropped`; answers its entries."""

    sender: str
    nonce: int
    outcome: str
    tx_hash: str | None = None
    block_number: int | None = None
    reason: str | None = None


@attrs.frozen
class GetUnnotified:
    """Entries accepted before `settled_before` the central was not told of (LedgerEntry)."""

    settled_before: datetime
    limit: int = 1000


@attrs.frozen
class MarkNotified:
    """The central has these entries' consumption."""

    entry_ids: tuple[int, ...]


@attrs.frozen
class RejectLedgerEntries:
    """The contract refuses these entries alone, for good."""

    entry_ids: tuple[int, ...]
    reason: str


@attrs.frozen
class RecordBalances:
    """Store on-chain balances, by normalised account address, on the devices they own."""

    balances: Mapping[str, int] = attrs.field(converter=frozen_mapping)


@attrs.frozen
class GetChainCursor:
    """The last block whose events were processed (int or None)."""

    name: str


@attrs.frozen
class SetChainCursor:
    name: str
    block_number: int


@attrs.frozen
class GetLedgerSummary:
    """Entries and tokens by ledger state (a dict)."""
