"""The MQTT adapter: the only module that imports paho.

Its callbacks do nothing but hand messages to the caller's `on_message`
(which enqueues them) and keep the subscription alive across reconnects, so
the network loop always gets back to its keepalive (pitfalls.md #1).

When the broker goes away, paho's network thread reconnects on its own with
exponential backoff, to which this adapter adds random jitter. QoS 1 and 2
messages published meanwhile wait inside paho (paho 2.2 keeps them in its
outgoing queue and sends them after the next CONNACK), up to `max_queued`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from sidecar.config import BrokerSettings
from sidecar.stream import Message

__all__ = ["MqttAdapter", "PublishOutcome"]

_LOG = logging.getLogger(__name__)

# paho's own reconnect backoff: start at 1 s, double up to 30 s. Short enough
# for a hub restarting Mosquitto, long enough not to hammer a dead broker.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
# paho's backoff has no jitter, so every client of a restarted broker would
# retry at the same instants; before each of paho's backoff waits the adapter
# waits a random 0 to 1 s more. One backoff step (RECONNECT_MIN_S) of spread
# is enough to break the lockstep without slowing a reconnect noticeably.
RECONNECT_JITTER_S = 1.0
# paho's own convention for "no bound" on messages waiting inside it.
UNBOUNDED = 0
# How long stop() waits for the offline status to leave before disconnecting.
STOP_PUBLISH_TIMEOUT_S = 2.0
# QoS of the subscription: 1 so the broker keeps messages in flight for us
# across short network hiccups.
SUBSCRIBE_QOS = 1
# paho's default of 20 unacknowledged QoS>0 messages caps a verdict burst or
# a replay at one round trip per 20 messages; Mosquitto's own default
# (max_inflight_messages) is also 20 per client, so more only helps brokers
# configured for it.
DEFAULT_MAX_INFLIGHT = 20
STATUS_ONLINE = b"online"
# A broker lets one connection per client id live: a second client with our
# id takes the session over and ours reconnects, taking it back, in a loop
# (MQTT 3.1.1, section 3.1.4). Connections that end within this many seconds,
# this many times in a row, are most likely that.
SHORT_CONNECTION_S = 5.0
SHORT_CONNECTIONS_FOR_HINT = 3
# Stands in for a topic that is not valid UTF-8; no routing rule matches it.
INVALID_TOPIC = "\x00invalid-topic"
STATUS_OFFLINE = b"offline"


class PublishOutcome:
    """What became of one publish: queued in paho, or refused at once.

    Args:
        info: What paho's publish returned.
        qos: The QoS it was published with.
    """

    def __init__(self, info: paho.MQTTMessageInfo, qos: int) -> None:
        self._info = info
        self._qos = qos

    @property
    def accepted(self) -> bool:
        """True if paho took it: sent now, or (QoS 1 and 2) held until reconnected.

        While disconnected paho keeps QoS 1 and 2 messages and sends them
        after the next CONNACK, but drops QoS 0 ones.
        """
        if self._info.rc == paho.MQTT_ERR_NO_CONN:
            return self._qos > 0
        return self._info.rc == paho.MQTT_ERR_SUCCESS

    @property
    def held(self) -> bool:
        """True if it was held in paho because the broker was not connected."""
        return self._qos > 0 and self._info.rc == paho.MQTT_ERR_NO_CONN

    @property
    def error(self) -> str:
        """Paho's description of the result code."""
        return paho.error_string(self._info.rc)

    def wait(self, timeout: float) -> bool:
        """Wait until the broker acknowledged it; return whether it did.

        Always False for a held message: paho never updates the result code
        of one sent after a reconnect.
        """
        try:
            self._info.wait_for_publish(timeout)
        except (ValueError, RuntimeError):
            return False
        return self._info.is_published()


class MqttAdapter:
    """Connect, subscribe to the configured filters and deliver messages.

    Args:
        broker: Where and how to connect.
        filters: Subscription filters (re-subscribed after every reconnect).
        status_topic: Retained `online`/`offline` topic; `offline` is also
            the last will, so a crash reads as offline. None for a client
            that only publishes (the replay tool).
        on_message: Called from paho's network thread for every message; it
            must return at once.
        max_inflight: Unacknowledged QoS>0 messages on the wire at once.
        max_queued: Messages waiting inside paho, in flight or held while
            disconnected; past it publish is refused. `UNBOUNDED` by default.
    """

    def __init__(
        self,
        broker: BrokerSettings,
        filters: list[str],
        status_topic: str | None,
        on_message: Callable[[Message], None],
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_queued: int = UNBOUNDED,
    ) -> None:
        self._broker = broker
        self._filters = filters
        self._status_topic = status_topic
        self._on_message = on_message
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.connects = 0
        self._failures = 0
        self._lost_at: float | None = None
        self._connected_at = 0.0
        self._short_connections = 0
        self._closing = threading.Event()
        self._client = self._build_client()

    def _build_client(self) -> paho.Client:
        settings = self._broker
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv311,
            clean_session=not settings.persistent_session,
        )
        if settings.username is not None:
            password = (
                settings.password.get_secret_value() if settings.password else None
            )
            client.username_pw_set(settings.username, password)
        if settings.tls is not None:
            tls = settings.tls
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(tls.insecure)
        if self._status_topic is not None:
            client.will_set(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(self._max_queued)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.on_connect_fail = self._mqtt_on_connect_fail
        client.on_connect = self._mqtt_on_connect
        client.on_disconnect = self._mqtt_on_disconnect
        client.on_subscribe = self._mqtt_on_subscribe
        client.on_message = self._mqtt_on_message
        return client

    def start(self) -> None:
        """Connect in the background; paho's thread reconnects on its own."""
        _LOG.info(
            "connecting host=%s port=%d client_id=%s tls=%s",
            self._broker.host,
            self._broker.port,
            self._broker.client_id,
            self._broker.tls is not None,
        )
        self._client.connect_async(
            self._broker.host, self._broker.port, keepalive=self._broker.keepalive
        )
        self._client.loop_start()

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> PublishOutcome:
        """Publish; QoS 1 and 2 messages wait in paho while disconnected."""
        return PublishOutcome(
            self._client.publish(topic, payload, qos=qos, retain=retain), qos
        )

    def stop_intake(self, timeout: float = STOP_PUBLISH_TIMEOUT_S) -> None:
        """Unsubscribe, so nothing new arrives while the last work is published.

        With a persistent session the subscriptions are kept: they are what
        makes the broker queue messages for us until the next start. What
        arrives meanwhile is processed or shed and counted, like any message.
        """
        if not (self.connected.is_set() and self._filters):
            return
        if self._broker.persistent_session:
            _LOG.info("keeping subscriptions for the persistent session")
            return
        done = threading.Event()
        self._client.on_unsubscribe = lambda *_args: done.set()
        result, _mid = self._client.unsubscribe(self._filters)
        if result == paho.MQTT_ERR_SUCCESS and not done.wait(timeout):
            _LOG.warning("unsubscribe not acknowledged filters=%s", self._filters)

    def stop(self) -> None:
        """Say offline on the status topic, disconnect and stop the loop.

        Waiting for the offline status to be acknowledged also flushes every
        message published before it: paho sends in order and the broker
        handles one client's packets in order.
        """
        self._closing.set()
        acknowledged = True
        if not self.connected.is_set():
            _LOG.warning(
                "stopping while disconnected host=%s port=%d; anything still "
                "held for the broker is lost",
                self._broker.host,
                self._broker.port,
            )
        elif self._status_topic is not None:
            outcome = self.publish(
                self._status_topic, STATUS_OFFLINE, qos=1, retain=True
            )
            acknowledged = outcome.wait(STOP_PUBLISH_TIMEOUT_S)
        if acknowledged:
            self._client.disconnect()
            self._client.loop_stop()
        else:
            # The status may still wait in paho's queue behind a full in-flight
            # window (a flood delays every acknowledgement). A DISCONNECT would
            # tell the broker to drop the last will, leaving `online` retained;
            # closing the socket without one makes the broker publish the will,
            # `offline`, instead.
            _LOG.warning(
                "offline status not acknowledged topic=%s; closing without "
                "DISCONNECT so the broker publishes the last will",
                self._status_topic,
            )
            # Shut first: paho's loop does not end while messages wait to be
            # acknowledged on a live connection (Client.loop_forever), so
            # loop_stop alone could wait forever. A shut socket ends the
            # connection; disconnect() then only marks the client as leaving
            # (its DISCONNECT cannot reach the broker) so paho does not
            # reconnect, and the loop ends.
            sock = self._client.socket()
            if isinstance(sock, socket.socket):  # TLS sockets are ones too
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._client.disconnect()
            self._client.loop_stop()
        _LOG.info("disconnected host=%s port=%d", self._broker.host, self._broker.port)

    def _jitter(self) -> None:
        """Wait a random part of RECONNECT_JITTER_S, unless stopping.

        Called from paho's thread when a connection is lost or an attempt
        fails, right before paho's own backoff wait (Client.loop_forever),
        while nothing else is pending on the connection. Waiting here rather
        than just before the next attempt lets a stop during the wait end the
        loop without opening another socket.
        """
        jitter = random.uniform(0.0, RECONNECT_JITTER_S)
        self._closing.wait(jitter)
        _LOG.debug("reconnect jitter_s=%.2f", jitter)

    def _mqtt_on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho 2.2 passes no cause, but calls this inside the `except OSError`
        # around its connect (Client.loop_forever): the exception being
        # handled is the cause.
        cause = sys.exception()
        self._failures += 1
        # A certificate that fails to verify fails on every retry: lost
        # function, unlike a broker that is briefly away.
        level = logging.ERROR if isinstance(cause, ssl.SSLError) else logging.WARNING
        _LOG.log(
            level,
            "connect failed host=%s port=%d failures=%d error=%r; retrying",
            self._broker.host,
            self._broker.port,
            self._failures,
            str(cause),
        )
        self._jitter()

    def _mqtt_on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            _LOG.error(
                "connect refused host=%s port=%d reason=%r",
                self._broker.host,
                self._broker.port,
                str(reason),
            )
            return
        self.connects += 1
        self._failures = 0
        self._connected_at = time.monotonic()
        outage_s = 0.0 if self._lost_at is None else time.monotonic() - self._lost_at
        self._lost_at = None
        self.connected.set()
        _LOG.info(
            "connected host=%s port=%d session_present=%s connects=%d outage_s=%.1f",
            self._broker.host,
            self._broker.port,
            flags.session_present,
            self.connects,
            outage_s,
        )
        if self._status_topic is not None:
            client.publish(self._status_topic, STATUS_ONLINE, qos=1, retain=True)
        if self._filters:
            client.subscribe(
                [(topic_filter, SUBSCRIBE_QOS) for topic_filter in self._filters]
            )
        else:
            self.subscribed.set()

    def _mqtt_on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Any,
    ) -> None:
        refused = [
            f"{topic_filter}: {reason}"
            for topic_filter, reason in zip(self._filters, reasons, strict=False)
            if reason.is_failure
        ]
        if refused:
            _LOG.error("subscription refused filters=%s", refused)
        if len(refused) == len(reasons):
            return
        _LOG.info("subscribed filters=%s", ",".join(self._filters))
        self.subscribed.set()

    def _mqtt_on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        if not reason.is_failure:
            return
        if was_connected:
            self._lost_at = time.monotonic()
            _LOG.warning("connection lost reason=%r; paho reconnects", str(reason))
            self._hint_client_id_clash(self._lost_at - self._connected_at)
            self._jitter()
        else:
            # An attempt dropped before its CONNACK, or paho 2.2 reporting a
            # keepalive timeout a second time (loop_misc after
            # _check_keepalive): the loss itself was logged already.
            _LOG.debug("disconnected while not connected reason=%r", str(reason))

    def _hint_client_id_clash(self, lasted_s: float) -> None:
        if lasted_s >= SHORT_CONNECTION_S:
            self._short_connections = 0
            return
        self._short_connections += 1
        if self._short_connections == SHORT_CONNECTIONS_FOR_HINT:
            _LOG.error(
                "connection lost %d times within %.0f s of connecting; another "
                "client may be using client_id=%s (give each sidecar its own "
                "broker.client_id)",
                self._short_connections,
                SHORT_CONNECTION_S,
                self._broker.client_id,
            )

    def _mqtt_on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        received_at = time.time()
        try:
            topic = message.topic
        except UnicodeDecodeError:
            # MQTT requires UTF-8 topics, but a broker may pass a bad one on;
            # it is routed as an unknown topic, never raised into paho's loop.
            topic = INVALID_TOPIC
        self._on_message(
            Message(topic, bytes(message.payload), received_at, bool(message.retain))
        )
