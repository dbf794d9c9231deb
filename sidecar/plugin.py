"""The sidecar inside the embedded amqtt broker, as a broker plugin.

One process instead of two for a small hub: the broker hands every message a
client publishes to the same service, pipeline and models the stand-alone
sidecar runs, and verdicts go out through the broker itself. Load it in an
amqtt configuration as

    plugins:
      sidecar.plugin.SidecarPlugin: {config_file: /etc/anomaly-sidecar.yaml}

or run `anomaly-sidecar broker --config ...`.

Differences from the stand-alone sidecar, named: there is no network between
broker and sidecar, so there are no reconnects and nothing is held; the
start-up probe and the broker drop counter are off (amqtt delivers messages
the broker publishes itself to subscribers only, not back to plugins, and
publishes no drop count); `broker.*` settings are not used.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin

from sidecar.config import HealthSettings, Settings, load_settings
from sidecar.detector import load_cascade
from sidecar.mqtt import STATUS_OFFLINE, STATUS_ONLINE
from sidecar.service import Service, status_topic
from sidecar.stream import Message

__all__ = ["BrokerTransport", "SidecarPlugin"]

_LOG = logging.getLogger(__name__)

# How long stop() waits for the offline status to be handed to the broker.
STOP_PUBLISH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class _Accepted:
    """A publish handed to the broker's event loop."""

    accepted: bool = True
    held: bool = False
    error: str = ""


class BrokerTransport:
    """Publish through the broker the plugin runs in; receive what it passes on.

    Args:
        context: The broker's plugin context.
        status: The retained online/offline topic.
        on_message: Called for every message clients publish.
    """

    def __init__(
        self,
        context: BrokerContext,
        status: str,
        on_message: Callable[[Message], None],
    ) -> None:
        self._context = context
        self._status = status
        self.on_message = on_message
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.connects = 0
        self.intake = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Begin: the broker is up, so we are connected and subscribed."""
        self.connects += 1
        self.connected.set()
        self.subscribed.set()
        self.intake = True
        self.publish(self._status, STATUS_ONLINE, 1, retain=True)

    def stop_intake(self) -> None:
        """Stop passing client messages on."""
        self.intake = False

    def stop(self) -> None:
        """Say offline and stop publishing."""
        future = self._submit(self._status, STATUS_OFFLINE, 1, retain=True)
        if future is not None:
            try:
                future.result(STOP_PUBLISH_TIMEOUT_S)
            except TimeoutError:
                _LOG.warning("offline status not handed over topic=%s", self._status)
        self.connected.clear()
        self.subscribed.clear()

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> _Accepted:
        """Hand a message to the broker's event loop, from any thread."""
        if self._submit(topic, payload, qos, retain) is None:
            return _Accepted(False, False, "the broker's event loop is not running")
        return _Accepted()

    def _submit(
        self, topic: str, payload: bytes, qos: int, retain: bool
    ) -> Future[None] | None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return None
        return asyncio.run_coroutine_threadsafe(
            self._deliver(topic, payload, qos, retain), loop
        )

    async def _deliver(
        self, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        if retain:
            await self._context.retain_message(topic, payload, qos)
        await self._context.broadcast_message(topic, payload, qos)


class SidecarPlugin(BasePlugin[BrokerContext]):  # type: ignore[misc]
    """Run the anomaly sidecar inside an amqtt broker."""

    @dataclass
    class Config:
        """Plugin options in the amqtt configuration."""

        config_file: str | None = None

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        path = self.config.config_file
        settings = load_settings(Path(path) if path else None)
        # Neither self-check can work inside the broker (see the module doc).
        settings = settings.model_copy(
            update={
                "health": HealthSettings(probe_timeout_s=0, broker_dropped_topic="")
            }
        )
        models = load_cascade(
            settings.models, settings.detection, settings.window.length
        )
        status = status_topic(settings.output.prefix)
        self.transport: BrokerTransport | None = None

        def build(on_message: Callable[[Message], None]) -> BrokerTransport:
            self.transport = BrokerTransport(context, status, on_message)
            return self.transport

        self.service = Service(settings, models, transport=build)
        self.settings: Settings = settings

    async def on_broker_post_start(self) -> None:
        """Start the sidecar once the broker listens."""
        if self.transport is None:
            message = "the service did not build its transport"
            raise RuntimeError(message)
        self.transport.loop = asyncio.get_running_loop()
        self.service.start()
        _LOG.info("sidecar running inside the broker")

    async def on_broker_message_broadcast(
        self, *, client_id: str, message: Any
    ) -> None:
        """Pass a client's message on to the sidecar (never blocks the broker)."""
        transport = self.transport
        if transport is None or not transport.intake:
            return
        packet = message.publish_packet
        retain = bool(packet.retain_flag) if packet is not None else False
        transport.on_message(
            Message(message.topic, bytes(message.data), time.time(), retain)
        )

    async def on_broker_pre_shutdown(self) -> None:
        """Stop the sidecar while the broker can still deliver its last verdicts."""
        await asyncio.get_running_loop().run_in_executor(None, self.service.stop)
