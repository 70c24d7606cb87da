"""The desired documents a rollout publishes: ask devices to update, send them back, hand
the fleet its new model, and clear per-device documents when a rollout ends.

Every document is signed with the controller's operator key (``controller.signing_key``) and
bound to the fleet and the devices it is for. Sending a device back never names a version
from what the device reported: the document is a *revert* of the rollout's own package
(recorded in the rollout's plan when the controller created it), and the device returns to
the model it kept from before (docs/ota.md). A roll back of the fleet (an operator's
``rollback`` request) is a rollout to the model of the controller's previous rollout; its
documents allow the downgrade or the name change it needs, nothing more.

Documents that ask devices to update offer deltas (``edgekit.delta/1``, docs/ota.md) from
each package the devices serve that the registry holds, as ``edgekit deploy`` does: built
once per (base, target) pair, served beside the package, and listed only when smaller than
it (``rollout.deltas`` turns them off).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError, UsageError
from edgekit.host.db import RolloutRecord, TargetRecord
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.delta import DeltaFile, deltas_for
from edgekit.host.ota.deploy import delta_source, desired_for_package
from edgekit.host.ota.server import ArtifactServer
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.host.registry import Registry
from edgekit.protocol.controller import deployment_id
from edgekit.protocol.ota.desired import (
    DeltaSource,
    DesiredDocument,
    Probation,
    make_desired,
    seal_desired,
)
from edgekit.protocol.ota.shadow import ShadowSpec
from edgekit.protocol.ota.topics import desired_topic

__all__ = ["DesiredDocuments"]

log = logging.getLogger("edgekit.controller.rollout")

_PUBLISH_WAIT_S = 10.0


class DesiredDocuments:
    """Builds and publishes (retained) the desired documents of rollouts.

    ``server`` (optional) serves each artifact a document names; ``url_for`` adds an HTTP
    URL; ``signing_key`` (the operator key) signs every document: without it nothing is
    published. Deltas are written into ``delta_dir`` (None: a temporary folder); they are
    offered only where ``server`` serves them.
    """

    def __init__(self, registry: Registry, client: HostClient, *,
                 server: ArtifactServer | None = None,
                 signing_key: Ed25519PrivateKey | None = None,
                 url_for: Callable[[str], str] | None = None,
                 delta_dir: Path | None = None) -> None:
        self.registry = registry
        self.client = client
        self.server = server
        self.signing_key = signing_key
        self.url_for = url_for
        self._artifacts = server.store if server is not None else ArtifactStore()
        self._delta_dir = delta_dir
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._deltas: dict[tuple[str, str], DeltaFile | None] = {}  # (base, target) sha256

    def ask(self, rollout: RolloutRecord, devices: list[str], *,
            bases: Iterable[str] = ()) -> list[DeltaSource]:
        """Ask ``devices`` to run the rollout's model (per-device documents), offering a
        delta from each of ``bases`` (sha256 of the packages they serve) where one helps;
        return the deltas offered.

        Raises:
            EdgekitError: the broker did not acknowledge them in time.
        """
        info = self.artifact(rollout.model_name, rollout.model_version)
        deltas = self.deltas(rollout, info, bases)
        payload = self._seal(self._document(rollout, info, devices=sorted(devices),
                                            deltas=deltas))
        sent = [self.client.publish(desired_topic(rollout.fleet, d), payload, qos=1,
                                    retain=True) for d in devices]
        for device, message in zip(devices, sent, strict=True):
            try:
                message.wait_for_publish(_PUBLISH_WAIT_S)
            except (RuntimeError, ValueError) as exc:
                raise EdgekitError(f"could not publish the desired document of {device}:"
                                   f" {exc}") from exc
            if not message.is_published():
                raise EdgekitError(f"the broker did not acknowledge the desired document of"
                                   f" {device} within {_PUBLISH_WAIT_S:g} s")
        return deltas

    def deltas(self, rollout: RolloutRecord, info: ArtifactInfo,
               bases: Iterable[str]) -> list[DeltaSource]:
        """The delta entries to offer for ``info``: one from each of ``bases`` that the
        registry holds, when the delta is small enough to help (:func:`deltas_for`). None
        when the rollout's plan turns deltas off or no server here serves them. A delta that
        cannot be built is logged and left out: the full package is always offered."""
        if not rollout.plan.get("deltas", True) or self.server is None:
            return []
        entries = []
        for base in sorted(set(bases) - {info.sha256}):
            key = (base, info.sha256)
            if key not in self._deltas:
                self._deltas[key] = self._build_delta(base, info)
            delta = self._deltas[key]
            if delta is not None:
                url = self.url_for(delta.sha256) if self.url_for is not None else None
                entries.append(delta_source(delta, rollout.fleet, url=url))
        return entries

    def _build_delta(self, base: str, info: ArtifactInfo) -> DeltaFile | None:
        assert self.server is not None
        found = [self.registry.path_of(m) for m in self.registry.list_models()
                 if m.sha256 == base]
        if not found:
            return None  # a package the registry does not hold: nothing to build from
        if self._delta_dir is None:
            self._scratch = self._scratch or tempfile.TemporaryDirectory(
                prefix="edgekit-deltas-")
            folder = Path(self._scratch.name)
        else:
            folder = self._delta_dir
        try:
            built = deltas_for(info.path, found, [base], folder)
            if not built:
                return None
            self.server.serve_delta(built[0], info)
        except EdgekitError as exc:
            log.warning("no delta from %s to %s %s: %s", base[:12], info.name, info.version,
                        exc.message)
            return None
        return built[0]

    def ask_shadow(self, rollout: RolloutRecord, devices: list[str], spec: ShadowSpec) -> None:
        """Ask ``devices`` to shadow the rollout's model (per-device documents of the
        ``-shadow`` deployment: they verify it and run it beside their own, never serve it).

        Raises:
            EdgekitError: the broker did not acknowledge them in time.
        """
        info = self.artifact(rollout.model_name, rollout.model_version)
        url = self.url_for(info.sha256) if self.url_for is not None else None
        doc = desired_for_package(
            info, rollout.fleet, devices=sorted(devices), url=url, shadow=spec,
            deployment=deployment_id(rollout.id, rollout.plan["token"], shadow=True))
        payload = self._seal(doc)
        for device in devices:
            self.client.publish(desired_topic(rollout.fleet, device), payload, qos=1,
                                retain=True, wait=_PUBLISH_WAIT_S)

    def publish_fleet(self, rollout: RolloutRecord, *, bases: Iterable[str] = ()) -> None:
        """Make the rollout's model the fleet's (devices that join later get it too, with
        a delta from each of ``bases`` where one helps).

        Raises:
            EdgekitError: the broker did not acknowledge it in time.
        """
        info = self.artifact(rollout.model_name, rollout.model_version)
        doc = self._document(rollout, info, devices=None,
                             deltas=self.deltas(rollout, info, bases))
        self.client.publish(desired_topic(rollout.fleet), self._seal(doc), qos=1,
                            retain=True, wait=_PUBLISH_WAIT_S)

    def clear(self, rollout: RolloutRecord, devices: list[str]) -> None:
        """Remove per-device documents: the devices follow the fleet's document again."""
        for device in devices:
            self.client.publish(desired_topic(rollout.fleet, device), b"", qos=1, retain=True)

    def send_back(self, rollout: RolloutRecord, target: TargetRecord) -> None:
        """Send one device back to the model it ran before the rollout: a signed revert of
        the rollout's package, for this device only, that allows the downgrade (and a name
        change) and expires after :data:`~edgekit.protocol.ota.ROLLBACK_TTL_S` (a day).

        Raises:
            UsageError: there is no signing key.
            EdgekitError: the broker did not acknowledge the document in time.
        """
        model = rollout.plan["model"]
        doc = make_desired(deployment=deployment_id(rollout.id, rollout.plan["token"],
                                                     back=True),
                           fleet=rollout.fleet, devices=[target.device], name=model["name"],
                           version=model["version"], sha256=model["sha256"],
                           size=model["size"], revert=True, allow_downgrade=True,
                           allow_rename=True, probation=_probation(rollout))
        self.client.publish(desired_topic(rollout.fleet, target.device), self._seal(doc),
                            qos=1, retain=True, wait=_PUBLISH_WAIT_S)

    def artifact(self, name: str, version: str) -> ArtifactInfo:
        """The registered package, served by the artifact server when there is one.

        Raises:
            UsageError: the version is not registered.
            ArtifactError: its package file is missing.
        """
        record = self.registry.get(name, version)
        known = self._artifacts.get(record.sha256)
        if known is not None:
            return known
        path = self.registry.artifact_path(name, version)
        if self.server is not None:
            return self.server.serve(path)
        return self._artifacts.add(path)

    def _seal(self, doc: DesiredDocument) -> bytes:
        if self.signing_key is None:
            raise UsageError("no controller.signing_key to sign desired documents with",
                             hint="set controller.signing_key to an operator key the devices"
                                  " trust (ota.intent_keys)")
        return seal_desired(doc, self.signing_key)

    def _document(self, rollout: RolloutRecord, info: ArtifactInfo, *,
                  devices: list[str] | None,
                  deltas: list[DeltaSource] | None = None) -> DesiredDocument:
        url = self.url_for(info.sha256) if self.url_for is not None else None
        # A roll back (a rollout the controller made to the model it deployed before) may
        # go to an older version or another name; the plan says so, never a request.
        back = rollout.plan.get("back") or {}
        return desired_for_package(
            info, rollout.fleet, devices=devices, url=url, deltas=deltas or None,
            probation=_probation(rollout),
            deployment=deployment_id(rollout.id, rollout.plan["token"]),
            allow_downgrade=bool(back.get("allow_downgrade")),
            allow_rename=bool(back.get("allow_rename")))


def _probation(rollout: RolloutRecord) -> Probation:
    plan = rollout.plan
    return Probation(requests=int(plan["probation_requests"]),
                     seconds=float(plan["probation_seconds"]), max_error_rate=0.0,
                     max_nonfinite_rate=0.0, max_latency_ms=None)
