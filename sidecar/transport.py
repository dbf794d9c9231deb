"""What the service needs from the thing that carries messages to and from MQTT.

Two implementations: `sidecar.mqtt.MqttAdapter`, a paho client beside any
broker, and `sidecar.plugin.BrokerTransport`, inside the embedded amqtt
broker. The service, pipeline and verdicts are the same code in both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from sidecar.stream import Message

__all__ = ["Outcome", "Transport", "TransportFactory"]


class Outcome(Protocol):
    """What became of one publish."""

    @property
    def accepted(self) -> bool:
        """Whether the message was taken (sent, or held to send later)."""

    @property
    def held(self) -> bool:
        """Whether it waits for the broker to come back."""

    @property
    def error(self) -> str:
        """Why it was refused; empty when accepted."""


class Transport(Protocol):
    """Messages in (through the callback it was built with) and out."""

    connected: threading.Event
    subscribed: threading.Event
    connects: int

    def start(self) -> None:
        """Begin delivering messages."""

    def stop_intake(self) -> None:
        """Stop delivering new messages; publishing still works."""

    def stop(self) -> None:
        """Say offline and stop."""

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> Outcome:
        """Publish one message."""


# Builds a transport that hands every message it receives to the callback.
TransportFactory = Callable[[Callable[[Message], None]], Transport]
