"""The embedded MQTT broker: rumqttd (PyPI `iotcore`) in a child process, started and stopped with the coordinator.

It has no authentication or ACL: it is for one machine. Use Mosquitto with the files from `restnet acl` for
per-device credentials (`shared.mqtt` explains the `broker.url` forms).
"""
from __future__ import annotations

from shared.errors import ConfigError
from shared.mqtt import INFLIGHT, BrokerAddress


class EmbeddedBroker:
    """rumqttd via `iotcore` on the address of an `embedded://` broker url."""

    def __init__(self, address: BrokerAddress, max_payload: int):
        from iotcore import Broker

        self._broker = Broker(port=address.port, listen=address.host, max_payload_size=max_payload,
                              max_inflight_count=INFLIGHT)

    def start(self) -> "EmbeddedBroker":
        try:
            self._broker.start()
        except OSError as exc:
            raise ConfigError(f"cannot start the embedded broker on port {self._broker.port}: {exc}",
                              "stop whatever uses the port or set broker.url to embedded://127.0.0.1:OTHERPORT") \
                from None
        return self

    def stop(self) -> None:
        self._broker.stop()
