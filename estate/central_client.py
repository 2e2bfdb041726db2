"""A blocking client of the central backend's HTTP API (PROTOCOL section 2).

A plain class, no threads of its own (an actor wraps it): one `requests.Session`, so
connections are reused. Every call makes sure the token is fresh (it is renewed a
minute before the JWT's `exp`); a 401 on a call connects again and retries that call
once. Failures are exceptions:

- `CentralUnavailable`: connection refused, DNS failure, timeout, 408, 429, 5xx. Retry later.
- `CentralNotFound` (a `CentralRejected`): 404, e.g. `/readings` not deployed yet.
- `CentralRejected`: any other 4xx (or a 401 again after reconnecting), with `detail`.
- `CentralProtocolError`: a 2xx whose body does not follow the contract.

The API key (sent in the URL of `/connect`, as the contract wants) and the token never
appear in a log line, an exception message or a repr: exceptions are built from
redacted text and raised without chaining requests' own exception (whose message holds
the URL), and urllib3's debug log of request lines is redacted.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests

from estate.central_wire import (
    ActivateRequest,
    CentralDevice,
    CentralError,
    CentralProtocolError,
    DeactivateRequest,
    ReadingsBatch,
    Result,
    SyncDevicesAnswer,
    Token,
    TokenConsumptionRequest,
    jwt_claims,
    structure_answer,
    unstructure_request,
)
from estate.config import mask_url
from estate.types import DeviceId

__all__ = [
    "CentralClient",
    "CentralError",
    "CentralNotFound",
    "CentralProtocolError",
    "CentralRejected",
    "CentralUnavailable",
]

logger = logging.getLogger(__name__)

REFRESH_MARGIN = 60.0
"""Seconds before the token's expiry at which it is renewed (at most half its lifetime)."""

_T = TypeVar("_T")
_API_KEY_IN_URL = re.compile(r"(api_key=)[^&\s'\"#]*")


def redact_api_key(text: str) -> str:
    """`text` with any `api_key=...` query value replaced by `***`."""
    return _API_KEY_IN_URL.sub(r"\1***", text)


class _RedactApiKeyFilter(logging.Filter):
    """urllib3 logs request lines (`"POST /hubs/connect?api_key=... HTTP/1.1" 200`) at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "api_key=" in message:
            record.msg, record.args = redact_api_key(message), ()
        return True


_URLLIB3_FILTER = _RedactApiKeyFilter()


def _install_log_redaction() -> None:
    pool_logger = logging.getLogger("urllib3.connectionpool")
    if _URLLIB3_FILTER not in pool_logger.filters:
        pool_logger.addFilter(_URLLIB3_FILTER)


class CentralUnavailable(CentralError):
    """The central could not be reached or failed (timeout, refused, 5xx): retry later."""

    def __init__(self, call: str, message: str, status: int | None = None) -> None:
        super().__init__(call, message)
        self.status = status


class CentralRejected(CentralError):
    """The central refused the call (4xx); `detail` is its explanation. Retrying won't help."""

    def __init__(self, call: str, status: int, detail: str) -> None:
        super().__init__(call, f"rejected with HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class CentralNotFound(CentralRejected):
    """HTTP 404: an unknown device, or an endpoint the central does not have (yet)."""


class CentralClient:
    """The central's HTTP API for one hub. Not thread-safe: one caller (an actor) at a time.

    `base_url` is `CENTRAL_URL` (without `/hubs`); `timeout` is requests' (connect, read)
    in seconds; `clock` gives epoch seconds (tests inject one to age the token).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float | tuple[float, float] = (3.05, 10),
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not api_key:
            raise ValueError("CentralClient needs the hub's API key (CENTRAL_API_KEY)")
        self._base = base_url.rstrip("/")
        self._hubs = f"{self._base}/hubs"
        self._api_key = api_key
        self._timeout = timeout
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at: float | None = None
        _install_log_redaction()

    def __repr__(self) -> str:
        return f"CentralClient(base_url={mask_url(self._base)!r}, connected={self.connected})"

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the client holds a token it believes valid."""
        return self._token is not None and self._clock() < self._refresh_at

    @property
    def token_expires_at(self) -> float | None:
        """When the current token expires, on `clock`'s scale (None: unknown or no token)."""
        return self._expires_at if self._token is not None else None

    def close(self) -> None:
        """Forget the token and close the session (if the client created it)."""
        self._token = None
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> CentralClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """`POST /hubs/connect?api_key=KEY`: get a fresh token."""
        self._token = None
        now = self._clock()
        response = self._send("connect", "POST", "connect", params={"api_key": self._api_key})
        token = self._answer("connect", response, Token)
        self._token = token.access_token
        lifetime = self._lifetime(token.access_token, now)
        if lifetime is None:
            self._expires_at = None
            self._refresh_at = float("inf")  # rely on the central's 401 to renew
        else:
            self._expires_at = now + lifetime
            self._refresh_at = now + lifetime - min(REFRESH_MARGIN, lifetime / 2)
        logger.info(
            "connected to the central at %s (token valid %s)",
            mask_url(self._base),
            "until the central refuses it" if lifetime is None else f"{lifetime:.0f} s",
        )

    @staticmethod
    def _lifetime(token: str, now: float) -> float | None:
        """The token's lifetime from `exp - iat` (immune to clock skew), else `exp - now`."""
        try:
            claims = jwt_claims(token)
        except ValueError as exc:
            logger.warning("the central's token is not a readable JWT (%s)", exc)
            return None
        exp, iat = claims.get("exp"), claims.get("iat")
        if not _is_number(exp):
            logger.warning("the central's token has no numeric exp claim")
            return None
        lifetime = exp - iat if _is_number(iat) else exp - now
        return max(0.0, float(lifetime))

    # -- the calls ----------------------------------------------------------------------------

    def sync_devices(self) -> tuple[CentralDevice, ...]:
        """`GET /hubs/sync_devices`: the hub's devices as the central knows them."""
        answer = self._call("sync_devices", "GET", "sync_devices", None, SyncDevicesAnswer)
        if not answer.success:
            raise CentralRejected("sync_devices", 200, "the central answered success: false")
        return answer.data

    def activate_device(self, device_id: str) -> Result:
        """`POST /hubs/activate_device`: the board connected."""
        body = ActivateRequest(DeviceId(device_id))
        return self._result("activate_device", body)

    def deactivate_device(self, device_id: str) -> Result:
        """`POST /hubs/deactivate_device`: the board disconnected."""
        body = DeactivateRequest(DeviceId(device_id))
        return self._result("deactivate_device", body)

    def token_consumption(self, device_id: str, tx_hash: str, balance: int) -> Result:
        """`POST /hubs/token_consumption`: tokens were consumed on chain; `balance` is the new."""
        body = TokenConsumptionRequest(DeviceId(device_id), tx_hash, balance)
        return self._result("token_consumption", body)

    def relay_readings(self, batch: ReadingsBatch) -> Result:
        """`POST /hubs/readings` (*new*): CentralNotFound when the central lacks the endpoint."""
        return self._result("readings", batch)

    def shutdown(self) -> Result:
        """`POST /hubs/shutdown`: the central marks all the hub's devices inactive."""
        return self._result("shutdown", None)

    # -- plumbing -----------------------------------------------------------------------------

    def _result(self, call: str, body: object | None) -> Result:
        result = self._call(call, "POST", call, body, Result)
        if not result.success:
            raise CentralRejected(
                call, 200, result.message or "the central answered success: false"
            )
        return result

    def _call(self, call: str, method: str, path: str, body: object | None, cls: type[_T]) -> _T:
        payload = None if body is None else unstructure_request(body)
        if not self.connected:
            self.connect()
        response = self._send(call, method, path, payload=payload, auth=True)
        if response.status_code == 401:
            logger.info("central %s: the token was refused; connecting again", call)
            self.connect()
            response = self._send(call, method, path, payload=payload, auth=True)
        return self._answer(call, response, cls)

    def _send(
        self,
        call: str,
        method: str,
        path: str,
        *,
        payload: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        auth: bool = False,
    ) -> requests.Response:
        headers = {"Accept": "application/json"}
        if auth and self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        failure: CentralError
        try:
            response = self._session.request(
                method,
                f"{self._hubs}/{path}",
                params=params,
                json=payload,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            limits = f"timeout (connect, read) {self._timeout} s"
            failure = CentralUnavailable(call, f"timed out, {limits}: {self._describe(exc)}")
        except requests.ConnectionError as exc:
            failure = CentralUnavailable(
                call, f"cannot reach {self._where()}: {self._describe(exc)}"
            )
        except requests.RequestException as exc:
            failure = CentralError(call, f"request failed: {self._describe(exc)}")
        else:
            logger.debug("central %s: HTTP %s", call, response.status_code)
            return response
        # Raised here, outside the except blocks, so that requests' exception (whose
        # message holds the URL, with the API key on /connect) is not chained.
        raise failure

    def _answer(self, call: str, response: requests.Response, cls: type[_T]) -> _T:
        status = response.status_code
        if 200 <= status < 300:
            try:
                document = response.json()
            except ValueError:
                raise CentralProtocolError(
                    call, [f"$: not JSON: {self._scrub(response.text[:120])!r}"]
                ) from None
            return structure_answer(call, document, cls)
        detail = self._detail(response)
        if status == 404:
            raise CentralNotFound(call, status, detail)
        if status in (408, 429) or status >= 500:
            raise CentralUnavailable(call, f"HTTP {status}: {detail}", status)
        raise CentralRejected(call, status, detail)

    def _detail(self, response: requests.Response) -> str:
        """The `detail` of an error answer, FastAPI's validation list included, redacted."""
        try:
            document = response.json()
        except ValueError:
            document = None
        detail = document.get("detail") if isinstance(document, dict) else None
        if isinstance(detail, str):
            text = detail
        elif isinstance(detail, list):  # FastAPI 422: [{"loc": [...], "msg": ...}, ...]
            text = "; ".join(
                f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg', item)}"
                if isinstance(item, dict)
                else str(item)
                for item in detail
            )
        elif detail is not None:
            text = str(detail)
        else:
            text = response.text.strip()[:200] or response.reason or "no detail"
        return self._scrub(text[:500])

    def _scrub(self, text: str) -> str:
        text = redact_api_key(text).replace(self._api_key, "***")
        return text.replace(self._token, "***") if self._token else text

    def _describe(self, exc: BaseException) -> str:
        """requests' message shortened to its cause, without the URL's secrets."""
        text = str(exc)
        for pattern in (r"\[Errno -?\d+\][^'\")]*", r"[Rr]ead timed out[^'\")]*", r"timed out"):
            found = re.search(pattern, text)
            if found:
                return self._scrub(found.group(0).rstrip(". "))
        return self._scrub(text)[:300]

    def _where(self) -> str:
        return str(mask_url(self._base))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
