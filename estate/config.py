"""Gateway configuration: environment variables (and an optional `.env`) -> frozen `Settings`.

Every setting is one attrs field whose metadata names its variable, its aliases and
how a value is parsed and checked. cattrs structures the variables into `Settings`
with one converter; every wrong value is reported, one line each, naming the
variable, the value and what is expected. Secrets never appear in a repr.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override
from dotenv import dotenv_values

__all__ = ["ConfigError", "Settings", "load_settings", "mask_url"]


class ConfigError(ValueError):
    """One or more settings are wrong; `str()` is one line per wrong variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- parsers: str -> value, raising ValueError("expected ...") -----------------------------


def _text(raw: str) -> str:
    return raw.strip()


def _topic_name(raw: str) -> str:
    value = raw.strip()
    if not value or re.search(r"[/+#\s]", value):
        raise ValueError("expected a non-empty name without '/', '+', '#' or spaces")
    return value


def _number(kind: type, low: float, high: float) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ValueError(f"expected {kind.__name__} between {low} and {high}") from None
        if not (low <= value <= high) or (kind is float and not math.isfinite(value)):
            raise ValueError(f"expected {kind.__name__} between {low} and {high}")
        return value

    return parse


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        try:
            parts = urlsplit(value)
        except ValueError:  # e.g. "Invalid IPv6 URL" for a stray '[' in a password
            raise ValueError(f"expected a URL like {schemes[0]}://host[:port]") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"expected a URL like {schemes[0]}://host[:port]")
        try:
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            raise ValueError("expected a port number between 1 and 65535") from None
        return value.rstrip("/")

    return parse


def _database_url(raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^(sqlite|postgres|postgresql)(\+\w+)?://", value):
        raise ValueError("expected sqlite:///PATH or postgresql://user@host/db")
    return value


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _host_port(raw: str) -> str | None:
    value = raw.strip()
    if value.lower() == "off":
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("expected host:port (e.g. 127.0.0.1:9480) or off")
    return value


def _existing_file(raw: str) -> str:
    value = raw.strip()
    if not Path(value).is_file():
        raise ValueError("expected the path of a readable file")
    return value


def _felt(raw: str) -> str:
    value = raw.strip().lower()
    if not re.fullmatch(r"0x[0-9a-f]{1,64}", value):
        raise ValueError("expected a hex felt such as 0x04a1...")
    return "0x" + value[2:].rjust(64, "0")


def _setting(
    env: str,
    parse: Callable[[str], Any],
    default: Any,
    *aliases: str,
    secret: bool = False,
    doc: str = "",
) -> Any:
    return attrs.field(
        default=default,
        repr=(lambda v: "'***'" if v else repr(v)) if secret else mask_url_repr,
        metadata={"env": env, "parse": parse, "aliases": aliases, "secret": secret, "doc": doc},
    )


_USERINFO_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def mask_url(url: str | None) -> str | None:
    """`url` with any password replaced by `***`, for logs and reprs.

    Works on the raw text, up to the last `@`: a password holding `/`, `?` or `#`
    (which SQLAlchemy accepts unencoded) is hidden too.
    """
    if not url or "@" not in url:
        return url
    return _USERINFO_PASSWORD.sub(r"\1***@", url, count=1)


def mask_url_repr(value: Any) -> str:
    return repr(mask_url(value)) if isinstance(value, str) else repr(value)


@attrs.frozen
class Settings:
    """Everything the gateway can be told; see README "Configuration" for each variable."""

    hub_name: str = _setting("HUB_NAME", _topic_name, "estate", doc="hub name used in topics")
    database_url: str = _setting(
        "DATABASE_URL", _database_url, "sqlite:///estate.db", doc="SQLAlchemy URL"
    )
    db_auto_migrate: bool = _setting(
        "DB_AUTO_MIGRATE", _flag, True, doc="apply migrations when `estate run` starts"
    )
    db_batch_max: int = _setting(
        "DB_BATCH_MAX", _number(int, 1, 100_000), 1000, doc="readings per transaction at most"
    )
    db_flush_interval: float = _setting(
        "DB_FLUSH_INTERVAL", _number(float, 0.001, 10.0), 0.05, doc="seconds a reading may wait"
    )
    mqtt_url: str | None = _setting(
        "MQTT_URL", _url("mqtt", "mqtts"), None, doc="boards' broker; unset: embedded broker"
    )
    mqtt_client_id: str | None = _setting(
        "MQTT_CLIENT_ID", _topic_name, None, doc="fixed client id; default estate-gateway-HUB"
    )
    mqtt_protocol: str = _setting(
        "MQTT_PROTOCOL", _choice("5", "3.1.1"), "5", doc="MQTT version to the boards' broker"
    )
    mqtt_ca_file: str | None = _setting(
        "MQTT_CA_FILE", _existing_file, None, doc="CA bundle for mqtts://"
    )
    mqtt_cert_file: str | None = _setting(
        "MQTT_CERT_FILE", _existing_file, None, doc="client certificate for mqtts://"
    )
    mqtt_key_file: str | None = _setting(
        "MQTT_KEY_FILE", _existing_file, None, doc="client key for mqtts://"
    )
    mqtt_tls_insecure: bool = _setting(
        "MQTT_TLS_INSECURE", _flag, False, doc="skip the broker's host name check"
    )
    mqtt_receive_maximum: int = _setting(
        "MQTT_RECEIVE_MAXIMUM",
        _number(int, 1, 65535),
        2000,
        doc="unacknowledged readings the broker may send (MQTT 5)",
    )
    mqtt_keepalive: int = _setting(
        "MQTT_KEEPALIVE", _number(int, 5, 3600), 30, doc="MQTT keep-alive seconds"
    )
    mqtt_session_expiry: int = _setting(
        "MQTT_SESSION_EXPIRY",
        _number(int, 0, 2**32 - 1),
        7 * 86400,
        doc="seconds the broker keeps the session while the gateway is away (MQTT 5)",
    )
    embedded_mqtt_port: int = _setting(
        "EMBEDDED_MQTT_PORT", _number(int, 0, 65535), 11883, doc="port of the embedded broker"
    )
    uplink_mqtt_url: str | None = _setting(
        "UPLINK_MQTT_URL", _url("mqtt", "mqtts"), None, doc="central's broker; default MQTT_URL"
    )
    uplink_mqtt_ca_file: str | None = _setting(
        "UPLINK_MQTT_CA_FILE", _existing_file, None, doc="CA bundle for an mqtts:// uplink"
    )
    uplink_mqtt_cert_file: str | None = _setting(
        "UPLINK_MQTT_CERT_FILE", _existing_file, None, doc="client certificate for the uplink"
    )
    uplink_mqtt_key_file: str | None = _setting(
        "UPLINK_MQTT_KEY_FILE", _existing_file, None, doc="client key for the uplink"
    )
    uplink_mqtt_tls_insecure: bool = _setting(
        "UPLINK_MQTT_TLS_INSECURE", _flag, False, doc="skip the uplink broker's host name check"
    )
    central_url: str | None = _setting(
        "CENTRAL_URL", _url("http", "https"), None, "BACKEND_URL", doc="central base URL"
    )
    central_api_key: str | None = _setting(
        "CENTRAL_API_KEY", _text, None, "BACKEND_KEY", secret=True, doc="the hub's API key"
    )
    relay_batch_max: int = _setting(
        "RELAY_BATCH_MAX", _number(int, 1, 10_000), 500, doc="readings per relayed batch"
    )
    relay_batch_age: float = _setting(
        "RELAY_BATCH_AGE",
        _number(float, 0.0, 3600.0),
        5.0,
        doc="seconds the oldest reading may wait before a smaller batch is relayed",
    )
    relay_retention_days: float = _setting(
        "RELAY_RETENTION_DAYS",
        _number(float, 0.01, 36500.0),
        30.0,
        doc="days relayed readings are kept locally",
    )
    central_sync_interval: float = _setting(
        "CENTRAL_SYNC_INTERVAL",
        _number(float, 5.0, 86400.0),
        600.0,
        doc="seconds between two device syncs with the central",
    )
    starknet_rpc_url: str | None = _setting(
        "STARKNET_RPC_URL", _url("http", "https"), None, doc="JSON-RPC; unset: tokens off"
    )
    starknet_account_address: str | None = _setting(
        "STARKNET_ACCOUNT_ADDRESS", _felt, None, doc="the gateway's account"
    )
    starknet_private_key: str | None = _setting(
        "STARKNET_PRIVATE_KEY", _felt, None, secret=True, doc="the account's private key"
    )
    starknet_private_key_file: str | None = _setting(
        "STARKNET_PRIVATE_KEY_FILE", _existing_file, None, doc="file holding the private key"
    )
    sct_contract_address: str | None = _setting(
        "SCT_CONTRACT_ADDRESS", _felt, None, doc="the SCT token contract"
    )
    starknet_chain: str = _setting(
        "STARKNET_CHAIN", _choice("SN_SEPOLIA", "SN_MAIN"), "SN_SEPOLIA", doc="chain id"
    )
    wh_per_token: float = _setting(
        "WH_PER_TOKEN", _number(float, 0.001, 1e9), 1000.0, doc="Wh a consumer uses per SCT"
    )
    starknet_batch_window: float = _setting(
        "STARKNET_BATCH_WINDOW",
        _number(float, 0.0, 3600.0),
        5.0,
        doc="seconds pending consumes gather before one multicall",
    )
    starknet_batch_max_calls: int = _setting(
        "STARKNET_BATCH_MAX_CALLS",
        _number(int, 1, 1000),
        100,
        doc="consume calls (accounts) in one multicall at most",
    )
    starknet_fee_margin: float = _setting(
        "STARKNET_FEE_MARGIN",
        _number(float, 1.0, 10.0),
        1.5,
        doc="factor on the estimated gas amounts and prices of a transaction",
    )
    starknet_balance_concurrency: int = _setting(
        "STARKNET_BALANCE_CONCURRENCY",
        _number(int, 1, 64),
        8,
        doc="balanceOf calls in flight at once",
    )
    starknet_event_poll_interval: float = _setting(
        "STARKNET_EVENT_POLL_INTERVAL",
        _number(float, 0.1, 3600.0),
        10.0,
        doc="seconds between two reads of SCT's Transfer, Consume and Mint events",
    )
    starknet_timeout: float = _setting(
        "STARKNET_TIMEOUT", _number(float, 0.5, 300.0), 20.0, doc="seconds an RPC call may take"
    )
    prepaid_cutoff: bool = _setting(
        "PREPAID_CUTOFF",
        _flag,
        True,
        doc="switch a consumer's load off while its balance is 0, back on once above",
    )
    keepalive_interval: float = _setting(
        "KEEPALIVE_INTERVAL", _number(float, 0.5, 9.0), 5.0, doc="seconds between keep-alives"
    )
    offline_after: float = _setting(
        "OFFLINE_AFTER", _number(float, 1.0, 3600.0), 10.0, doc="silence that marks offline"
    )
    integration_max_gap: float = _setting(
        "INTEGRATION_MAX_GAP",
        _number(float, 0.1, 3600.0),
        5.0,
        doc="longest gap between readings whose energy is integrated",
    )
    log_level: str = _setting(
        "LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", doc="log level"
    )
    log_format: str = _setting(
        "LOG_FORMAT", _choice("text", "json"), "text", doc="human-readable text or JSON lines"
    )
    health_address: str | None = _setting(
        "HEALTH_ADDRESS",
        _host_port,
        "127.0.0.1:9480",
        doc="host:port of /healthz and /metrics; 'off' disables",
    )
    repl_socket: str | None = _setting(
        "REPL_SOCKET",
        _text,
        None,
        doc="Unix socket of the REPL (mode 0600); default RUNTIME_DIR/estate-HUB.sock; 'off'",
    )
    repl_tcp: str | None = _setting(
        "REPL_TCP", _host_port, None, doc="host:port of a TCP REPL (needs REPL_TOKEN)"
    )
    repl_token: str | None = _setting(
        "REPL_TOKEN", _text, None, secret=True, doc="token a TCP REPL client must send first"
    )
    repl_allow_remote: bool = _setting(
        "REPL_ALLOW_REMOTE", _flag, False, doc="allow REPL_TCP on a non-loopback address"
    )

    @property
    def tokens_enabled(self) -> bool:
        """Token accounting is on (STARKNET_RPC_URL and its companions are set)."""
        return self.starknet_rpc_url is not None

    @property
    def client_id(self) -> str:
        return self.mqtt_client_id or f"estate-gateway-{self.hub_name}"

    @property
    def repl_socket_path(self) -> str | None:
        """Where the REPL's Unix socket lives (None: no Unix socket REPL)."""
        if self.repl_socket is not None:
            return None if self.repl_socket.lower() == "off" else self.repl_socket
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/estate-{os.getuid()}"
        return str(Path(runtime) / f"estate-{self.hub_name}.sock")

    @classmethod
    def variables(cls) -> list[attrs.Attribute]:
        return list(attrs.fields(cls))


def _legacy_uplink(env: Mapping[str, str]) -> str | None:
    """The original backend's MQTT_BROKER/PORT/USERNAME/PASSWORD as one mqtts:// URL."""
    host = env.get("MQTT_BROKER", "").strip()
    if not host:
        return None
    port = env.get("MQTT_PORT", "8883").strip() or "8883"
    user = env.get("MQTT_USERNAME", "").strip()
    password = env.get("MQTT_PASSWORD", "").strip()
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user else ""
    return f"mqtts://{auth}{host}:{port}"


def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    overrides = {
        field.name: override(struct_hook=lambda raw, _t, parse=field.metadata["parse"]: parse(raw))
        for field in attrs.fields(Settings)
    }
    converter.register_structure_hook(
        Settings, make_dict_structure_fn(Settings, converter, **overrides)
    )
    return converter


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Read `environ` (default `os.environ`) over the optional `.env` file.

    The environment wins over the file, for a setting's name and its aliases alike; an
    empty value counts as unset. Raises ConfigError naming every wrong variable, its
    value and what is expected.
    """
    process = os.environ if environ is None else environ
    layers: list[Mapping[str, str]] = [{k: v for k, v in process.items() if v.strip()}]
    if env_file is not None and Path(env_file).is_file():
        layers.append({k: v for k, v in dotenv_values(env_file).items() if v and v.strip()})

    raw: dict[str, str] = {}
    source: dict[str, str] = {}
    for field in attrs.fields(Settings):
        names = (field.metadata["env"], *field.metadata["aliases"])
        found = next(((n, layer[n]) for layer in layers for n in names if n in layer), None)
        if found is not None:
            source[field.name], raw[field.name] = found
    merged = {k: v for layer in reversed(layers) for k, v in layer.items()}
    if "uplink_mqtt_url" not in raw and (legacy := _legacy_uplink(merged)):
        raw["uplink_mqtt_url"] = legacy
        source["uplink_mqtt_url"] = "MQTT_BROKER/MQTT_PORT/MQTT_USERNAME/MQTT_PASSWORD"
    if raw.get("starknet_private_key_file") and "starknet_private_key" not in raw:
        key_path = Path(raw["starknet_private_key_file"].strip())
        try:
            if key_path.is_file():
                raw["starknet_private_key"] = key_path.read_text().strip()
                source["starknet_private_key"] = "STARKNET_PRIVATE_KEY_FILE"
        except OSError as exc:
            raise ConfigError(
                [f"STARKNET_PRIVATE_KEY_FILE={str(key_path)!r}: cannot read it ({exc.strerror})"]
            ) from None

    try:
        settings = _converter().structure(raw, Settings)
    except cattrs.ClassValidationError as exc:
        raise ConfigError(_describe(exc, raw, source)) from None
    if problems := _cross_checks(settings):
        raise ConfigError(problems)
    return settings


def _cross_checks(settings: Settings) -> list[str]:
    """Rules that involve several variables."""
    problems = []
    if settings.starknet_rpc_url is not None:
        needed = {
            "STARKNET_ACCOUNT_ADDRESS": settings.starknet_account_address,
            "STARKNET_PRIVATE_KEY (or STARKNET_PRIVATE_KEY_FILE)": settings.starknet_private_key,
            "SCT_CONTRACT_ADDRESS": settings.sct_contract_address,
        }
        problems.extend(
            f"STARKNET_RPC_URL={settings.starknet_rpc_url!r}: token accounting also needs {name}"
            for name, value in needed.items()
            if not value
        )
    if settings.central_url is not None and not settings.central_api_key:
        problems.append(
            f"CENTRAL_URL={settings.central_url!r}: the central needs CENTRAL_API_KEY "
            "(or BACKEND_KEY), the hub's API key"
        )
    if settings.repl_tcp is not None:
        host = settings.repl_tcp.rpartition(":")[0].strip("[]")
        if not settings.repl_token:
            problems.append(
                f"REPL_TCP={settings.repl_tcp!r}: a TCP REPL needs REPL_TOKEN "
                "(a long random secret)"
            )
        if host not in LOOPBACK and not settings.repl_allow_remote:
            problems.append(
                f"REPL_TCP={settings.repl_tcp!r}: not a loopback address; set "
                "REPL_ALLOW_REMOTE=true (with REPL_TOKEN) to accept it"
            )
    return problems


def _describe(
    exc: cattrs.ClassValidationError, raw: dict[str, str], source: dict[str, str]
) -> list[str]:
    secrets = {f.name for f in attrs.fields(Settings) if f.metadata["secret"]}
    with_notes, others = exc.group_exceptions()
    problems = []
    for error, note in with_notes:
        value = "***" if note.name in secrets else mask_url(raw.get(note.name))
        problems.append(f"{source.get(note.name, note.name.upper())}={value!r}: {error}")
    problems.extend(f"configuration: {error}" for error in others)
    return problems
