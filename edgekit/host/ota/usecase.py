"""The deploy use case: check first, then publish directly or through the controller, serve
the artifact, follow the devices, and undo the retained target when every device refused it.

The command line (``edgekit deploy``, ``edgekit rollback``) parses options and renders what
these functions return; nothing here prints. Callbacks report progress as it happens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError, ProtocolError, UsageError
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import ChangeCallback, Deployer, read_retained
from edgekit.host.ota.preflight import PreflightReport, preflight, read_fleet
from edgekit.host.ota.server import ArtifactHttpServer, ArtifactServer, probe_artifact
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.host.ota.tracker import DeployResult, Outcome
from edgekit.protocol import EventPayload, Kind, decode, parse_topic, subscription
from edgekit.protocol.ota.desired import DesiredDocument, parse_desired
from edgekit.protocol.ota.events import UpdateStep, update_data
from edgekit.protocol.ota.topics import desired_topic
from edgekit.protocol.signed import is_sealed, open_sealed

__all__ = [
    "ControllerOutcome",
    "DirectOutcome",
    "check_before_deploy",
    "controllers_for",
    "current_model_name",
    "deploy_direct",
    "deploy_via_controller",
    "start_artifact_server",
    "start_http",
]

log = logging.getLogger("edgekit.deploy")
_FAILED = (Outcome.FAILED, Outcome.ROLLED_BACK)


def check_before_deploy(client: HostClient, fleet: str, info: ArtifactInfo, *,
                        devices: list[str] | None, signed_rollback: bool, force: bool,
                        empty_fleet_ok: bool = False) -> PreflightReport:
    """Run :func:`~edgekit.host.ota.preflight.preflight` on the fleet's retained statuses.

    Raises:
        PreflightError: a finding refuses the deploy and ``force`` is not set.
        EdgekitError: the broker did not answer.
    """
    report = preflight(fleet, info, read_fleet(client, fleet), devices=devices,
                       signed_rollback=signed_rollback, empty_fleet_ok=empty_fleet_ok)
    if not force:
        report.raise_if_refused()
    return report


def current_model_name(client: HostClient, fleet: str, devices: list[str] | None,
                       key: Ed25519PrivateKey) -> str:
    """The model name the devices' (else the fleet's) retained desired document names, read
    only from a document signed by our own operator ``key`` (anyone can publish one; the
    name read here is signed into a downgrade).

    Raises:
        UsageError: no desired document signed by ``key`` names one.
    """
    topics = [desired_topic(fleet, d) for d in devices or []] + [desired_topic(fleet)]
    for topic in topics:
        payload = read_retained(client, topic).get(topic)
        if payload and is_sealed(payload):
            try:
                inner = open_sealed(payload, [key.public_key()]).payload
                return parse_desired(inner).model.name
            except EdgekitError:
                continue
    raise UsageError("no desired document names the model to roll back",
                     hint="pass --name NAME or --package PKG")


def start_artifact_server(client: HostClient, store: ArtifactStore, fleets: list[str],
                          share_group: str) -> ArtifactServer:
    """Serve ``store`` to ``fleets`` and check requests arrive (see
    :meth:`ArtifactServer.ensure_reachable`).

    Raises:
        EdgekitError: requests do not reach the server.
    """
    group: str | None = None if share_group.lower() == "none" else share_group
    server = ArtifactServer(client, store, fleets=fleets, share_group=group)
    server.ensure_reachable()
    return server


def start_http(store: ArtifactStore, addr: str | None, cert: str | None,
               key: str | None) -> ArtifactHttpServer | None:
    """Serve ``store`` over HTTP(S) at ``HOST:PORT`` (None: not at all).

    Raises:
        UsageError: ``addr`` is not HOST:PORT.
    """
    if not addr:
        return None
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--http {addr!r} is not HOST:PORT")
    return ArtifactHttpServer(store, host, int(port), certfile=cert, keyfile=key).start()


@dataclass
class DirectOutcome:
    """What a direct deploy did: the topics, whether someone else served the artifact, the
    result (None with ``no_wait``) and whether the previous desired documents came back."""

    document: DesiredDocument
    topics: list[str]
    served_elsewhere: bool
    result: DeployResult | None = None
    restored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result is None or self.result.ok


def deploy_direct(client: HostClient, fleet: str, devices: list[str] | None,
                  doc: DesiredDocument, key: Ed25519PrivateKey, store: ArtifactStore, share_group: str, *,
                  timeout: float, no_wait: bool, include_offline: bool,
                  on_change: ChangeCallback | None = None,
                  restore_on_failure: bool = True) -> DirectOutcome:
    """Publish ``doc`` (retained), serve the artifact unless a server already answers for
    it, and follow the targets. When every target failed or rolled back, the desired
    documents from before are put back (or cleared), so no device that joins later picks
    up a package the fleet refused.

    Raises:
        EdgekitError: the broker did not answer or acknowledge.
    """
    deployer = Deployer(client, fleet, doc, key, devices=devices,
                        include_offline=include_offline, on_change=on_change)
    sha = doc.model.sha256
    served = sha is None or not store.infos() or doc.sources.mqtt is None \
        or probe_artifact(client, fleet, sha)
    topics = ([desired_topic(fleet, d) for d in deployer.devices] if deployer.devices
              else [desired_topic(fleet)])
    previous = {t: read_retained(client, t).get(t) for t in topics} if restore_on_failure \
        else {}
    if not no_wait:
        deployer.discover()
        if not served:
            start_artifact_server(client, store, [fleet], share_group)
    published = deployer.publish()
    outcome = DirectOutcome(doc, published, served)
    if no_wait:
        return outcome
    try:
        outcome.result = deployer.wait(timeout)
    finally:
        deployer.close()
    targets = outcome.result.targets.values()
    if restore_on_failure and targets and all(p.outcome in _FAILED for p in targets):
        outcome.restored = _restore(client, previous)
    return outcome


def _restore(client: HostClient, previous: dict[str, bytes | None]) -> list[str]:
    """Publish the earlier retained payloads again (an empty one clears a topic).

    Raises:
        EdgekitError: the broker did not acknowledge within 10 s.
    """
    infos = [(t, client.publish(t, payload or b"", qos=1, retain=True))
             for t, payload in previous.items()]
    for topic_name, info in infos:
        info.wait_for_publish(10.0)
        if not info.is_published():
            raise EdgekitError(f"the broker did not acknowledge restoring {topic_name}")
    return [t for t, _ in infos]


@dataclass
class DeviceReason:
    """The last thing a device said about a controller rollout's deployment."""

    step: str
    reason: str | None
    message: str


@dataclass
class ControllerOutcome:
    """A rollout the controller ran for ``edgekit deploy``."""

    rollout: dict[str, Any]
    state: str
    final: dict[str, Any] | None
    devices: dict[str, DeviceReason] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"

    @property
    def still_running(self) -> bool:
        return self.final is not None and self.final["state"] in (
            "running", "pending", "aborting", "paused")


class _RolloutEvents:
    """Collects the ``update.*`` events of one rollout's deployments (ids ``r<id>-...``),
    so a failed rollout can say each device's reason (``older_version``, ...)."""

    def __init__(self, client: HostClient, fleet: str) -> None:
        self.client = client
        self.filter = subscription(fleet, "+", Kind.EVENTS)
        self.prefix: str | None = None
        self.devices: dict[str, DeviceReason] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> _RolloutEvents:
        self.client.subscribe(self.filter, self._on_event)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.unsubscribe(self.filter, self._on_event)

    def snapshot(self) -> dict[str, DeviceReason]:
        with self._lock:
            return dict(self.devices)

    def _on_event(self, msg: mqtt.MQTTMessage) -> None:
        parts = parse_topic(msg.topic)
        if parts is None or self.prefix is None:
            return
        try:
            doc = decode(msg.payload, EventPayload)
            data = update_data(doc)
        except ProtocolError as exc:
            log.warning("ignored a message on %s: %s", msg.topic, exc.message)
            return
        if data is None or not data.deployment.startswith(self.prefix):
            return
        step = data.step
        with self._lock:
            if step in (UpdateStep.FAILED, UpdateStep.ROLLED_BACK, UpdateStep.SUCCEEDED) or \
                    parts.device not in self.devices:
                self.devices[parts.device] = DeviceReason(step.value, doc.reason,
                                                          doc.message[:300])


def controllers_for(client: HostClient, fleet: str) -> list[str]:
    """The ids of the controllers that look after ``fleet`` (from their retained presence).

    Raises:
        EdgekitError: the broker did not answer.
    """
    from edgekit.host.controller.remote import find_controllers

    return [p.id for p in find_controllers(client, fleet)]


def deploy_via_controller(client: HostClient, fleet: str, info: ArtifactInfo,
                          key: Ed25519PrivateKey, *,
                          devices: list[str] | None, plan: dict[str, Any], timeout: float,
                          no_wait: bool,
                          on_created: Callable[[dict[str, Any], list[str]], None] | None = None,
                          on_state: Callable[[Any], None] | None = None
                          ) -> ControllerOutcome | None:
    """Ask the controller that looks after ``fleet`` for a rollout of the registered
    ``info.name:info.version``, in a request signed by the operator ``key`` (a request names
    a registry model, never a file), and follow it.

    Returns None when no controller does (the caller then deploys directly).

    Raises:
        RemoteRolloutError: the controller refused the rollout.
        EdgekitError: the controller did not answer.
    """
    from edgekit.host.controller.remote import (
        find_controllers,
        follow_rollout,
        request_rollout,
    )

    found = find_controllers(client, fleet)
    if not found:
        return None
    with _RolloutEvents(client, fleet) as events:
        rollout = dict(request_rollout(
            client, fleet, key, name=info.name, version=info.version, sha256=info.sha256,
            devices=devices, plan=plan))
        events.prefix = f"r{int(rollout['id'])}-"
        if on_created is not None:
            on_created(rollout, [p.id for p in found])
        if no_wait:
            return ControllerOutcome(rollout, str(rollout["state"]), None)
        final = follow_rollout(client, fleet, int(rollout["id"]), timeout, on_state)
        state = final.state if final else str(rollout["state"])
        reasons = events.snapshot()
    return ControllerOutcome(rollout, state, msgspec.to_builtins(final) if final else None,
                             reasons)
