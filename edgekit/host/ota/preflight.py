"""Checks before a deploy, against what the fleet's devices last said (their retained status).

A device refuses a package that is older than what it runs (without a signed rollback
instruction) or that none of its keys signed; a fleet or a device that never reported
cannot update at all. Saying so before publishing beats a retained desired document that
every device refuses, and a wait that can only time out. Each finding is a refusal unless
the deploy is forced (``--force``), or a warning when it is only worth knowing.

Nothing here talks to the broker: :func:`read_fleet` gathers the retained statuses once,
:func:`preflight` judges them. Status payloads come from the network: every field is
checked for its type before use, and a payload that does not fit is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekit.errors import ArtifactError, EdgekitError, ProtocolError
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.store import ArtifactInfo
from edgekit.manifest import compare_versions
from edgekit.protocol import DeviceState, Kind, StatusPayload, decode, parse_topic, subscription

__all__ = ["DeviceView", "Finding", "PreflightError", "PreflightReport", "preflight",
           "read_fleet"]

# Statuses are small documents; a bigger one is not a status.


class PreflightError(EdgekitError):
    """A deploy refused before anything was published (exit 1); ``--force`` overrides."""


@dataclass(frozen=True)
class Finding:
    """One thing the pre-flight noticed. ``code`` is stable (see docs/ota.md)."""

    code: str  # unknown_fleet | unknown_device | older_version | name_change | untrusted_key
    message: str
    device: str | None = None
    refuse: bool = True


@dataclass
class DeviceView:
    """What a device's retained status says, typed."""

    device: str
    state: str
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None  # of the package it serves (a delta's possible base)
    trusted_keys: list[str] | None = None  # None: the agent does not report them
    allow_unsigned: bool = False


@dataclass
class PreflightReport:
    """The findings; ``refusals`` stop the deploy unless it is forced."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def refusals(self) -> list[Finding]:
        return [f for f in self.findings if f.refuse]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.refuse]

    def raise_if_refused(self) -> None:
        """Raises:
            PreflightError: any finding refuses the deploy; the message lists them all.
        """
        refusals = self.refusals
        if refusals:
            lines = "\n  - ".join(f.message for f in refusals)
            raise PreflightError(
                f"deploy refused before publishing anything:\n  - {lines}",
                hint="fix what is listed, or pass --force to publish anyway")


def read_fleet(client: HostClient, fleet: str, timeout: float = 5.0) -> dict[str, DeviceView]:
    """The fleet's devices from their retained status, by device id.

    Raises:
        EdgekitError: the broker did not answer within ``timeout`` seconds.
    """
    from edgekit.host.ota.deploy import read_retained

    views = {}
    for topic_name, payload in read_retained(
            client, subscription(fleet, "+", Kind.STATUS), timeout).items():
        parts = parse_topic(topic_name)
        if parts is None or parts.device.startswith("_"):
            continue
        view = parse_status(parts.device, payload)
        if view is not None:
            views[parts.device] = view
    return views


def parse_status(device: str, payload: bytes) -> DeviceView | None:
    """A :class:`DeviceView` from a status payload; None when it does not fit its schema."""
    try:
        doc = decode(payload, StatusPayload)
    except ProtocolError:
        return None
    view = DeviceView(device=device, state=doc.state.value)
    if doc.model is not None:
        view.model_name, view.model_version = doc.model.name, doc.model.version
        view.model_sha256 = doc.model.sha256
    view.trusted_keys = list(doc.trusted_keys) if doc.trusted_keys is not None else None
    view.allow_unsigned = doc.allow_unsigned
    return view


def preflight(fleet: str, info: ArtifactInfo, views: dict[str, DeviceView], *,
              devices: list[str] | None, signed_rollback: bool = False,
              empty_fleet_ok: bool = False) -> PreflightReport:
    """Judge a deploy of ``info`` to ``devices`` (None: the whole fleet).

    ``empty_fleet_ok`` makes a fleet without devices a warning, not a refusal: when a
    controller looks after the fleet (it decides), or when the document is published for
    devices still to come (``--no-wait``).
    """
    report = PreflightReport()
    if not views:
        report.findings.append(Finding(
            "unknown_fleet", f"fleet {fleet!r} has no device that ever reported a status"
                             " (check --fleet and that the agents connect to this broker)",
            refuse=not empty_fleet_ok))
        return report
    targets: list[DeviceView] = []
    for device in devices or []:
        if device in views:
            targets.append(views[device])
        else:
            report.findings.append(Finding(
                "unknown_device", f"device {device!r} has never reported in fleet {fleet!r}"
                                  f" (known: {_some(sorted(views))})", device))
    if devices is None:
        targets = [v for v in views.values() if v.state == DeviceState.ONLINE] or \
            list(views.values())
    for view in targets:
        report.findings.extend(_judge(view, info, signed_rollback))
    return report


def _judge(view: DeviceView, info: ArtifactInfo, signed_rollback: bool) -> list[Finding]:
    found = []
    if view.model_name is not None and view.model_name != info.name:
        found.append(Finding(
            "name_change", f"{view.device} serves model {view.model_name!r}; the package is"
                           f" named {info.name!r} (a new name starts a new version line;"
                           " pass --name when converting to keep the old one)", view.device))
    elif view.model_version is not None and _older(info.version, view.model_version):
        found.append(Finding(
            "older_version", f"{view.device} runs {info.name} {view.model_version}, newer than"
                             f" {info.version}: it refuses an older version"
                             + (" (a signed rollback is attached)" if signed_rollback else
                                " (use `edgekit rollback`, or deploy with --sign-key)"),
            view.device, refuse=not signed_rollback))
    if view.trusted_keys is not None and not view.allow_unsigned:
        if info.key_id is None:
            found.append(Finding("untrusted_key", f"{view.device} accepts only signed packages"
                                 f" and the package is unsigned (edgekit sign PKG --key KEY)",
                                 view.device))
        elif info.key_id not in view.trusted_keys:
            found.append(Finding(
                "untrusted_key", f"{view.device} does not trust key {info.key_id} that signed"
                                 f" the package (it trusts: {_some(view.trusted_keys) or 'none'})",
                view.device))
    return found


def _older(version: str, than: str) -> bool:
    try:
        return compare_versions(version, than) < 0
    except ArtifactError:
        return False  # a device reporting a malformed version cannot decide for us


def _some(items: list[str], limit: int = 5) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... (+{len(items) - limit})" if len(items) > limit else "")
