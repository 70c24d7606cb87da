"""The agent: one model in service, three ways to ask it, telemetry about how it does.

:class:`Agent` wires the parts and owns their lifecycle; each part depends only on the
narrow pieces it is given:

- :class:`~device_agent._slot.ModelSlot`: the model in service on disk and in memory; every
  switch (activate, start, probation, rollback) goes through it;
- :class:`~device_agent._predict.Predictor`: the request path (predict, feedback, observers);
- :class:`~device_agent._events.EventSink`: events, metrics and samples into the outbox;
- :class:`~device_agent._status.StatusPublisher`: the retained status, built in one place;
- :class:`~device_agent.ota.Updater`: OTA updates, on the slot, the sink and the publisher;
- the HTTP API, the MQTT link and its request API, opened by :meth:`Agent.start`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from edgekit import __version__
from edgekit.errors import UsageError
from edgekit.protocol import ErrorCode, EventKind, EventLevel, Kind, MetricsPayload
from edgekit.runtimes import RuntimeOptions

from ._events import EventSink
from ._http import HttpApi
from ._model import LoadedModel, Prediction, TrustPolicy
from ._mqtt import MqttLink, keep_large_buffers
from ._mqtt_api import MqttApi
from ._outbox import Outbox
from ._predict import Observer, Predictor
from ._quality import PredictionLog, QualityWindow, SampleGate
from ._slot import ModelLoader, ModelSlot
from ._stats import RequestStats
from ._status import StatusPublisher
from ._store import ModelStore
from ._system import SystemSampler, hardware_info, runtime_info
from ._telemetry import build_metrics, prometheus_text
from .config import AgentConfig, broker_address, http_address
from .ota import OtaSettings, Updater

__all__ = ["Agent"]

log = logging.getLogger("device_agent")


class Agent:
    """The device agent. ``Agent(config)`` loads the model; :meth:`start` opens the HTTP
    API, the MQTT link and telemetry as configured; :meth:`stop` closes them cleanly.

    Embedding applications call :meth:`predict` and :meth:`feedback` directly.
    """

    def __init__(self, config: AgentConfig) -> None:
        """Raises:
        ArtifactError / SignatureError: the package given in ``model.package`` is refused.
        RuntimeBackendError: that package cannot be loaded by any runtime here.
        OutputWriteError: the model or state folder cannot be written.
        UsageError: another agent holds the state folder.
        """
        self.config = config
        self.version = __version__
        trust = TrustPolicy.from_files(config.model.trusted_keys, config.model.allow_unsigned)
        options = RuntimeOptions(threads=config.runtime.threads,
                                 providers=list(config.runtime.providers))
        self.slot = ModelSlot(ModelStore(config.model.dir, keep=config.model.keep),
                              ModelLoader(trust, options, config.requests.max_batch))
        self.stats = RequestStats()
        self.window = QualityWindow(config.quality.window)
        self.class_totals: Counter[str] = Counter()
        self.system = SystemSampler(config.telemetry.thermal_dir)
        self.last_metrics: MetricsPayload | None = None
        self.link: MqttLink | None = None
        self.http: HttpApi | None = None
        self.mqtt_api: MqttApi | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tick_lock = threading.Lock()
        self._lock_handle = _lock_state_dir(config.state_dir)
        self.outbox: Outbox | None = None
        if broker_address(config.mqtt) is not None:
            self.outbox = Outbox(config.state_dir / "telemetry.sqlite", config.telemetry.queue_max,
                                 config.telemetry.queue_max_bytes)
        self.events = EventSink(config.device, self.outbox)
        self.status = StatusPublisher(config.device, self.version, self.slot, trust,
                                      hardware_info())
        self.predictor = Predictor(self.slot, self.stats,
                                   PredictionLog(config.quality.prediction_log), self.window,
                                   SampleGate(config.samples.fraction,
                                              config.samples.max_per_minute),
                                   self.events, config.device)
        # The request path's own method, bound once: an embedding application's call costs
        # no extra Python frame (the method below documents it and behaves the same).
        self.predict = self.predictor.predict  # type: ignore[method-assign]
        self.slot.on_swap(self._on_swap)
        try:
            # The updater first undoes an update a crash interrupted after its switch, so
            # the model loaded next is one that passed its probation.
            self.ota = Updater(self.slot, self.events, self.status,
                               OtaSettings.from_config(config.ota), config.state_dir,
                               config.device, self.predictor)
            self.status.update_section = self.ota.status_section
            self.ota.recover()
            self.slot.restore(config.model.package, self.events)
            # After the model's runtime is imported (it reports its providers then); the
            # others are read from package metadata, not imported.
            self.status.runtimes = runtime_info()
        except BaseException:
            if self.outbox is not None:
                self.outbox.close()
            self._lock_handle.close()
            raise

    # ------------------------------------------------------------------ serving

    @property
    def model(self) -> LoadedModel | None:
        """The model in service (None until one is active)."""
        return self.slot.current

    @property
    def started(self) -> float:
        """When the agent started (seconds since the epoch)."""
        return self.status.started

    @property
    def http_address(self) -> str | None:
        """The HTTP API's bound address once started (None without one)."""
        return self.status.http_address

    def predict(self, inputs: Mapping[str, Any], *, channel: str = "python") -> Prediction:
        """Run the active model on ``inputs`` (input name -> array; ``x`` for one input).

        Raises:
            InputError: the inputs do not fit the manifest (the message lists every problem).
            RequestError: no model is active (code ``no_model``).
            RuntimeBackendError: the runtime failed; the agent keeps serving.
        """
        return self.predictor.predict(inputs, channel)

    def observe(self, observer: Observer) -> None:
        """Call ``observer(served)`` after every request the model ran, with a
        :class:`~device_agent._predict.Served` (``outputs`` on success, ``error`` when the
        runtime failed; inputs refused by the manifest check never reach the model and are
        not reported). It runs on the request path, in the requesting thread: keep it short
        (hand heavier work to a thread of your own) and do not raise."""
        self.predictor.observe(observer)

    def feedback(self, prediction_id: str, label: int | str | None = None,
                 labels: list[int | str] | None = None) -> int:
        """Record the true class of an earlier prediction (``labels``: one per row).

        Returns the number of labelled rows.

        Raises:
            RequestError: unknown or already labelled prediction, a label that is not a
                class of the model, a row count that differs, a model that is no
                classifier, or a prediction made by a model no longer in service.
        """
        return self.predictor.feedback(prediction_id, label, labels)

    def activate(self, package: str | os.PathLike[str]) -> LoadedModel:
        """Verify and load a package, record it as active on disk, and swap it into service.

        Requests in flight finish on the old model; nothing fails during the swap.

        Raises:
            ArtifactError / SignatureError / RuntimeBackendError: the package is refused;
                the model in service stays.
        """
        return self.slot.activate(package)

    def _on_swap(self, old: LoadedModel | None, new: LoadedModel) -> None:
        self.window.reset(new.num_classes, new.manifest.labels)
        self.event(EventKind.MODEL_ACTIVATED, EventLevel.INFO,
                   f"serving {new.name} {new.version}",
                   data={"model": new.ref.as_dict(), "signed": new.signed, "key_id": new.key_id,
                         "previous": old.ref.as_dict() if old is not None else None})
        self.status.publish()

    # ------------------------------------------------------------------ telemetry

    def event(self, kind: EventKind | str, level: EventLevel, message: str, *,
              reason: str | None = None, data: dict[str, Any] | None = None) -> None:
        """Log an event and queue it for the ``events`` topic."""
        self.events.event(kind, level, message, reason=reason, data=data)

    def tick(self) -> MetricsPayload:
        """Close the telemetry interval, queue its metrics (with MQTT) and return them."""
        with self._tick_lock:
            metrics = build_metrics(self, self.stats.take())
            self.last_metrics = metrics
            self.events.queue(Kind.METRICS, metrics)
        return metrics

    def _health(self) -> tuple[bool, dict[str, Any]]:
        model = self.slot.current
        link = self.link
        return model is not None, {
            "status": "ok" if model is not None else ErrorCode.NO_MODEL.value,
            "model": model.ref if model is not None else None,
            # Present only for a package of variants: which one serves and why.
            **({"variant": model.variant} if model is not None and model.variant else {}),
            "mqtt": None if link is None else ("connected" if link.connected
                                               else "disconnected"),
            "uptime_s": round(time.time() - self.started, 3),
            "version": self.version,
        }

    def _metrics_text(self) -> str:
        last = self.last_metrics if self.config.telemetry.interval_s > 0 else self.tick()
        return prometheus_text(self, last)

    def _telemetry_loop(self, interval: float) -> None:
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += interval
            try:
                self.tick()
            except Exception:
                log.exception("telemetry tick failed; trying again next interval")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the HTTP API, connect to the broker and start telemetry, as configured.

        Raises:
            UsageError: the HTTP address cannot be bound.
        """
        cfg = self.config
        listen = http_address(cfg.http.listen)
        if listen is not None:
            self.http = HttpApi(self.predictor, cfg.http, listen, self._health,
                                self._metrics_text)
            self.status.http_address = self.http.address
            self._spawn("http", self.http.serve)
            log.info("HTTP API on http://%s", self.http.address)
        address = broker_address(cfg.mqtt)
        if address is not None and self.outbox is not None:
            # Artifact chunks arrive as 1 MiB messages: reuse their memory, do not fault it
            # in again for every chunk.
            keep_large_buffers()
            self.link = MqttLink(cfg, address, self.outbox, self.status.topic,
                                 self.status.encoded)
            self.mqtt_api = MqttApi(self.predictor, self.link, cfg.requests,
                                    (self.events.topic(Kind.PREDICT),
                                     self.events.topic(Kind.FEEDBACK)))
        self.events.attach(self.link)
        self.status.attach(self.link)
        self.ota.start(self.link)  # subscribes before the link connects
        if self.link is not None:
            self.link.start()
        if cfg.telemetry.interval_s > 0:
            self._spawn("telemetry", self._telemetry_loop, cfg.telemetry.interval_s)
        self.event(EventKind.AGENT_STARTED, EventLevel.INFO,
                   f"agent {self.version} started as {cfg.device.fleet}/{cfg.device.id}")

    def stop(self) -> None:
        """Stop taking requests, send the last partial interval's metrics, say ``stopped`` on
        the status topic and close the link (the queue gets a few seconds to drain)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.ota.stop()
        for thread in self._threads:
            if thread.name == "telemetry":
                thread.join(timeout=5)
        if self.mqtt_api is not None:
            self.mqtt_api.close()
        if self.http is not None:
            self.http.close()
        if self.outbox is not None and self.config.telemetry.interval_s > 0:
            try:
                self.tick()  # the requests since the last tick are counted too
            except Exception:
                log.exception("the last telemetry tick failed")
        if self.link is not None:
            self.link.stop()
        if self.outbox is not None:
            self.outbox.close()
        self._lock_handle.close()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)


def _lock_state_dir(state_dir: Path) -> IO[str]:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(state_dir / "agent.lock", "w")  # noqa: SIM115 (held for the agent's life)
    except OSError as exc:
        raise UsageError(f"cannot use the state folder {state_dir}: {exc.strerror}",
                         hint="give a writable folder in agent.state_dir") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise UsageError(f"another agent is running with the state folder {state_dir}",
                         hint="stop it, or give this one its own --model-dir") from exc
    return handle
