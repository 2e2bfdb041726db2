"""Running the whole gateway: the broker choice, migrations, the supervisor's life."""

from __future__ import annotations

import logging
from typing import Any

import pykka

from actors.supervisor import Supervisor
from estate.config import Settings, mask_url
from estate.db.engine import upgrade
from estate.embedded_broker import EmbeddedBroker
from estate.mqtt_client import BrokerEndpoint

__all__ = ["Gateway"]

logger = logging.getLogger("estate.gateway")


def board_endpoint(settings: Settings, url: str) -> BrokerEndpoint:
    """The gateway's session on the boards' broker."""
    return BrokerEndpoint(
        url=url,
        client_id=settings.client_id,
        protocol=settings.mqtt_protocol,
        keepalive=settings.mqtt_keepalive,
        receive_maximum=settings.mqtt_receive_maximum,
        session_expiry=settings.mqtt_session_expiry,
        ca_file=settings.mqtt_ca_file,
        cert_file=settings.mqtt_cert_file,
        key_file=settings.mqtt_key_file,
        tls_insecure=settings.mqtt_tls_insecure,
    )


class Gateway:
    """Starts and stops the gateway in this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker: EmbeddedBroker | None = None
        self.supervisor: pykka.ActorRef[Any] | None = None

    def start(self) -> Gateway:
        settings = self.settings
        if settings.db_auto_migrate:
            upgrade(settings.database_url)
        url = settings.mqtt_url
        if url is None:
            self.broker = EmbeddedBroker(settings.embedded_mqtt_port).start()
            url = self.broker.url
            # amqtt speaks MQTT 3.1.1 only
            settings = _evolve(settings, mqtt_protocol="3.1.1")
            print(f"embedded MQTT broker listening on {url}", flush=True)
            logger.warning(
                "using the embedded broker on %s: fine for trying out, but it does not "
                "redeliver unacknowledged readings after a crash; set MQTT_URL to a "
                "Mosquitto broker for the no-loss guarantee",
                url,
            )
        logger.info(
            "gateway for hub %r: database %s, broker %s",
            settings.hub_name,
            mask_url(settings.database_url),
            mask_url(url),
        )
        self.supervisor = Supervisor.start(settings, board_endpoint(settings, url))
        return self

    @property
    def broker_url(self) -> str:
        return self.broker.url if self.broker else (self.settings.mqtt_url or "")

    def stop(self, timeout: float = 30.0) -> None:
        if self.supervisor is not None:
            try:
                self.supervisor.stop(block=True, timeout=timeout)
            except (pykka.ActorDeadError, pykka.Timeout):
                logger.warning("supervisor did not stop in %.0fs", timeout)
            self.supervisor = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


def _evolve(settings: Settings, **changes: Any) -> Settings:
    import attrs

    return attrs.evolve(settings, **changes)
