"""The desired documents a rollout publishes: ask devices to update, send them back, hand
the fleet its new model, and clear per-device documents when a rollout ends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError, UsageError
from edgekit.host.db import RolloutRecord, TargetRecord
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import desired_for_package
from edgekit.host.ota.server import ArtifactServer
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.host.registry import Registry
from edgekit.manifest import compare_versions
from edgekit.protocol.controller import deployment_id
from edgekit.protocol.ota.desired import DesiredDocument, Probation, encode_desired, make_desired
from edgekit.protocol.ota.rollback import sign_rollback
from edgekit.protocol.ota.topics import desired_topic

__all__ = ["DesiredDocuments"]

_PUBLISH_WAIT_S = 10.0


class DesiredDocuments:
    """Builds and publishes (retained) the desired documents of rollouts.

    ``server`` (optional) serves each artifact a document names; ``url_for`` adds an HTTP
    URL; ``signing_key`` signs the rollback instructions that let devices go back.
    """

    def __init__(self, registry: Registry, client: HostClient, *,
                 server: ArtifactServer | None = None,
                 signing_key: Ed25519PrivateKey | None = None,
                 url_for: Callable[[str], str] | None = None) -> None:
        self.registry = registry
        self.client = client
        self.server = server
        self.signing_key = signing_key
        self.url_for = url_for
        self._artifacts = server.store if server is not None else ArtifactStore()

    def ask(self, rollout: RolloutRecord, devices: list[str]) -> None:
        """Ask ``devices`` to run the rollout's model (per-device documents); a rollout back
        to an older version carries a signed rollback instruction for them.

        Raises:
            EdgekitError: the broker did not acknowledge them in time.
        """
        info = self.artifact(rollout.model_name, rollout.model_version)
        payload = encode_desired(self._document(rollout, info, back=False,
                                                rollback=self._downgrade(rollout, info, devices)))
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

    def publish_fleet(self, rollout: RolloutRecord) -> None:
        """Make the rollout's model the fleet's (devices that join later get it too).

        Raises:
            EdgekitError: the broker did not acknowledge it in time.
        """
        info = self.artifact(rollout.model_name, rollout.model_version)
        doc = self._document(rollout, info, back=False)
        self.client.publish(desired_topic(rollout.fleet), encode_desired(doc), qos=1,
                            retain=True, wait=_PUBLISH_WAIT_S)

    def clear(self, rollout: RolloutRecord, devices: list[str]) -> None:
        """Remove per-device documents: the devices follow the fleet's document again."""
        for device in devices:
            self.client.publish(desired_topic(rollout.fleet, device), b"", qos=1, retain=True)

    def send_back(self, rollout: RolloutRecord, target: TargetRecord) -> None:
        """Send one device back to the model it ran before the rollout, with a signed
        rollback instruction (devices refuse an older version without one).

        Raises:
            UsageError: the device ran no model before, or there is no signing key.
            EdgekitError: the broker did not acknowledge the document in time.
        """
        doc = self._rollback_document(rollout, target)
        self.client.publish(desired_topic(rollout.fleet, target.device), encode_desired(doc),
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

    def _downgrade(self, rollout: RolloutRecord, info: ArtifactInfo,
                   devices: list[str]) -> Any:
        """A signed rollback instruction for those of ``devices`` that ran a newer version of
        the model before the rollout (a rollout back to an older registered version); None
        when none did, or without a signing key (those devices then refuse the older version
        and the rollout's failure criteria apply)."""
        previous = rollout.plan.get("previous") or {}
        newer = [d for d in devices
                 if (p := previous.get(d) or {}).get("name") == rollout.model_name
                 and isinstance(p.get("version"), str)
                 and compare_versions(rollout.model_version, p["version"]) < 0]
        if not newer or self.signing_key is None:
            return None
        return sign_rollback(self.signing_key, fleet=rollout.fleet, devices=newer,
                             name=rollout.model_name, to_version=rollout.model_version,
                             sha256=info.sha256)

    def _rollback_document(self, rollout: RolloutRecord,
                           target: TargetRecord) -> DesiredDocument:
        previous = rollout.plan["previous"].get(target.device) or {}
        name = previous.get("name")
        version = previous.get("version") or target.previous_version
        if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
            raise UsageError("it ran no model before the rollout")
        if self.signing_key is None:
            raise UsageError("no controller.signing_key to sign the rollback instruction",
                             hint="set controller.signing_key to a key the devices trust")
        registered = self.registry.store.get_model(name, version)
        info = None
        if registered is not None and registered.sha256 == previous.get("sha256"):
            info = self.artifact(name, version)
        instruction = sign_rollback(self.signing_key, fleet=rollout.fleet,
                                    devices=[target.device], name=name, to_version=version,
                                    sha256=info.sha256 if info else None)
        if info is not None:
            return self._document(rollout, info, back=True, rollback=instruction)
        return make_desired(deployment=deployment_id(rollout.id, rollout.plan["token"],
                                                     back=True),
                            name=name, version=version, sha256=None, size=None,
                            rollback=instruction, probation=_probation(rollout))

    def _document(self, rollout: RolloutRecord, info: ArtifactInfo, *, back: bool,
                  rollback: Any = None) -> DesiredDocument:
        url = self.url_for(info.sha256) if self.url_for is not None else None
        return desired_for_package(
            info, rollout.fleet, url=url, rollback=rollback, probation=_probation(rollout),
            deployment=deployment_id(rollout.id, rollout.plan["token"], back=back))


def _probation(rollout: RolloutRecord) -> Probation:
    plan = rollout.plan
    return Probation(requests=int(plan["probation_requests"]),
                     seconds=float(plan["probation_seconds"]), max_error_rate=0.0,
                     max_nonfinite_rate=0.0, max_latency_ms=None)
