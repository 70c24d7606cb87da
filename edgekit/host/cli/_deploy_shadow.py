"""``edgekit deploy PKG --shadow``: the devices judge a candidate beside the model they serve.

The command publishes a shadow desired document (:mod:`edgekit.protocol.ota.shadow`), serves
the package, waits for every target's ``update.shadowed`` report, prints the reports as a
table (or ``--json``), and then puts back the desired document from before: the devices
never served the candidate, and devices that join later must not shadow it either.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError, UsageError
from edgekit.host.cli._app import emit_json
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import desired_for_package, read_retained
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.host.ota.tracker import DeployResult, DeviceProgress
from edgekit.host.ota.usecase import deploy_direct
from edgekit.protocol.ota.desired import DesiredDocument
from edgekit.protocol.ota.shadow import ShadowReport, ShadowSpec, make_shadow
from edgekit.protocol.ota.topics import desired_topic

__all__ = ["run_shadow", "shadow_options", "shadow_plan", "shadow_spec", "shadow_table"]

_OPTIONS = [
    click.option("--shadow", is_flag=True,
                 help="Do not activate PACKAGE: devices verify it, run it beside the model"
                      " they serve on a sample of live requests, and report agreement,"
                      " accuracy, confidence and latency of both, printed as a table (exit 0"
                      " when every target reported); the model in service never changes."
                      " Through a controller, the rollout gets a shadow stage before its"
                      " canary (docs/ota.md)."),
    click.option("--shadow-requests", type=click.IntRange(1, 1_000_000), default=200,
                 show_default=True, help="Shadowed requests after which a device reports."),
    click.option("--shadow-sample", type=click.FloatRange(0, 1, min_open=True), default=0.2,
                 show_default=True, help="Share of live requests the candidate also runs."),
]


def shadow_options(fn: Any) -> Any:
    """The ``--shadow*`` options of ``edgekit deploy``."""
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def shadow_spec(requests: int, sample: float, timeout: float) -> ShadowSpec:
    """The ``shadow`` field; a device gives up at the deploy's own timeout.

    Raises:
        UsageError: a value is out of range.
    """
    try:
        return make_shadow(requests, sample, max(1.0, timeout))
    except EdgekitError as exc:
        raise UsageError(exc.message, hint=exc.hint) from exc


def shadow_plan(shadow: bool, requests: int, sample: float) -> dict[str, Any]:
    """The rollout plan overrides that give a controller's rollout a shadow stage (none
    without ``shadow``)."""
    if not shadow:
        return {}
    return {"shadow_enabled": True, "shadow_requests": requests, "shadow_sample": sample}


def run_shadow(client: HostClient, fleet: str, devices: list[str] | None, info: ArtifactInfo,
               key: Ed25519PrivateKey, store: ArtifactStore, share_group: str,
               http_server: Any, url: str | None, timeout: float, include_offline: bool,
               as_json: bool, quiet: bool, *, spec: ShadowSpec) -> int:
    """Shadow ``info`` on the targets (downloads from ``url``, else ``http_server`` when
    there is one, else MQTT), print their reports; the exit code (0: every target
    reported).

    Raises:
        EdgekitError: the broker did not answer or acknowledge.
    """
    from edgekit.host.cli._deploy import ProgressView

    url = url or (http_server.url_for(info.sha256) if http_server else None)
    on_change = None if quiet else ProgressView(sys.stderr).update
    doc = desired_for_package(info, fleet, devices=devices, url=url, shadow=spec)
    topics = [desired_topic(fleet, d) for d in devices] if devices else [desired_topic(fleet)]
    previous = {t: read_retained(client, t).get(t) for t in topics}
    outcome = deploy_direct(client, fleet, devices, doc, key, store, share_group,
                            timeout=timeout, no_wait=False, include_offline=include_offline,
                            on_change=on_change, restore_on_failure=False)
    _put_back(client, previous)
    result = outcome.result
    assert result is not None
    if as_json:
        emit_json({**result.to_dict(), "shadow": msgspec.to_builtins(spec)})
    else:
        click.echo(_headline(doc, result))
        click.echo(shadow_table(result.targets))
    return 0 if result.ok else 1


def _put_back(client: HostClient, previous: dict[str, bytes | None]) -> None:
    for topic, payload in previous.items():
        client.publish(topic, payload or b"", qos=1, retain=True, wait=10.0)


def _headline(doc: DesiredDocument, result: DeployResult) -> str:
    model = doc.model
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result.counts().items())) or "no targets"
    return (f"{result.deployment}: shadow of {model.name} {model.version} on fleet"
            f" {result.fleet}: {counts} ({result.elapsed_s:.1f} s)")


def shadow_table(targets: dict[str, DeviceProgress]) -> str:
    """One row per device: what its shadow report says (serving -> candidate)."""
    head = ("device", "outcome", "shadowed", "dropped", "agreement", "labelled",
            "accuracy", "f1", "confidence", "p95 ms", "ended")
    rows: list[tuple[str, ...]] = [head]
    for device, progress in sorted(targets.items()):
        report = progress.shadow
        outcome = progress.outcome.value if progress.outcome else "pending"
        if report is None:
            note = f"[{progress.reason}] {progress.message}" if progress.reason else \
                progress.message
            rows.append((device, outcome, "-", "-", "-", "-", "-", "-", "-", "-",
                         note.strip() or "-"))
            continue
        rows.append(_row(device, outcome, report))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
                     + "  " + r[-1] for r in rows)


def _row(device: str, outcome: str, r: ShadowReport) -> tuple[str, ...]:
    s, c = r.serving, r.candidate
    return (device, outcome, f"{r.requests}/{r.target}", str(r.dropped), _num(r.agreement),
            str(r.labelled), _pair(s.accuracy, c.accuracy), _pair(s.f1, c.f1),
            _pair(s.confidence, c.confidence),
            _pair(s.latency_p95_ms, c.latency_p95_ms, digits=2), r.ended)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(serving: float | None, candidate: float | None, digits: int = 3) -> str:
    return f"{_num(serving, digits)} -> {_num(candidate, digits)}"
