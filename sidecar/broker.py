"""Embedded amqtt broker on a background thread, for the one-command start and tests."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Self

from amqtt.broker import Broker
from amqtt.errors import BrokerError, PluginError

from sidecar.errors import SidecarError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["BrokerStartError", "EmbeddedBroker"]

_LOGGER = logging.getLogger(__name__)

# Loopback only by default: the embedded broker serves a sidecar and its tests
# on the same host, never the LAN.
DEFAULT_HOST = "127.0.0.1"
# IANA-registered port for MQTT without TLS (MQTT 3.1.1, section 4.2).
DEFAULT_PORT = 1883
# amqtt 0.12.1 is listening about 0.1 s after the thread starts on a laptop
# (measured); 10 s leaves room for a loaded CI runner.
START_TIMEOUT_S = 10.0
# amqtt's shutdown waits up to 5 s for its broadcast task
# (`_BROADCAST_SHUTDOWN_TIMEOUT` in amqtt/broker.py, 0.12.1); double that.
STOP_TIMEOUT_S = 10.0
# amqtt 0.12.1 shuts down in a few milliseconds on loopback (measured); a task
# still running this long after it was cancelled has lost the cancellation.
LOST_CANCEL_RETRY_S = 0.5
# amqtt logs every connection and packet at INFO, and `transitions` (amqtt's
# state machine) logs every state change at INFO.
CHATTY_LOGGERS = ("amqtt", "transitions")
# The only plugin we load: anonymous clients are allowed, as on a home network.
# Leaving out amqtt's default plugins also drops the `$SYS` publisher (which
# warns that its psutil dependency is deprecated) and the per-packet loggers.
_ANONYMOUS_AUTH_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"


class BrokerStartError(SidecarError):
    """The embedded broker did not start listening.

    Attributes:
        host: The address the broker tried to listen on.
        port: The TCP port the broker tried to listen on.
        reason: Why it did not listen.
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        message = f"embedded MQTT broker cannot listen on {host}:{port}: {reason}"
        super().__init__(message)


class EmbeddedBroker:
    """An amqtt broker running on its own event loop in a daemon thread.

    The broker has one plain TCP listener, lets anonymous clients in and
    publishes no `$SYS` topics. It keeps no state across a restart.

    Args:
        host: The address to listen on.
        port: The TCP port to listen on; 0 picks a free port on `host` first.
        plugins: More amqtt plugins, by dotted class path, with their options
            (`sidecar.plugin.SidecarPlugin` runs the sidecar inside).

    Example:
        >>> with EmbeddedBroker(port=0) as broker:
        ...     broker.port > 0
        True
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        plugins: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self._plugins = dict(plugins or {})
        self._host = host
        self._port = port if port != 0 else _pick_free_port(host)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._listening = False
        self._start_error: Exception | None = None

    @property
    def host(self) -> str:
        """The address the broker listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port the broker listens on, never 0."""
        return self._port

    def start(self) -> None:
        """Start the broker and block until its listener accepts connections.

        amqtt reports the broker started only after its listening socket is
        bound and listening, so from then on TCP connections are accepted.

        Raises:
            BrokerStartError: The broker could not bind its listener, or was
                not listening within `START_TIMEOUT_S` seconds.
            RuntimeError: The broker is already running.
        """
        if self._thread is not None:
            msg = f"embedded MQTT broker on {self._host}:{self._port} already running"
            raise RuntimeError(msg)
        _quiet_chatty_loggers()

        self._ready.clear()
        self._stopping.clear()
        self._loop = None
        self._stop_requested = None
        self._listening = False
        self._start_error = None
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-broker-{self._port}", daemon=True
        )
        self._thread.start()

        if not self._ready.wait(START_TIMEOUT_S):
            self._abandon_thread()
            reason = f"not listening after {START_TIMEOUT_S} s"
            raise BrokerStartError(self._host, self._port, reason)
        if not self._listening:
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
            cause = self._start_error
            if cause is None:
                reason = "broker thread exited early; its traceback is on stderr"
            else:
                # amqtt wraps the OSError from bind(), which names the problem.
                reason = str(cause.__cause__ or cause)
            raise BrokerStartError(self._host, self._port, reason) from cause
        _LOGGER.info("embedded broker started host=%s port=%d", self._host, self._port)

    def stop(self) -> None:
        """Shut the broker down, close its listener and join its thread.

        Clients still connected are disconnected. Calling `stop` on a broker
        that is not running does nothing.
        """
        thread = self._thread
        if thread is None:
            return
        self._request_stop()

        thread.join(STOP_TIMEOUT_S)
        self._thread = None
        if thread.is_alive():
            _LOGGER.warning(
                "embedded broker thread still running host=%s port=%d timeout_s=%s",
                self._host,
                self._port,
                STOP_TIMEOUT_S,
            )
            return
        _LOGGER.info("embedded broker stopped host=%s port=%d", self._host, self._port)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        """Run the broker's event loop until `stop` is called (thread body)."""
        try:
            asyncio.run(self._serve())
        finally:
            # Wake `start` even if the loop died before the broker was up.
            self._ready.set()

    async def _serve(self) -> None:
        """Start the broker, wait for a stop request, then shut it down."""
        stop_requested = asyncio.Event()
        self._stop_requested = stop_requested
        self._loop = asyncio.get_running_loop()

        try:
            broker = Broker(self._config(), loop=self._loop)
            await broker.start()
        except (BrokerError, PluginError) as err:
            self._start_error = err
            return
        self._listening = True
        self._ready.set()

        # A stop requested before the loop was known could not be scheduled.
        if self._stopping.is_set():
            stop_requested.set()
        await stop_requested.wait()
        await _shut_down(broker)

    def _config(self) -> dict[str, Any]:
        """Build amqtt's broker configuration: one TCP listener, anonymous access."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{self._port}"}},
            "plugins": {
                _ANONYMOUS_AUTH_PLUGIN: {"allow_anonymous": True},
                **self._plugins,
            },
        }

    def _request_stop(self) -> None:
        """Ask the broker's event loop, from any thread, to shut the broker down."""
        self._stopping.set()
        loop, stop_requested = self._loop, self._stop_requested
        if loop is None or stop_requested is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(stop_requested.set)
        except RuntimeError:
            # The loop closed between the check and the call: nothing to stop.
            return

    def _abandon_thread(self) -> None:
        """Stop a broker that missed its start deadline, without waiting on it."""
        self._request_stop()
        self._thread = None


async def _shut_down(broker: Any) -> None:
    """Run amqtt's shutdown, re-sending cancellations that Python 3.11 loses.

    On Python 3.11, `asyncio.wait_for` can swallow a cancellation that lands
    as its inner read completes (CPython gh-86296, fixed in 3.12). amqtt
    0.12.1 stops each client handler by cancelling a reader that sits in
    `wait_for`, then waits for it; if the cancellation is lost, shutdown hangs
    until that client disconnects. Here a task still running although it was
    cancelled gets cancelled again. Drop this when we require Python 3.12.
    """
    shutdown = asyncio.ensure_future(broker.shutdown())
    ours = {shutdown, asyncio.current_task()}
    while True:
        done, _ = await asyncio.wait({shutdown}, timeout=LOST_CANCEL_RETRY_S)
        if done:
            break
        stuck = [
            task
            for task in asyncio.all_tasks()
            if task not in ours and task.cancelling() > 0 and not task.done()
        ]
        for task in stuck:
            task.cancel()
        _LOGGER.debug("re-cancelled stuck broker tasks count=%d", len(stuck))
    shutdown.result()


def _pick_free_port(host: str) -> int:
    """Return a TCP port that is free on `host` right now.

    Another process may take the port before the broker binds it; the broker
    then fails to start with `BrokerStartError`.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.bind(address)
        return int(probe.getsockname()[1])


def _quiet_chatty_loggers() -> None:
    """Raise amqtt's loggers to WARNING unless the application set their level.

    Only levels change here: handlers stay the application's business.
    """
    for name in CHATTY_LOGGERS:
        library_logger = logging.getLogger(name)
        if library_logger.level == logging.NOTSET:
            library_logger.setLevel(logging.WARNING)
