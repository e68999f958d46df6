"""How to reach the MQTT broker: its address from `broker.url`, and a paho client set up for it.

`broker.url` in the fleet config is one of:
  embedded                  rumqttd (PyPI `iotcore`) in a child process of the coordinator, on 127.0.0.1:1883
  embedded://HOST:PORT      the same on another address
  mqtt://HOST[:PORT]        an external broker (Mosquitto, EMQX...), plain TCP, default port 1883
  mqtts://HOST[:PORT]       the same over TLS, default port 8883 (`ca_file`, optional `cert_file`/`key_file`)
Both the coordinator and the device agent connect through `make_client`; starting the embedded broker is the
coordinator's business (`server.broker`). Devices speak MQTT 3.1.1, which both brokers support; coordinators
that share the device topics (MQTT 5 shared subscriptions) speak MQTT 5 (`mqtt5=True`, external brokers only).
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from shared.config import BrokerConfig
from shared.errors import ConfigError

INFLIGHT = 1000  # paho's default of 20 messages in flight caps QoS-1 throughput at a few hundred per second


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    embedded: bool


def parse_url(url: str) -> BrokerAddress:
    if url == "embedded":
        return BrokerAddress("127.0.0.1", 1883, False, True)
    parts = urlsplit(url)
    defaults = {"embedded": 1883, "mqtt": 1883, "mqtts": 8883}
    if parts.scheme not in defaults or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"broker url {url!r} is not understood",
                          "use embedded, embedded://HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = parts.port or defaults[parts.scheme]
    except ValueError:
        raise ConfigError(f"broker url {url!r} has a bad port") from None
    return BrokerAddress(parts.hostname, port, parts.scheme == "mqtts", parts.scheme == "embedded")


def make_client(cfg: BrokerConfig, client_id: str, username: str | None, password: str | None,
                clean_session: bool, mqtt5: bool = False) -> tuple[mqtt.Client, BrokerAddress]:
    """A paho client set up for the configured broker: credentials, TLS, lifted in-flight window. With `mqtt5`,
    `clean_session` does not apply: MQTT 5 asks for `clean_start` and a session expiry at connect time."""
    address = parse_url(cfg.url)
    if mqtt5:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=clean_session)
    client.on_socket_open = _no_delay
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)  # unbounded: the broker, not the client, should push back
    if username is not None:
        client.username_pw_set(username, password)
    if address.tls:
        client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client, address


def _no_delay(client, userdata, sock) -> None:
    """Send small MQTT packets at once: with Nagle's algorithm a round trip through rumqttd takes 40 ms."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
