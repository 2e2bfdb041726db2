"""A faithful fake of the central backend's hub API (PROTOCOL section 2), for tests and demos.

A real HTTP/1.1 server (keep-alive, as uvicorn) on loopback, on a daemon thread. It
answers as the FastAPI central does: `{"detail": "..."}` errors, FastAPI-style 422
lists (`{"detail": [{"type", "loc", "msg", "input"}]}`) for bad bodies, request
bodies validated strictly and independently of `estate.central_wire` (so that it
checks the gateway's wire module rather than agreeing with it by construction).

Where the contract is silent, it does what the real central (FastAPI, pydantic
models with `extra = "forbid"`) does or would do:

- `/connect` without `api_key` -> 422; wrong key -> 401 `Invalid API key`.
- No `Authorization: Bearer` header -> 403 `Not authenticated` (FastAPI's HTTPBearer);
  a bad, revoked or expired token -> 401 `Invalid or expired token`. Auth is checked
  before the body (FastAPI resolves dependencies first).
- Strings must be strings, integers integers (no `"41"` for 41, no `true` for 1):
  stricter than pydantic's lax mode on purpose, to catch the gateway's mistakes.
  `device_id` 1..50 characters, `tx_hash` 5..100 (the central's constraints).
- An unknown `device_id` on activate/deactivate/token_consumption -> 404
  `Device H999 not found` (HTTPException(404), as the central answers an unknown hub).
- `/readings`: `ts` must be ISO 8601 with a UTC offset; readings of devices the fake
  does not know are accepted. The same `batch_id` again stores nothing and answers
  200; the same `batch_id` with different readings -> 409.
- Unknown path -> 404 `Not Found`; known path, wrong method -> 405.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs

from estate.loopback_http import LoopbackService, TrackingHTTPServer

__all__ = ["FakeCentral"]

logger = logging.getLogger(__name__)

_Answer = tuple[int, Any]
_Error = dict[str, Any]


# -- HS256 JWT ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _numeric_date(value: float) -> int | float:
    return int(value) if value == int(value) else round(value, 3)


def _sign(secret: bytes, claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def _verify(secret: bytes, token: str) -> dict[str, Any] | None:
    """The claims of a token signed with `secret`, None when forged or malformed."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    expected = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(expected, _unb64(parts[2])):
            return None
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        return None
    return claims if isinstance(claims, dict) else None


# -- request body validation (pydantic-like, strict) -----------------------------------------

_Check = Callable[[Any, list[Any], list[_Error]], None]


def _error(kind: str, loc: list[Any], msg: str, value: Any) -> _Error:
    return {"type": kind, "loc": ["body", *loc], "msg": msg, "input": value}


def _string(low: int, high: int) -> _Check:
    def check(value: Any, loc: list[Any], errors: list[_Error]) -> None:
        if not isinstance(value, str):
            errors.append(_error("string_type", loc, "Input should be a valid string", value))
        elif not low <= len(value) <= high:
            msg = f"String should have between {low} and {high} characters"
            errors.append(_error("string_length", loc, msg, value))

    return check


def _integer(value: Any, loc: list[Any], errors: list[_Error]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(_error("int_type", loc, "Input should be a valid integer", value))


def _number(value: Any, loc: list[Any], errors: list[_Error]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors.append(_error("float_type", loc, "Input should be a valid number", value))
    elif not math.isfinite(value):
        errors.append(_error("finite_number", loc, "Input should be a finite number", value))


def _utc_timestamp(value: Any, loc: list[Any], errors: list[_Error]) -> None:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
        msg = "Input should be an ISO 8601 datetime in UTC"
        errors.append(_error("datetime_parsing", loc, msg, value))


def _object(fields: Mapping[str, _Check]) -> _Check:
    def check(value: Any, loc: list[Any], errors: list[_Error]) -> None:
        if not isinstance(value, dict):
            errors.append(_error("model_type", loc, "Input should be an object", value))
            return
        for name, field_check in fields.items():
            if name not in value:
                errors.append(_error("missing", [*loc, name], "Field required", None))
            else:
                field_check(value[name], [*loc, name], errors)
        for name in value.keys() - fields.keys():
            msg = "Extra inputs are not permitted"
            errors.append(_error("extra_forbidden", [*loc, name], msg, value[name]))

    return check


def _list_of(item: _Check) -> _Check:
    def check(value: Any, loc: list[Any], errors: list[_Error]) -> None:
        if not isinstance(value, list):
            errors.append(_error("list_type", loc, "Input should be a valid list", value))
            return
        for index, element in enumerate(value):
            item(element, [*loc, index], errors)

    return check


_DEVICE = _object({"device_id": _string(1, 50)})
_BODIES: dict[str, _Check] = {
    "activate_device": _DEVICE,
    "deactivate_device": _DEVICE,
    "token_consumption": _object(
        {"device_id": _string(1, 50), "tx_hash": _string(5, 100), "balance": _integer}
    ),
    "readings": _object(
        {
            "batch_id": _string(1, 100),
            "readings": _list_of(
                _object(
                    {
                        "device_id": _string(1, 50),
                        "ts": _utc_timestamp,
                        "voltage": _number,
                        "current": _number,
                        "power": _number,
                        "energy_wh": _number,
                    }
                )
            ),
        }
    ),
}
_ROUTES = {
    "connect": "POST",
    "sync_devices": "GET",
    "activate_device": "POST",
    "deactivate_device": "POST",
    "token_consumption": "POST",
    "shutdown": "POST",
    "readings": "POST",
}


# -- the HTTP server -------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn
    server: TrackingHTTPServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, document = self.server.fake.handle(method, self.path, self.headers, body)
        payload = json.dumps(document).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout) or the fake went down
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # FakeCentral.handle logs each request, without the query (the API key)


# -- the fake --------------------------------------------------------------------------------


class FakeCentral(LoopbackService):
    """The central's hub API on `http://127.0.0.1:PORT` (`url`), with switches for tests.

    State a test reads: `calls` ((path, body) of every request answered 200, in order),
    `requests` ((method, path, status) of every request), `readings` (stored once per
    batch), `active` (device ids marked active). All guarded by one lock.
    """

    def __init__(
        self,
        api_key: str = "test-api-key",
        hub: str = "estate",
        token_ttl: float = 3600.0,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(host, port)
        self.api_key = api_key
        self.hub = hub
        self.token_ttl = token_ttl
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self._devices: dict[str, dict[str, Any]] = {}
        self._active: set[str] = set()
        self._batches: dict[str, list[dict[str, Any]]] = {}
        self._readings: list[dict[str, Any]] = []
        self._calls: list[tuple[str, Any]] = []
        self._requests: list[tuple[str, str, int]] = []
        self._failure: tuple[int, str, int | None] | None = None
        self._delay = 0.0
        self._readings_endpoint = True

    handler = _Handler
    thread_name = "fake-central"

    def __repr__(self) -> str:
        state = "up" if self._server else "down"
        return f"FakeCentral(url={self.url!r}, hub={self.hub!r}, {state})"

    # -- life cycle (LoopbackService: start, stop, down, up, port) ---------------------------

    @property
    def url(self) -> str:
        """The base URL to give the gateway as CENTRAL_URL (without `/hubs`)."""
        return f"http://{self._host}:{self._port}"

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since the last `start` or `up` (keep-alive reuses them)."""
        server = self._server
        return server.accepted if server else 0

    # -- what the test sets ---------------------------------------------------------------------

    def set_devices(self, devices: Iterable[Mapping[str, Any] | Any]) -> None:
        """The hub's devices, as `sync_devices` returns them (attrs instances or dicts).

        Dicts are returned exactly as given, so a test can make the answer malformed.
        """
        table = {}
        for device in devices:
            document = dict(device) if isinstance(device, Mapping) else attrs.asdict(device)
            table[str(document.get("device_id"))] = document
        with self._lock:
            self._devices = table
            self._active &= table.keys()

    def issue_token(self, ttl: float | None = None) -> str:
        """A token as `/connect` would issue it now (tests may craft expired ones)."""
        now = time.time()
        claims = {
            "sub": self.hub,
            "iat": _numeric_date(now),
            "exp": _numeric_date(now + (self.token_ttl if ttl is None else ttl)),
        }
        return _sign(self._secret, claims)

    def revoke_tokens(self) -> None:
        """Every token issued so far becomes invalid (the next call gets a 401)."""
        with self._lock:
            self._secret = secrets.token_bytes(32)

    def fail_with(self, status: int | None, detail: str = "", times: int | None = None) -> None:
        """Answer every request (`times` requests, or until reset) with `status`; None resets."""
        with self._lock:
            if status is None:
                self._failure = None
            else:
                self._failure = (status, detail or f"Simulated failure {status}", times)

    def slow(self, seconds: float) -> None:
        """Wait `seconds` before answering each request; 0 resets."""
        self._delay = max(0.0, seconds)

    def set_readings_endpoint(self, present: bool) -> None:
        """Whether `/hubs/readings` exists; without it the fake answers 404 as a FastAPI app."""
        self._readings_endpoint = present

    # -- what the test reads --------------------------------------------------------------------

    @property
    def calls(self) -> list[tuple[str, Any]]:
        with self._lock:
            return list(self._calls)

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return list(self._requests)

    @property
    def readings(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._readings)

    @property
    def active(self) -> set[str]:
        with self._lock:
            return set(self._active)

    def calls_to(self, path: str) -> list[Any]:
        """The bodies of the successful calls to `path` (`activate_device`, `/hubs/...`)."""
        wanted = path if path.startswith("/") else f"/hubs/{path}"
        return [body for called, body in self.calls if called == wanted]

    # -- serving --------------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
    ) -> _Answer:
        """Answer one request: `(status, JSON document)`."""
        if self._delay:
            self._stopping.wait(self._delay)
        parts = urlsplit(raw_path)
        path = parts.path
        status, document, recorded = self._route(method, path, parts.query, headers, body)
        with self._lock:
            self._requests.append((method, path, status))
            if status == 200:
                self._calls.append((path, recorded))
        logger.info("%s %s -> %s", method, path, status)
        return status, document

    def _take_failure(self) -> tuple[int, str] | None:
        with self._lock:
            if self._failure is None:
                return None
            status, detail, times = self._failure
            if times is not None:
                self._failure = None if times <= 1 else (status, detail, times - 1)
            return status, detail

    def _route(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any, Any]:
        failure = self._take_failure()
        if failure:
            return failure[0], {"detail": failure[1]}, None
        prefix, _, name = path.rpartition("/")
        if prefix != "/hubs" or name not in _ROUTES:
            return 404, {"detail": "Not Found"}, None
        if name == "readings" and not self._readings_endpoint:
            return 404, {"detail": "Not Found"}, None
        if method != _ROUTES[name]:
            return 405, {"detail": "Method Not Allowed"}, None
        if name == "connect":
            return (*self._connect(parse_qs(query).get("api_key")), None)
        refusal = self._authorise(headers.get("Authorization"))
        if refusal:
            return (*refusal, None)
        if name == "sync_devices":
            with self._lock:
                data = list(self._devices.values())
            return 200, {"success": True, "data": data}, None
        if name == "shutdown":
            with self._lock:
                self._active.clear()
            return 200, {"success": True, "message": "All devices marked inactive"}, None
        document, errors = self._body(name, body)
        if errors:
            return 422, {"detail": errors}, None
        if name == "readings":
            return (*self._store_readings(document), document)
        return (*self._device_call(name, document), document)

    def _connect(self, keys: list[str] | None) -> _Answer:
        if not keys:
            missing = {"type": "missing", "loc": ["query", "api_key"], "msg": "Field required"}
            return 422, {"detail": [{**missing, "input": None}]}
        if not hmac.compare_digest(keys[0].encode(), self.api_key.encode()):
            return 401, {"detail": "Invalid API key"}
        return 200, {"access_token": self.issue_token(), "token_type": "bearer"}

    def _authorise(self, header: str | None) -> _Answer | None:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 403, {"detail": "Not authenticated"}
        with self._lock:
            secret = self._secret
        claims = _verify(secret, token.strip())
        exp = claims.get("exp") if claims else None
        if (
            claims is None
            or claims.get("sub") != self.hub
            or not isinstance(exp, int | float)
            or exp <= time.time()
        ):
            return 401, {"detail": "Invalid or expired token"}
        return None

    @staticmethod
    def _body(name: str, body: bytes) -> tuple[Any, list[_Error]]:
        if not body:
            return None, [_error("missing", [], "Field required", None)]
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, [_error("json_invalid", [], "JSON decode error", str(exc))]
        errors: list[_Error] = []
        _BODIES[name](document, [], errors)
        return document, errors

    def _device_call(self, name: str, document: dict[str, Any]) -> _Answer:
        device_id = document["device_id"]
        with self._lock:
            if device_id not in self._devices:
                return 404, {"detail": f"Device {device_id} not found"}
            if name == "activate_device":
                self._active.add(device_id)
                message = f"Device {device_id} activated"
            elif name == "deactivate_device":
                self._active.discard(device_id)
                message = f"Device {device_id} deactivated"
            else:
                message = f"Token consumption recorded for {device_id}"
        return 200, {"success": True, "message": message}

    def _store_readings(self, document: dict[str, Any]) -> _Answer:
        batch_id, readings = document["batch_id"], document["readings"]
        with self._lock:
            stored = self._batches.get(batch_id)
            if stored is None:
                self._batches[batch_id] = readings
                self._readings.extend(readings)
                return 200, {"success": True, "message": f"{len(readings)} readings stored"}
        if stored != readings:
            return 409, {"detail": f"batch {batch_id} was already stored with other readings"}
        return 200, {"success": True, "message": f"batch {batch_id} already stored"}
