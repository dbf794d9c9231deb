"""A Prometheus endpoint for the sidecar's counters, queue and model latency.

The counters live in the pipeline and are read when Prometheus scrapes, so
the message path pays nothing for them; only the model runs are timed, once
per batch, into one histogram per model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.config import MetricsSettings
from sidecar.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from sidecar.detector import OnnxModel

__all__ = ["NAMESPACE", "MetricsEndpoint"]

_LOG = logging.getLogger(__name__)

NAMESPACE = "anomaly_sidecar"
# Per-batch model latency buckets, seconds: from a 256-row RF batch (~1 ms,
# model cards' inference_us_per_row) to a stuck run.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Counters that are gauges, not totals: they go up and down.
GAUGES = {
    "queue_depth": "Messages waiting for the worker.",
    "devices_tracked": "Devices with state in the sidecar.",
    "devices_in_alarm": "Devices whose model verdict is currently raised.",
}
# Counters exported with a label instead of a name of their own.
LABELLED = {
    "verdicts_raised": ("verdicts", {"kind": "model", "state": "raised"}),
    "verdicts_cleared": ("verdicts", {"kind": "model", "state": "cleared"}),
    "conditions_raised": ("verdicts", {"kind": "condition", "state": "raised"}),
    "conditions_cleared": ("verdicts", {"kind": "condition", "state": "cleared"}),
}


class _CounterCollector(Collector):
    """Read a counter snapshot at scrape time and expose it."""

    def __init__(self, snapshot: Callable[[], dict[str, int]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        counters = self._snapshot()
        labelled: dict[str, CounterMetricFamily] = {}
        for name, value in counters.items():
            if name in GAUGES:
                yield GaugeMetricFamily(
                    f"{NAMESPACE}_{name}", GAUGES[name], value=value
                )
                continue
            if name in LABELLED:
                family_name, labels = LABELLED[name]
                family = labelled.get(family_name)
                if family is None:
                    family = labelled[family_name] = CounterMetricFamily(
                        f"{NAMESPACE}_{family_name}",
                        "Verdicts published, by kind and state.",
                        labels=sorted(labels),
                    )
                family.add_metric([labels[key] for key in sorted(labels)], value)
                continue
            yield CounterMetricFamily(
                f"{NAMESPACE}_{name}",
                f"Messages or events counted as {name.replace('_', ' ')}.",
                value=value,
            )
        yield from labelled.values()


class MetricsEndpoint:
    """Serve `/metrics` over HTTP for as long as the sidecar runs.

    Args:
        settings: Where to listen.
        snapshot: Returns the current counters (Service.counters).
        models: The models whose runs are timed.
    """

    def __init__(
        self,
        settings: MetricsSettings,
        snapshot: Callable[[], dict[str, int]],
        models: dict[str, OnnxModel],
    ) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.registry.register(_CounterCollector(snapshot))
        self._latency = Histogram(
            f"{NAMESPACE}_inference_seconds",
            "Time of one model run over a batch of windows.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_models(models)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def time_models(self, models: dict[str, OnnxModel]) -> None:
        """Time every run of these models (again after a model swap)."""
        for name, model in models.items():
            model.on_run = _observer(self._latency.labels(model=name))

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_port)

    def start(self) -> None:
        """Listen in a background thread.

        Raises:
            ConfigError: The address cannot be listened on (the port is
                taken, or the host is not an address of this machine).
        """
        host, port = self.settings.host, self.settings.port
        try:
            self._server, self._thread = start_http_server(
                port, addr=host, registry=self.registry
            )
        except OSError as err:
            problem = (
                f"metrics.port: cannot listen on {host}:{port} ({err.strerror}); "
                "choose a free port, or metrics.enabled: false "
                f"(got {port})"
            )
            source = "metrics settings"
            raise ConfigError(source, [problem]) from err
        _LOG.info(
            "metrics endpoint listening host=%s port=%d path=/metrics",
            self.settings.host,
            self.port,
        )

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()


def _observer(histogram: Histogram) -> Callable[[float, int], None]:
    def observe(seconds: float, rows: int) -> None:
        histogram.observe(seconds)

    return observe
