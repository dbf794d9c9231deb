"""MQTT test helpers: broker address, recording subscriber, one-shot publish."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self, TypeAlias

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

if TYPE_CHECKING:
    from types import TracebackType

    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "ACK_TIMEOUT_S",
    "DELIVERY_TIMEOUT_S",
    "BrokerAddress",
    "BrokerKind",
    "MessageCollector",
    "ReceivedMessage",
    "StartMosquitto",
    "publish",
]

# A loopback broker answers CONNECT, SUBSCRIBE and PUBLISH in milliseconds;
# 5 s only matters when something is broken, and keeps a failing test fast.
ACK_TIMEOUT_S = 5.0
# Same reasoning for a message to travel publisher, broker, subscriber.
DELIVERY_TIMEOUT_S = 5.0
# Short and unique per client, so two helpers never take over each other's
# session (MQTT 3.1.1, section 3.1.3.1 allows up to 23 characters).
_CLIENT_ID_HEX_CHARS = 8

BrokerKind: TypeAlias = Literal["amqtt", "mosquitto"]


@dataclass(frozen=True)
class BrokerAddress:
    """Where a test broker listens, and which implementation it is.

    Attributes:
        host: The broker's address.
        port: The broker's TCP port.
        kind: The broker implementation, named in failure messages.
    """

    host: str
    port: int
    kind: BrokerKind


# What the `start_mosquitto` fixture returns: extra mosquitto.conf lines in, a
# fresh broker's address out.
StartMosquitto: TypeAlias = Callable[..., BrokerAddress]


class ReceivedMessage(NamedTuple):
    """One message as a subscriber saw it."""

    topic: str
    payload: bytes
    retain: bool


class MessageCollector:
    """A subscriber that records every message matching a topic filter.

    The constructor returns once the broker has acknowledged the
    subscription, so anything published afterwards is recorded.

    Args:
        address: The broker to connect to.
        topic_filter: The MQTT topic filter to subscribe to; wildcards allowed.
        qos: The maximum QoS to subscribe with.
        timeout: Seconds to wait for the broker's CONNACK and SUBACK.

    Raises:
        TimeoutError: The broker did not acknowledge the subscription in time.
        RuntimeError: The broker refused the connection or the subscription.
    """

    def __init__(
        self,
        address: BrokerAddress,
        topic_filter: str,
        *,
        qos: int = 1,
        timeout: float = ACK_TIMEOUT_S,
    ) -> None:
        self._address = address
        self._topic_filter = topic_filter
        self._qos = qos
        self._messages: list[ReceivedMessage] = []
        self._arrived = threading.Condition()
        self._subscribed = threading.Event()
        self._subscribe_failure: str | None = None

        self._client = _new_client("collector")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(address.host, address.port)
        self._client.loop_start()

        acknowledged = self._subscribed.wait(timeout)
        failure = self._subscribe_failure
        if acknowledged and failure is None:
            return
        self.close()
        broker = f"{address.kind} broker at {address.host}:{address.port}"
        if failure is not None:
            msg = f"{broker} refused the subscription to {topic_filter!r}: {failure}"
            raise RuntimeError(msg)
        msg = f"{broker} did not acknowledge {topic_filter!r} within {timeout} s"
        raise TimeoutError(msg)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages recorded so far, oldest first."""
        with self._arrived:
            return list(self._messages)

    def wait_for(
        self,
        predicate: Callable[[list[ReceivedMessage]], bool],
        timeout: float = DELIVERY_TIMEOUT_S,
    ) -> list[ReceivedMessage]:
        """Wait until the recorded messages satisfy `predicate`.

        Args:
            predicate: Called with a snapshot of all messages recorded so far.
            timeout: Seconds to wait before giving up.

        Returns:
            The snapshot that satisfied `predicate`.

        Raises:
            TimeoutError: `predicate` still failed after `timeout` seconds; the
                message lists what had arrived.
        """
        with self._arrived:
            satisfied = self._arrived.wait_for(
                lambda: predicate(list(self._messages)), timeout
            )
            seen = list(self._messages)
        if not satisfied:
            msg = (
                f"messages on {self._topic_filter!r} from the {self._address.kind} "
                f"broker did not match within {timeout} s; received {seen!r}"
            )
            raise TimeoutError(msg)
        return seen

    def close(self) -> None:
        """Disconnect from the broker and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        """Subscribe once the broker accepted the connection (paho callback)."""
        if reason_code.is_failure:
            self._subscribe_failure = f"CONNECT refused: {reason_code}"
            self._subscribed.set()
            return
        client.subscribe(self._topic_filter, qos=self._qos)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        """Record the outcome of the SUBACK and wake the constructor (paho callback)."""
        failures = [str(code) for code in reason_codes if code.is_failure]
        if failures:
            self._subscribe_failure = f"SUBACK {', '.join(failures)}"
        self._subscribed.set()

    def _on_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        """Record one message and wake any waiter (paho callback)."""
        payload = bytes(message.payload)
        received = ReceivedMessage(message.topic, payload, message.retain)
        with self._arrived:
            self._messages.append(received)
            self._arrived.notify_all()


def publish(
    address: BrokerAddress,
    topic: str,
    payload: bytes | str,
    qos: int = 1,
    retain: bool = False,
) -> None:
    """Connect, publish one message, wait until it is delivered, disconnect.

    "Delivered" means written to the socket for QoS 0, PUBACK received for
    QoS 1 and PUBCOMP received for QoS 2.

    Args:
        address: The broker to publish to.
        topic: The topic to publish on.
        payload: The message body; `str` is sent as UTF-8.
        qos: The QoS to publish with.
        retain: Whether the broker should retain the message.

    Raises:
        TimeoutError: The broker did not answer the connection or complete
            the publish within `ACK_TIMEOUT_S` seconds.
        RuntimeError: The broker refused the connection.
    """
    broker = f"{address.kind} broker at {address.host}:{address.port}"
    connack: list[ReasonCode] = []
    connected = threading.Event()

    def on_connect(
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        connack.append(reason_code)
        connected.set()

    client = _new_client("publisher")
    client.on_connect = on_connect
    client.connect(address.host, address.port)
    client.loop_start()

    try:
        if not connected.wait(ACK_TIMEOUT_S):
            msg = f"{broker} sent no CONNACK within {ACK_TIMEOUT_S} s"
            raise TimeoutError(msg)
        if connack[0].is_failure:
            msg = f"{broker} refused the connection: {connack[0]}"
            raise RuntimeError(msg)

        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(ACK_TIMEOUT_S)
        if not info.is_published():
            msg = f"{broker} did not complete a publish within {ACK_TIMEOUT_S} s"
            raise TimeoutError(msg)
    finally:
        client.disconnect()
        client.loop_stop()


def _new_client(role: str) -> mqtt.Client:
    """Return a paho client with a unique id naming its role, that never reconnects.

    A test client that silently reconnected would hide a broker going away,
    and paho's reconnect back-off would make `close` wait a second for it.
    """
    client_id = f"test-{role}-{uuid.uuid4().hex[:_CLIENT_ID_HEX_CHARS]}"
    return mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, reconnect_on_failure=False
    )
