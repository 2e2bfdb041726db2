"""Broker endpoints and configured paho clients (no actors here)."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from estate.config import mask_url

__all__ = ["BrokerEndpoint", "connect_properties", "make_client"]


@attrs.frozen
class BrokerEndpoint:
    """Where and how to reach one broker."""

    url: str = attrs.field(repr=mask_url)
    client_id: str
    protocol: str = "5"
    keepalive: int = 30
    receive_maximum: int = 2000
    session_expiry: int = 7 * 86400
    persistent: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def username(self) -> str | None:
        user = urlsplit(self.url).username
        return unquote(user) if user else None

    @property
    def password(self) -> str | None:
        password = urlsplit(self.url).password
        return unquote(password) if password else None


def make_client(endpoint: BrokerEndpoint, manual_ack: bool = False) -> mqtt.Client:
    """A paho client for `endpoint` (not yet connected)."""
    v5 = endpoint.protocol == "5"
    kwargs: dict[str, Any] = {}
    if not v5:
        kwargs["clean_session"] = not endpoint.persistent
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=endpoint.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=manual_ack,
        **kwargs,
    )
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.tls:
        client.tls_set(
            ca_certs=endpoint.ca_file,
            certfile=endpoint.cert_file,
            keyfile=endpoint.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(endpoint.tls_insecure)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def connect_properties(endpoint: BrokerEndpoint) -> Properties | None:
    """MQTT 5 CONNECT properties: the session's expiry and the in-flight window we accept."""
    if endpoint.protocol != "5":
        return None
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = endpoint.session_expiry if endpoint.persistent else 0
    properties.ReceiveMaximum = endpoint.receive_maximum
    return properties


def connect_async(client: mqtt.Client, endpoint: BrokerEndpoint) -> None:
    """Start connecting in the background (paho's loop retries with backoff)."""
    v5 = endpoint.protocol == "5"
    client.connect_async(
        endpoint.host,
        endpoint.port,
        keepalive=endpoint.keepalive,
        clean_start=(not endpoint.persistent) if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties=connect_properties(endpoint),
    )
