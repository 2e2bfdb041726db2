"""The Solaris Conexus Token (SCT) contract: its ABI, written from PROTOCOL section 4.

The ABI is in Cairo 1's "v2" form (an interface, its impl, the events), so that
starknet-py serialises calls and decodes results and events from it, never by hand.
"""

from __future__ import annotations

from typing import Any

from starknet_py.hash.selector import get_selector_from_name

__all__ = [
    "EVENT_NAMES",
    "EVENT_SELECTORS",
    "SCT_ABI",
    "SCT_DECIMALS",
    "normalise_address",
]

SCT_DECIMALS = 0
"""The token has no decimals: a balance is a whole number of SCT."""

_ADDRESS = "core::starknet::contract_address::ContractAddress"
_U256 = "core::integer::u256"


def _function(name: str, inputs: list[tuple[str, str]], outputs: list[str], mutability: str):
    return {
        "type": "function",
        "name": name,
        "inputs": [{"name": n, "type": t} for n, t in inputs],
        "outputs": [{"type": t} for t in outputs],
        "state_mutability": mutability,
    }


def _event(name: str, keys: list[tuple[str, str]], data: list[tuple[str, str]]):
    return {
        "type": "event",
        "name": f"sct::SCT::{name}",
        "kind": "struct",
        "members": [{"name": n, "type": t, "kind": "key"} for n, t in keys]
        + [{"name": n, "type": t, "kind": "data"} for n, t in data],
    }


SCT_ABI: list[dict[str, Any]] = [
    {
        "type": "impl",
        "name": "SCTImpl",
        "interface_name": "sct::ISCT",
    },
    {
        "type": "struct",
        "name": _U256,
        "members": [
            {"name": "low", "type": "core::integer::u128"},
            {"name": "high", "type": "core::integer::u128"},
        ],
    },
    {
        "type": "interface",
        "name": "sct::ISCT",
        "items": [
            _function("balanceOf", [("account", _ADDRESS)], [_U256], "view"),
            _function("consume", [("account", _ADDRESS), ("amount", _U256)], [], "external"),
            _function("mint", [("account", _ADDRESS), ("amount", _U256)], [], "external"),
            # (sic) the deployed contract spells its parameter so
            _function("transfer", [("reciepient", _ADDRESS), ("amount", _U256)], [], "external"),
        ],
    },
    _event("Transfer", [("from", _ADDRESS), ("to", _ADDRESS)], [("amount", _U256)]),
    _event("Consume", [("account", _ADDRESS)], [("amount", _U256)]),
    _event("Mint", [("account", _ADDRESS)], [("amount", _U256)]),
    {
        "type": "event",
        "name": "sct::SCT::Event",
        "kind": "enum",
        "variants": [
            {"name": name, "type": f"sct::SCT::{name}", "kind": "nested"}
            for name in ("Transfer", "Consume", "Mint")
        ],
    },
]

EVENT_NAMES = ("Transfer", "Consume", "Mint")
EVENT_SELECTORS: dict[int, str] = {get_selector_from_name(n): n for n in EVENT_NAMES}
"""An event's first key is the selector of its name."""


def normalise_address(address: str | int) -> str:
    """An account address as PROTOCOL compares them: lower case, `0x` and 64 hex digits.

    Raise ValueError naming the value if it is not a felt in hex (or an int).
    """
    if isinstance(address, int):
        value = address
    else:
        text = address.strip().lower()
        if not text.startswith("0x") or len(text) < 3 or len(text) > 66:
            raise ValueError(f"{address!r} is not a Starknet address (0x and up to 64 hex digits)")
        try:
            value = int(text, 16)
        except ValueError:
            raise ValueError(
                f"{address!r} is not a Starknet address (0x and up to 64 hex digits)"
            ) from None
    if not 0 <= value < 2**251:
        raise ValueError(f"{address!r} is out of the range of a Starknet address")
    return f"0x{value:064x}"
