"""Tests for the embedded broker, and for delivery through both test brokers."""

from __future__ import annotations

import socket

import pytest
from mqtt_helpers import BrokerAddress, MessageCollector, ReceivedMessage, publish

from sidecar.broker import BrokerStartError, EmbeddedBroker

pytestmark = pytest.mark.broker

PLUG_TOPIC = "zigbee2mqtt/test_plug"
PLUG_PAYLOAD = b'{"state":"ON","power":12.5}'


def test_broker_delivers_publish_to_wildcard_subscriber(broker: BrokerAddress) -> None:
    """Test that a message published on a plug's topic reaches a `#` subscriber."""
    with MessageCollector(broker, "#") as collector:
        publish(broker, PLUG_TOPIC, PLUG_PAYLOAD)
        seen = collector.wait_for(lambda messages: len(messages) > 0)

    assert seen == [ReceivedMessage(PLUG_TOPIC, PLUG_PAYLOAD, retain=False)]


def test_embedded_broker_stop_releases_port() -> None:
    """Test that a new broker can listen on the port a stopped broker used."""
    with EmbeddedBroker(port=0) as first:
        port = first.port
        publish(BrokerAddress(first.host, port, "amqtt"), PLUG_TOPIC, PLUG_PAYLOAD)

    with EmbeddedBroker(port=port) as second:
        assert _delivers_through(BrokerAddress(second.host, second.port, "amqtt"))


def test_embedded_broker_stop_with_client_connected_releases_port() -> None:
    """Test that stop() finishes while a subscriber is connected and mid-ack."""
    first = EmbeddedBroker(port=0)
    first.start()
    address = BrokerAddress(first.host, first.port, "amqtt")
    with MessageCollector(address, "#") as collector:
        publish(address, PLUG_TOPIC, PLUG_PAYLOAD)
        collector.wait_for(lambda messages: len(messages) > 0)

        # Stopping while the subscriber's PUBACK is in flight is what used to
        # lose a cancellation and hang amqtt's shutdown on Python 3.11.
        first.stop()

        with EmbeddedBroker(port=address.port) as second:
            assert _delivers_through(BrokerAddress(second.host, second.port, "amqtt"))


def test_embedded_broker_start_on_busy_port_raises_error_naming_port() -> None:
    """Test that starting on a port another socket listens on names that port."""
    with socket.create_server(("127.0.0.1", 0)) as occupant:
        port = occupant.getsockname()[1]
        broker = EmbeddedBroker(port=port)

        with pytest.raises(BrokerStartError, match=rf"127\.0\.0\.1:{port}\b") as caught:
            broker.start()

    assert caught.value.port == port
    assert "address already in use" in caught.value.reason


def _delivers_through(address: BrokerAddress) -> bool:
    """Return whether a message published on `address` reaches a subscriber."""
    with MessageCollector(address, "#") as collector:
        publish(address, PLUG_TOPIC, PLUG_PAYLOAD)
        seen = collector.wait_for(lambda messages: len(messages) > 0)
    return seen[0].topic == PLUG_TOPIC
