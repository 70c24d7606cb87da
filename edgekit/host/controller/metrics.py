"""Prometheus metrics of a running controller, through prometheus_client.

``edgekit controller run --metrics HOST:PORT`` serves them at ``http://HOST:PORT/metrics``;
``--metrics-file PATH`` writes them for node_exporter's textfile collector instead (every
tick, atomically). Counters are cumulative since the controller started; the control-loop
pass duration is a histogram in seconds (docs/controller.md lists every metric).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from edgekit.errors import UsageError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from edgekit.host.controller.service import Controller

__all__ = ["ControllerMetrics"]

# Seconds; a pass is milliseconds on a quiet fleet and seconds with a busy database.
_STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ControllerMetrics:
    """The registry of one controller's metrics, and where they are exposed."""

    def __init__(self, controller: Controller) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.controller = controller
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(controller))
        self.step_seconds = Histogram(
            "edgekit_controller_step_seconds", "Duration of one control-loop pass.",
            buckets=_STEP_BUCKETS, registry=self.registry)
        self._server: Any = None

    def instrument(self) -> None:
        """Time every control-loop pass (call before :meth:`Controller.start`)."""
        step: Callable[[], None] = self.controller.step

        @functools.wraps(step)
        def timed() -> None:
            with self.step_seconds.time():
                step()

        self.controller.step = timed  # type: ignore[method-assign]

    def text(self) -> bytes:
        """The exposition, as Prometheus scrapes it."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def serve(self, address: str) -> None:
        """Serve ``/metrics`` on ``HOST:PORT`` in a background thread.

        Raises:
            UsageError: the address is not HOST:PORT or cannot be bound.
        """
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--metrics {address!r} is not HOST:PORT",
                             hint="for example 127.0.0.1:9464")
        try:
            self._server, _ = start_http_server(int(port), host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {address}: {exc.strerror or exc}",
                             hint="choose a free port") from exc

    def write_file(self, path: str) -> None:
        """Write the exposition to ``path`` atomically (textfile collector format).

        Raises:
            OutputWriteError: the file cannot be written.
        """
        from edgekit.fsutil import write_bytes_atomic

        write_bytes_atomic(path, self.text())

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Collector:
    """Reads the controller's counters at scrape time."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ctl = self.controller
        status = ctl.status()
        yield GaugeMetricFamily("edgekit_controller_up_seconds",
                                "Seconds since the controller started.",
                                value=time.time() - ctl.started)
        ingest = status.get("ingest") or {}
        for key, help_text in (("received", "Device messages received"),
                               ("stored", "Device messages written to the database"),
                               ("duplicates", "Duplicate messages dropped (at-least-once)"),
                               ("rejected", "Messages refused as malformed or oversized"),
                               ("failed", "Messages that could not be stored")):
            family = CounterMetricFamily(f"edgekit_controller_messages_{key}",
                                         f"{help_text}, by kind.", labels=["kind"])
            for kind, count in sorted((ingest.get(key) or {}).items()):
                family.add_metric([kind], count)
            yield family
        yield GaugeMetricFamily("edgekit_controller_ingest_backlog",
                                "Messages waiting to be written.", value=status["backlog"])
        yield CounterMetricFamily("edgekit_controller_loop_errors",
                                  "Control-loop passes that failed (logged).",
                                  value=status["errors"])
        artifacts = status.get("artifacts") or {}
        for key, help_text in (("requests", "Artifact chunk requests answered"),
                               ("bytes", "Artifact bytes sent"),
                               ("errors", "Artifact requests refused")):
            yield CounterMetricFamily(f"edgekit_controller_artifact_{key}", f"{help_text}.",
                                      value=artifacts.get(key, 0))
