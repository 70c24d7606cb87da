"""The agent: one model in service, three ways to ask it, telemetry about how it does."""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgekit import __version__
from edgekit.artifact import open_package
from edgekit.errors import (
    ArtifactError,
    EdgekitError,
    InputError,
    RuntimeBackendError,
    UsageError,
)
from edgekit.manifest import compare_versions
from edgekit.protocol import (
    MAX_EVENT_MESSAGE,
    DeviceState,
    ErrorCode,
    EventKind,
    EventLevel,
    EventPayload,
    Kind,
    MetricsPayload,
    RuntimeInfo,
    SamplePayload,
    encode,
    encode_array,
    topic,
)
from edgekit.runtimes import RuntimeOptions

from ._model import LoadedModel, ModelSlot, Prediction, TrustPolicy, load_model
from ._outbox import Outbox
from ._quality import LoggedPrediction, PredictionLog, QualityWindow, SampleGate
from ._shadow import ShadowRunner
from ._stats import RequestStats
from ._store import ModelStore, StoredPackage
from ._system import SystemSampler, hardware_info, runtime_info
from ._telemetry import build_metrics, build_status
from .config import AgentConfig, broker_address, http_address
from .errors import RequestError
from .ota import OtaSettings, Updater

__all__ = ["Agent", "Observer"]

Observer = Callable[[LoadedModel, float, "dict[str, np.ndarray] | None", "Exception | None"],
                    None]

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
        self.started = time.time()
        self.slot = ModelSlot()
        self.store = ModelStore(config.model.dir, keep=config.model.keep)
        self.trust = TrustPolicy.from_files(config.model.trusted_keys, config.model.allow_unsigned)
        self.runtime_options = RuntimeOptions(threads=config.runtime.threads,
                                              providers=list(config.runtime.providers))
        self.stats = RequestStats()
        self.predictions = PredictionLog(config.quality.prediction_log)
        self.window = QualityWindow(config.quality.window)
        self.samples = SampleGate(config.samples.fraction, config.samples.max_per_minute)
        self.class_totals: Counter[str] = Counter()
        self.system = SystemSampler(config.telemetry.thermal_dir)
        self.hardware = hardware_info()
        self.runtimes: list[RuntimeInfo] = []
        self.last_metrics: MetricsPayload | None = None
        self.http_address: str | None = None
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4) + "-"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_handle = _lock_state_dir(config.state_dir)
        self._tick_lock = threading.Lock()
        self._observers: list[Observer] = []
        # Set only while a candidate runs in shadow mode (device_agent.ota.shadow).
        self.shadow: ShadowRunner | None = None
        self.outbox: Outbox | None = None
        self.link: Any = None
        self.http: Any = None
        self.mqtt_api: Any = None
        if broker_address(config.mqtt) is not None:
            self.outbox = Outbox(config.state_dir / "telemetry.sqlite", config.telemetry.queue_max,
                                 config.telemetry.queue_max_bytes)
        self.slot.on_swap(self._on_swap)
        try:
            # The updater first undoes an update a crash interrupted after its switch, so
            # the model loaded next is one that passed its probation.
            self.ota = Updater(self, OtaSettings.from_config(config.ota))
            self._guard = self.ota.guard
            self.ota.recover()
            self._load_initial()
            # After the model's runtime is imported (it reports its providers then); the
            # others are read from package metadata, not imported.
            self.runtimes = runtime_info()
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

    def predict(self, inputs: Mapping[str, Any], *, channel: str = "python") -> Prediction:
        """Run the active model on ``inputs`` (input name -> array; ``x`` for one input).

        Raises:
            InputError: the inputs do not fit the manifest (the message lists every problem).
            RequestError: no model is active (code ``no_model``).
            RuntimeBackendError: the runtime failed; the agent keeps serving.
        """
        t0 = time.perf_counter()
        model = self.slot.current
        if model is None:
            self.stats.error(channel, ErrorCode.NO_MODEL.value)
            raise RequestError(ErrorCode.NO_MODEL, "no model is active on this device",
                               hint="start the agent with --model PKG, or deploy one")
        try:
            feeds = model.validator.check(inputs)
            guard = self._guard
            if guard.watch is None:
                outputs = model.session.run_checked(feeds)
            else:
                # In probation the guard watches the new model and answers with the previous
                # one when it fails; ``model`` is then the one that answered.
                model, outputs = guard.run(model, feeds)
        except InputError:
            self.stats.error(channel, ErrorCode.INVALID_INPUT.value)
            raise
        except RuntimeBackendError as exc:
            self.stats.error(channel, ErrorCode.INTERNAL.value)
            for observer in self._observers:
                observer(model, time.perf_counter() - t0, None, exc)
            raise
        latency = time.perf_counter() - t0
        pid = self._id_prefix + str(next(self._ids))
        scores = None
        if model.num_classes is not None:
            scores = outputs[model.primary_output].copy()
            kept = None
            if self.samples.enabled and self.samples.pick():
                kept = {k: np.array(v, copy=True) for k, v in feeds.items()}
            self.predictions.add(pid, LoggedPrediction(model.sha256, scores, kept))
        self.stats.record(channel, latency, scores)
        for observer in self._observers:
            observer(model, latency, outputs, None)
        shadow = self.shadow
        if shadow is not None:
            shadow.offer(pid, model, feeds, outputs, latency)
        return Prediction(pid, outputs, model, latency * 1000.0)

    def observe(self, observer: Observer) -> None:
        """Call ``observer(model, latency_s, outputs, error)`` after every request the model
        ran: ``outputs`` on success, ``error`` when the runtime failed (inputs refused by the
        manifest check never reach the model and are not reported). It runs on the request
        path, in the requesting thread: keep it short and do not raise. An update's
        probation watches the new model this way."""
        self._observers.append(observer)

    def feedback(self, prediction_id: str, label: int | str | None = None,
                 labels: list[int | str] | None = None) -> int:
        """Record the true class of an earlier prediction (``labels``: one per row).

        Returns the number of labelled rows.

        Raises:
            RequestError: unknown or already labelled prediction, a label that is not a
                class of the model, a row count that differs, a model that is no
                classifier, or a prediction made by a model no longer in service.
        """
        model = self.slot.current
        try:
            if model is None or model.num_classes is None:
                raise RequestError(ErrorCode.UNSUPPORTED, "feedback needs a classification model")
            if not isinstance(prediction_id, str) or not prediction_id:
                raise RequestError(ErrorCode.BAD_REQUEST,
                                   "prediction_id must be a non-empty string")
            entry = self.predictions.claim(prediction_id)
            try:
                if entry.model_sha256 != model.sha256:
                    raise RequestError(ErrorCode.UNSUPPORTED,
                                       f"prediction {prediction_id} was made by a model that is"
                                       " no longer in service; its label does not count")
                predicted = entry.classes()
                truth = _class_ids(model, label, labels, len(predicted))
            except RequestError:
                self.predictions.release(prediction_id)
                raise
        except RequestError:
            self.window.rejected()
            raise
        self.window.add(truth, predicted.tolist())
        shadow = self.shadow
        if shadow is not None:
            shadow.label(prediction_id, truth)
        if entry.inputs is not None and self.outbox is not None and self.samples.allow():
            self._queue_sample(prediction_id, model, entry.inputs, truth, predicted.tolist())
        return len(truth)

    # ------------------------------------------------------------------ models

    def activate(self, package: str | os.PathLike[str]) -> LoadedModel:
        """Verify and load a package, record it as active on disk, and swap it into service.

        Requests in flight finish on the old model; nothing fails during the swap.

        Raises:
            ArtifactError / SignatureError / RuntimeBackendError: the package is refused;
                the model in service stays.
        """
        stored = self.store.add(package)
        try:
            model = self._load(stored)
        except EdgekitError:
            self.store.discard(stored)
            raise
        self.store.activate(stored)
        self.slot.swap(model)
        return model

    def _load(self, stored: StoredPackage) -> LoadedModel:
        return load_model(stored.path, self.trust, self.runtime_options,
                          max_batch=self.config.requests.max_batch)

    def _load_initial(self) -> None:
        given = self.config.model.package
        try:
            record = self.store.active()
        except ArtifactError as exc:
            # Written atomically, so this takes a damaged disk or a hand edit; the folder's
            # packages are still there for the next update, and a given package still serves.
            self.event(EventKind.MODEL_LOAD_FAILED, EventLevel.ERROR, exc.message)
            record = None
        if given:
            manifest = open_package(given).manifest
            if record is None or compare_versions(manifest.version, record.active.version) > 0:
                self.activate(given)
                return
            log.info("the model folder's %s %s is not older than %s %s from model.package;"
                     " keeping it", record.active.name, record.active.version, manifest.name,
                     manifest.version)
        if record is None:
            self.event(EventKind.MODEL_MISSING, EventLevel.WARNING,
                       "no model is active; waiting for one to be deployed")
            return
        for i, candidate in enumerate((record.active, *record.previous)):
            try:
                model = self._load(candidate)
            except EdgekitError as exc:
                self.event(EventKind.MODEL_LOAD_FAILED, EventLevel.ERROR,
                           f"{candidate.name} {candidate.version} does not load: {exc.message}",
                           data={"package": candidate.path.name})
                continue
            if i > 0:
                # The active model is broken: the last known good one becomes active on disk
                # too, so what the folder says and what serves agree.
                self.store.activate(candidate, demote_current=False)
            self.slot.swap(model)
            return
        self.event(EventKind.MODEL_MISSING, EventLevel.ERROR,
                   "no model in the model folder loads; waiting for one to be deployed")

    def _on_swap(self, old: LoadedModel | None, new: LoadedModel) -> None:
        self.window.reset(new.num_classes, new.manifest.labels)
        self.event(EventKind.MODEL_ACTIVATED, EventLevel.INFO,
                   f"serving {new.name} {new.version}",
                   data={"model": new.ref.as_dict(), "signed": new.signed, "key_id": new.key_id,
                         "previous": old.ref.as_dict() if old is not None else None})
        if self.link is not None and self.link.connected:
            self.link.publish(self.status_topic, self.status_bytes(self.link.session,
                                                                   DeviceState.ONLINE, None),
                              retain=True)

    # ------------------------------------------------------------------ telemetry

    @property
    def status_topic(self) -> str:
        return topic(self.config.device.fleet, self.config.device.id, Kind.STATUS)

    def topic(self, kind: Kind) -> str:
        return topic(self.config.device.fleet, self.config.device.id, kind)

    def status_bytes(self, session: int, state: DeviceState, reason: str | None) -> bytes:
        return encode(build_status(self, session, state, reason))

    def event(self, kind: EventKind | str, level: EventLevel, message: str, *,
              reason: str | None = None, data: dict[str, Any] | None = None) -> None:
        """Log an event and queue it for the ``events`` topic."""
        log.log(logging.ERROR if level == EventLevel.ERROR else
                logging.WARNING if level == EventLevel.WARNING else logging.INFO, "%s", message)
        if self.outbox is None:
            return
        # ``session`` keys the event with ``seq`` on the host: the connection session the
        # agent is on (0 before the MQTT link starts).
        payload = EventPayload(device=self.config.device.id, fleet=self.config.device.fleet,
                               seq=0, ts=time.time(),
                               session=self.link.session if self.link is not None else 0,
                               kind=kind.value if isinstance(kind, EventKind) else kind,
                               level=level, message=message[:MAX_EVENT_MESSAGE],
                               reason=reason or None, data=data or None)
        self._queue(Kind.EVENTS, payload)

    def tick(self) -> MetricsPayload:
        """Close the telemetry interval, queue its metrics (with MQTT) and return them."""
        with self._tick_lock:
            metrics = build_metrics(self, self.stats.take())
            self.last_metrics = metrics
            if self.outbox is not None:
                self._queue(Kind.METRICS, metrics)
        return metrics

    def _queue(self, kind: Kind, payload: EventPayload | MetricsPayload | SamplePayload) -> int:
        """Queue ``payload`` with the next ``seq`` of its kind (set on it); return the seq."""
        assert self.outbox is not None

        def make(seq: int) -> bytes:
            payload.seq = seq
            return encode(payload)

        seq = self.outbox.put(self.topic(kind), make, f"seq.{kind.value}")
        if self.link is not None:
            self.link.notify()
        return seq

    def _queue_sample(self, pid: str, model: LoadedModel, inputs: dict[str, np.ndarray],
                      truth: list[int], predicted: list[int]) -> None:
        try:
            encoded = {k: encode_array(v) for k, v in inputs.items()}
        except EdgekitError as exc:
            log.warning("sample %s not sent: %s", pid, exc.message)
            return
        payload = SamplePayload(device=self.config.device.id, fleet=self.config.device.fleet,
                                seq=0, ts=time.time(), prediction_id=pid, model=model.ref,
                                inputs=encoded, label=truth, prediction=predicted)
        self._queue(Kind.SAMPLES, payload)

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
        from ._http import HttpApi
        from ._mqtt import MqttLink
        from ._mqtt_api import MqttApi

        cfg = self.config
        listen = http_address(cfg.http.listen)
        if listen is not None:
            self.http = HttpApi(self, listen)
            self.http_address = self.http.address
            self._spawn("http", self.http.serve)
            log.info("HTTP API on http://%s", self.http_address)
        address = broker_address(cfg.mqtt)
        if address is not None and self.outbox is not None:
            self.link = MqttLink(cfg, address, self.outbox, self.status_topic, self.status_bytes)
            self.mqtt_api = MqttApi(self, self.link)
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

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)


def _class_ids(model: LoadedModel, label: Any, labels: Any, rows: int) -> list[int]:
    if (label is None) == (labels is None):
        raise RequestError(ErrorCode.BAD_REQUEST, "give either 'label' or 'labels'")
    values = [label] if labels is None else labels
    if not isinstance(values, list) or len(values) != rows:
        raise RequestError(ErrorCode.BAD_REQUEST,
                           f"the prediction has {rows} row(s); give one label per row")
    names = model.manifest.labels or []
    n = model.num_classes or 0
    out = []
    for value in values:
        if isinstance(value, str) and value in names:
            value = names.index(value)
        elif isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or not 0 <= value < n:
            raise RequestError(ErrorCode.INVALID_INPUT,
                               f"label {value!r} is not a class of {model.name} (0..{n - 1}"
                               + (f" or one of {names}" if names else "") + ")")
        out.append(int(value))
    return out


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
