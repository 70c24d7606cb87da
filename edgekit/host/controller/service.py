"""The running controller: ingest, rollouts, the maintenance policy and artifact serving.

:class:`Controller` ties the parts together on one MQTT connection and one database::

    cfg = load_config("controller.toml")          # or load_config(overrides={...})
    with Controller(cfg) as controller:           # connects, subscribes, starts its threads
        controller.wait(stop_event)               # or do other work; leaving the block stops it

Threads: paho's network thread (messages are only queued there), the ingest workers (write
to the database), the control loop (rollouts each ``controller.tick_s``, the policy each
``policy.interval_s``, rollout requests, artifact refresh) and, while one runs, the policy's
maintenance job. :meth:`Controller.stop` releases the rollouts and policy leases this
controller holds, so another controller (or this one, restarted) carries on at once, and
clears its retained presence; a controller that dies leaves that to its last will and to
the leases' expiry.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgekit.errors import EdgekitError, ProtocolError, SignatureError, UsageError
from edgekit.host.controller.config import ControllerConfig
from edgekit.host.controller.ingest import Ingest
from edgekit.host.controller.policy import MaintenancePolicy
from edgekit.host.controller.rollout import RolloutEngine
from edgekit.host.db import Store
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.server import ArtifactHttpServer, ArtifactServer
from edgekit.host.ota.store import ArtifactStore
from edgekit.host.registry import Registry, default_store_dir
from edgekit.protocol import ROOT, Document, EventPayload, encode
from edgekit.protocol.controller import (
    ReplyError,
    RolloutReply,
    RolloutRequest,
    make_presence,
    open_rollout_request,
    peek_reply_to,
    presence_topic,
    rollout_request_topic,
)
from edgekit.protocol.ota.topics import shared
from edgekit.signing import key_id, load_private_key, load_public_key

__all__ = ["Controller"]

log = logging.getLogger("edgekit.controller")

_ARTIFACT_REFRESH_S = 5.0


class Controller:
    """One controller process; see the module docstring."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.id = config.controller.id
        self.started = time.time()
        self.store: Store | None = None
        self.client: HostClient | None = None
        self.ingest: Ingest | None = None
        self.engine: RolloutEngine | None = None
        self.policy: MaintenancePolicy | None = None
        self.server: ArtifactServer | None = None
        self.http: ArtifactHttpServer | None = None
        self.errors = 0  # loop passes that failed (logged)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loop: threading.Thread | None = None
        self._requests: queue.Queue[tuple[str, RolloutRequest]] = queue.Queue(1000)
        self.registry: Registry | None = None
        self.trusted: list[Any] = []  # release keys a rolled-out package must be signed by
        self.operators: list[Any] = []  # operator keys that sign remote requests
        self.refused = 0  # remote requests refused (unsigned, untrusted, stale, invalid)
        self._served_models = -1
        self._next_refresh = 0.0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Controller:
        """Open the database, connect to the broker, subscribe and start the threads.

        Raises:
            ConfigError / StoreError: the database URL is wrong or the database unreachable.
            EdgekitError: the broker cannot be reached or refused the connection.
            UsageError: the signing key or a trusted key cannot be read.
        """
        cfg = self.config
        try:
            self._open(cfg)
        except BaseException:
            self._close()
            raise
        self._loop = threading.Thread(target=self._run_loop, name="edgekit-controller",
                                      daemon=True)
        self._loop.start()
        log.info("controller %s running for fleets %s", self.id, ", ".join(cfg.controller.fleets))
        return self

    def _open(self, cfg: ControllerConfig) -> None:
        c, m = cfg.controller, cfg.mqtt
        signing_key = load_private_key(c.signing_key) if c.signing_key else None
        release_key = load_private_key(c.release_key) if c.release_key else None
        self.trusted = [load_public_key(p) for p in cfg.registry.trusted_keys]
        self.operators = [load_public_key(p) for p in c.operator_keys]
        self.store = Store(cfg.database.url or None)
        registry = Registry(self.store, cfg.registry.store or None)
        self.registry = registry
        self.client = HostClient(m.broker,
                                 client_id=m.client_id or f"edgekit-controller-{self.id}",
                                 ca_file=m.ca_file or None, cert_file=m.cert_file or None,
                                 key_file=m.key_file or None, keepalive=m.keepalive_s,
                                 username=m.username or None, password=m.password or None)
        # A controller that dies clears its presence: an empty retained will deletes it.
        self.client.paho.will_set(presence_topic(self.id), None, qos=1, retain=True)
        self.client.on_connected(self._announce)
        self.client.connect()
        fleets = c.fleets
        if cfg.serve.mqtt:
            self.server = ArtifactServer(self.client, ArtifactStore(), fleets=fleets,
                                         share_group=cfg.serve.share_group or None,
                                         max_chunk=cfg.serve.max_chunk)
        url_for = None
        if cfg.serve.http_listen:
            host, port = cfg.serve.http_listen.rsplit(":", 1)
            store = self.server.store if self.server is not None else ArtifactStore()
            self.http = ArtifactHttpServer(store, host, int(port),
                                           public_url=cfg.serve.http_public_url or None).start()
            url_for = self.http.url_for
        workdir = (Path(c.workdir) if c.workdir else
                   Path(cfg.registry.store or default_store_dir()) / ".controller").expanduser()
        self.engine = RolloutEngine(self.store, registry, self.client, cfg.rollout,
                                    controller_id=self.id, lease_s=c.lease_s, fleets=fleets,
                                    server=self.server, signing_key=signing_key,
                                    url_for=url_for, delta_dir=workdir / "deltas")
        if cfg.policy.enabled:
            self.policy = MaintenancePolicy(self.store, registry, self.engine, cfg.policy,
                                            controller_id=self.id, fleets=fleets,
                                            workdir=workdir, lease_s=c.lease_s,
                                            signing_key=release_key)
        self.ingest = Ingest(self.store, self.client, fleets=fleets,
                             share_group=cfg.share_group, workers=cfg.ingest.workers,
                             queue_max=cfg.ingest.queue_max, samples=cfg.ingest.samples)
        self.ingest.listeners.append(self._on_stored)
        self.ingest.start()
        for fleet in fleets:
            self.client.subscribe(shared(rollout_request_topic(fleet), cfg.share_group),
                                  self._on_request, qos=1)
        self._sync()

    def _sync(self, timeout: float = 10.0) -> None:
        """Return once the broker has processed our subscriptions: a marker we publish after
        them coming back means they are in. amqtt handles a client's packets concurrently,
        so the marker's own subscription is awaited first and the marker is published again
        until it arrives."""
        assert self.client is not None
        marker = f"{ROOT}/_controllers/{self.id}/sync/{secrets.token_hex(4)}"
        done = threading.Event()
        self.client.subscribe(marker, lambda _msg: done.set(), qos=1, wait=timeout)
        deadline = time.monotonic() + timeout
        try:
            while not done.is_set():
                if time.monotonic() > deadline:
                    raise EdgekitError(f"the broker at {self.client.broker} did not answer"
                                       f" within {timeout:g} s")
                self.client.publish(marker, b"1", qos=1)
                done.wait(0.5)
        finally:
            self.client.unsubscribe(marker)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the loop, write what the ingest holds, release leases, disconnect."""
        self._stop.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join(timeout)
        if self.policy is not None:
            self.policy.wait_idle(timeout)
        self._close()

    def _close(self) -> None:
        if self.ingest is not None:
            self.ingest.stop()
        if self.store is not None:
            for release in (self.engine.release_all if self.engine else None,
                            self.policy.release if self.policy else None):
                if release is None:
                    continue
                try:
                    release()
                except EdgekitError as exc:
                    log.warning("could not release leases: %s", exc.message)
        if self.http is not None:
            self.http.stop()
        if self.client is not None:
            if self.client.connected.is_set():
                try:
                    self.client.publish(presence_topic(self.id), None, qos=1, retain=True,
                                        wait=5.0)
                except EdgekitError:
                    pass  # the last will clears the presence when the broker notices
            self.client.close()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, stop: threading.Event | None = None) -> None:
        """Block until ``stop`` is set (or :meth:`stop` is called from another thread)."""
        while not self._stop.is_set():
            if stop is not None and stop.wait(0.5):
                return
            if stop is None:
                self._stop.wait(0.5)

    def wake(self) -> None:
        """Run the control loop now instead of at the next tick."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """Counters for tests, benchmarks and logs."""
        return {"id": self.id, "ingest": self.ingest.stats.to_dict() if self.ingest else {},
                "backlog": self.ingest.backlog if self.ingest else 0, "errors": self.errors,
                "requests_refused": self.refused,
                "artifacts": vars(self.server.stats) if self.server else {}}

    # ---------------------------------------------------------------- control loop

    def _run_loop(self) -> None:
        tick = self.config.controller.tick_s
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.step()

    def step(self) -> None:
        """One pass of the control loop (the loop calls it; tests may too)."""
        for work in (self._handle_requests, self._refresh_artifacts, self._tick_rollouts,
                     self._tick_policy):
            try:
                work()
            except EdgekitError as exc:
                self.errors += 1
                log.error("%s", exc.format())
            except Exception:
                self.errors += 1
                log.exception("control loop step failed")

    def _tick_rollouts(self) -> None:
        assert self.engine is not None
        self.engine.tick()

    def _tick_policy(self) -> None:
        if self.policy is not None:
            self.policy.tick()

    def _refresh_artifacts(self) -> None:
        """Serve every registered package (devices that join later fetch the fleet's model)."""
        if self.server is None or time.monotonic() < self._next_refresh:
            return
        self._next_refresh = time.monotonic() + _ARTIFACT_REFRESH_S
        assert self.store is not None and self.registry is not None
        models = self.store.list_models()
        if len(models) == self._served_models:
            return
        for record in models:
            if self.server.store.get(record.sha256) is None:
                path = self.registry.path_of(record)
                if path.is_file():
                    self.server.serve(path)
        if self._served_models <= 0 and self.server.store.infos():
            # Brokers without shared subscriptions (amqtt) need plain ones: find out once.
            self.server.ensure_reachable()
        self._served_models = len(models)

    def _on_stored(self, kind: str, fleet: str, device: str, doc: Document) -> None:
        # An update outcome may let a rollout move on: do not wait for the next tick.
        if isinstance(doc, EventPayload) and doc.kind.startswith("update."):
            self._wake.set()

    def _announce(self) -> None:
        assert self.client is not None
        payload = make_presence(self.id, self.config.controller.fleets, self.started)
        self.client.publish(presence_topic(self.id), encode(payload), qos=1, retain=True)

    # ---------------------------------------------------------------- rollout requests

    def _on_request(self, msg: mqtt.MQTTMessage) -> None:
        fleet = msg.topic.split("/")[2]
        data = bytes(msg.payload)
        try:
            request = open_rollout_request(data, self.operators, fleet)
        except (ProtocolError, SignatureError) as exc:
            # Refused before anything of it is used; answered only on a reply topic of the
            # controller's own pattern for that fleet.
            self.refused += 1
            log.warning("refused a rollout request on %s: %s", msg.topic, exc.message)
            peeked = peek_reply_to(data)
            if peeked is not None and peeked[1].split("/")[2] == fleet:
                self._send_reply(peeked[0], peeked[1], error=exc)
            return
        try:
            self._requests.put_nowait((fleet, request))
        except queue.Full:
            self._reply(request, error=UsageError("the controller is busy; try again"))
            return
        self._wake.set()

    def _handle_requests(self) -> None:
        while True:
            try:
                fleet, request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                rollout = self.request_rollout(fleet, request)
            except EdgekitError as exc:
                self._reply(request, error=exc)
                continue
            self._reply(request, rollout=rollout)

    def request_rollout(self, fleet: str, request: RolloutRequest) -> dict[str, Any]:
        """Carry out a signed request: create the rollout it asks for (``rollout``, or
        ``rollback``: a rollout back to the model deployed before), or abort a rollout
        (``abort``); a request seen before gets the rollout it made. Return the rollout as
        the reply shows it.

        Raises:
            UsageError: the model is not registered, its sha256 differs, it is not signed by
                a key of registry.trusted_keys (when set), or the fleet has another active
                rollout; for an abort or a roll back, the rollout is not one this action
                applies to (see :meth:`RolloutEngine.abort`, :meth:`RolloutEngine.roll_back`).
        """
        assert self.engine is not None and self.store is not None and self.registry is not None
        found = self.engine.find_request(fleet, request.request_id)
        name, version = request.name, request.version
        target = request.rollout_id  # set on every abort and rollback (parse_rollout_request)
        if request.action == "abort":
            assert target is not None
            found = self.engine.abort(fleet, target, name=name, version=version,
                                      request_id=request.request_id)
        elif request.action == "rollback" and found is None:
            assert target is not None
            found = self.engine.roll_back(fleet, target, name=name, version=version,
                                          request_id=request.request_id)
        elif found is None:
            record = self.store.get_model(name, version)
            if record is None:
                raise UsageError(f"model {name}:{version} is not in the controller's registry",
                                 hint="push it with `edgekit registry push` (same --db as the"
                                      " controller)")
            sha = request.sha256
            if sha and sha != record.sha256:
                raise UsageError(f"{record.ref} is registered with another package (sha256"
                                 f" {record.sha256[:12]}..., the request names {sha[:12]}...)",
                                 hint="give the new package a higher version")
            if self.trusted and record.key_id not in {key_id(k) for k in self.trusted}:
                raise UsageError(f"{record.ref} is not signed by a key of"
                                 " registry.trusted_keys", hint="sign it with a release key")
            found = self.engine.create(fleet, name, version, devices=request.devices,
                                       overrides=request.plan, source="deploy",
                                       request_id=request.request_id)
        targets = self.store.list_rollout_targets(found.id)
        return {**found.to_dict(), "targets": [t.device for t in targets]}

    def _reply(self, request: RolloutRequest, *, rollout: dict[str, Any] | None = None,
               error: EdgekitError | None = None) -> None:
        self._send_reply(request.request_id, request.reply_to, rollout=rollout,
                         error=error)

    def _send_reply(self, request_id: str, reply_to: str, *,
                    rollout: dict[str, Any] | None = None,
                    error: EdgekitError | None = None) -> None:
        assert self.client is not None
        reply = RolloutReply(request_id=request_id, ok=error is None, rollout=rollout,
                             error=None if error is None else ReplyError(
                                 code=type(error).__name__, message=error.message,
                                 hint=error.hint or ""))
        self.client.publish(reply_to, encode(reply), qos=1)
