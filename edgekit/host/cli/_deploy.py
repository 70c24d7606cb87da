"""``edgekit deploy`` and ``edgekit rollback``: over-the-air updates."""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, TextIO

import click
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import EdgekitError, UsageError
from edgekit.host.cli._app import cli, emit_json
from edgekit.host.cli._deploy_shadow import run_shadow, shadow_options, shadow_plan, shadow_spec
from edgekit.host.cli._mqtt_options import MqttAuth, mqtt_options
from edgekit.host.keys import operator_key
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.delta import offer_deltas
from edgekit.host.ota.deploy import desired_for_package
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.host.ota.tracker import DeploymentTracker, DeployResult, DeviceProgress, Outcome
from edgekit.host.ota.usecase import (
    check_before_deploy,
    controllers_for,
    current_model_name,
    deploy_direct,
    deploy_via_controller,
    start_http,
)
from edgekit.manifest import parse_version
from edgekit.protocol import check_id
from edgekit.protocol.controller import RolloutStatePayload
from edgekit.protocol.ota.desired import (
    DEFAULT_PROBATION,
    DesiredDocument,
    Probation,
    make_desired,
    new_deployment_id,
)
from edgekit.protocol.ota.topics import DEFAULT_SHARE_GROUP
from edgekit.protocol.ota.transfer import MAX_KBPS, Transfer, make_transfer

BROKER_OPTION = click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
                       envvar="EDGEKIT_MQTT_BROKER",
                       help="Broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
                            " (env EDGEKIT_MQTT_BROKER).")
KEY_OPTION = click.option(
    "--key", "--sign-key", "key_path", type=click.Path(dir_okay=False),
    help="Operator private key that signs the desired document or request (devices trust it"
         " as ota.intent_keys); default: $EDGEKIT_OPERATOR_KEY, else ./edgekit-operator.key.")
SHARE_OPTION = click.option("--share-group", default=DEFAULT_SHARE_GROUP, show_default=True,
                      help="Shared-subscription group of the artifact servers, so several"
                           " split the requests; 'none' for plain subscriptions. When the"
                           " broker does not deliver shared subscriptions, plain ones are"
                           " used.")


# --------------------------------------------------------------------------- deploy

_FOLLOW_OPTIONS = [
    click.option("--device", "devices", multiple=True,
                 help="Target this device only (repeatable); default: the whole fleet."),
    BROKER_OPTION,
    click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=1),
                 help="Seconds to wait for the targets."),
    click.option("--no-wait", is_flag=True,
                 help="Publish the desired document and return at once."),
    click.option("--include-offline", is_flag=True,
                 help="Fleet-wide: wait for offline devices too (they time out unless they"
                      " come back)."),
    click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON."),
    click.option("--quiet", is_flag=True, help="No progress lines on stderr."),
]


def _follow_options(fn: Any) -> Any:
    for option in reversed(_FOLLOW_OPTIONS):
        fn = option(fn)
    return fn


_PROBATION_OPTIONS = [
    click.option("--probation-requests", type=click.IntRange(min=0),
                 default=DEFAULT_PROBATION.requests, show_default=True,
                 help="Probation passes after this many requests (0: not used)."),
    click.option("--probation-seconds", type=click.FloatRange(min=0),
                 default=DEFAULT_PROBATION.seconds, show_default=True,
                 help="... or after this many seconds of serving (0: not used)."),
    click.option("--max-error-rate", type=click.FloatRange(0, 1),
                 default=DEFAULT_PROBATION.max_error_rate, show_default=True,
                 help="Probation: roll back when more requests than this share fail."),
    click.option("--max-latency-ms", type=click.FloatRange(min=0),
                 help="Probation: roll back when p95 latency goes over this."),
]


def _probation_options(fn: Any) -> Any:
    for option in reversed(_PROBATION_OPTIONS):
        fn = option(fn)
    return fn


def _probation(requests: int, seconds: float, max_error_rate: float,
               max_latency_ms: float | None) -> Probation:
    return Probation(requests=requests, seconds=seconds, max_error_rate=max_error_rate,
                     max_nonfinite_rate=DEFAULT_PROBATION.max_nonfinite_rate,
                     max_latency_ms=max_latency_ms)


@cli.command()
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("--fleet", required=True, help="Fleet to update.")
@_follow_options
@KEY_OPTION
@click.option("--allow-downgrade", is_flag=True,
              help="Let devices go to PACKAGE even when it is not newer than what they"
                   " committed (signed into the document; it expires after a day).")
@click.option("--allow-rename", is_flag=True,
              help="Let devices switch to PACKAGE even when it is another model (name).")
@click.option("--url", help="Where devices download PACKAGE over HTTP(S) instead of MQTT.")
@click.option("--http", "http_addr", metavar="HOST:PORT",
              help="Serve PACKAGE over HTTP here while waiting, and name that URL.")
@click.option("--allow-breaking", is_flag=True,
              help="Accept changed inputs/outputs when the manifest marks the change breaking.")
@click.option("--delta-from", "delta_from", multiple=True, type=click.Path(dir_okay=False),
              help="A package devices may serve now: offer a delta from it (repeatable;"
                   " the .edgepkg files next to PACKAGE are candidates too).")
@click.option("--no-delta", is_flag=True, help="Offer no deltas, only the full package.")
@click.option("--latency-budget-ms", type=click.FloatRange(min=0),
              help="Staging: refuse the model when its mean latency on the golden samples is"
                   " over this.")
@_probation_options
@click.option("--max-kbps", type=click.IntRange(1, MAX_KBPS),
              help="Thin links: devices ask for chunks at most this many kbit/s (signed into"
                   " the document; a device's own ota.max_kbps may be lower).")
@click.option("--window", "window", metavar="HH:MM-HH:MM",
              help="Thin links: devices download only in this window of their local time"
                   " (22:00-06:00 runs over midnight; a device's ota.maintenance_window wins).")
@SHARE_OPTION
@click.option("--direct", is_flag=True,
              help="Publish to the fleet at once even when a controller looks after it"
                   " (without --direct such a deploy becomes a controller rollout: canary,"
                   " waves, abort criteria).")
@shadow_options
@click.option("--force", is_flag=True,
              help="Publish even when the pre-flight check refuses: an unknown fleet or"
                   " device, an older version, a changed model name, a key no target trusts.")
@mqtt_options
def deploy(package: str, fleet: str, devices: tuple[str, ...], broker: str, timeout: float,
           no_wait: bool, include_offline: bool, as_json: bool, quiet: bool,
           key_path: str | None, allow_downgrade: bool, allow_rename: bool, url: str | None,
           http_addr: str | None, allow_breaking: bool, delta_from: tuple[str, ...],
           no_delta: bool, latency_budget_ms: float | None, probation_requests: int,
           probation_seconds: float, max_error_rate: float, max_latency_ms: float | None,
           max_kbps: int | None, window: str | None, share_group: str, direct: bool,
           force: bool, shadow: bool, shadow_requests: int, shadow_sample: float,
           mqtt_auth: MqttAuth) -> None:
    """Update a fleet, or some of its devices, to PACKAGE.

    First checks the targets' retained status: the deploy is refused (exit 1, nothing
    published; --force overrides) when the fleet (unless a controller looks after it, or
    with --no-wait) or a --device never reported, a target runs a newer version of the
    model (without --allow-downgrade) or another model name, or no key a target trusts
    signed PACKAGE. When every target fails, the desired document from before the deploy
    is put back, so devices that join later do not fetch PACKAGE.

    Publishes the retained desired document (fleet-wide, or per --device), signed with the
    operator key (--key), serves PACKAGE
    over MQTT while it waits unless a server (a controller, `edgekit serve`) already does,
    and follows the devices until each has succeeded, failed or timed out. Exit code 0 when
    every target succeeded, 1 when any failed, rolled back or timed out.

    \b
    Targets of a fleet-wide deploy: the devices whose retained status says online when the
    deploy starts, and any that come online while it waits. Offline devices are listed but
    not waited for (--include-offline waits for them): the document is retained, so they
    update when they reconnect, from a server still running then. Devices named with
    --device are always waited for.
    """
    fleet = check_id(fleet, "fleet")
    targets = [check_id(d, "device") for d in devices] or None
    key = operator_key(key_path)
    store = ArtifactStore()
    info = store.add(package)
    probation = _probation(probation_requests, probation_seconds, max_error_rate,
                           max_latency_ms)
    transfer = _transfer(max_kbps, window)
    with mqtt_auth.client(broker).connect() as client:
        managed = not direct and bool(controllers_for(client, fleet))
        if managed and transfer is not None:
            raise UsageError("--max-kbps and --window go into a direct deploy's document; a"
                             " controller looks after this fleet",
                             hint="add --direct, or deploy without them")
        _preflight(client, fleet, info, targets, allow_downgrade=allow_downgrade, force=force,
                   empty_fleet_ok=managed or no_wait)
        if not direct:
            code = _via_controller(client, fleet, info, key, devices=targets, timeout=timeout,
                                   no_wait=no_wait, as_json=as_json, quiet=quiet,
                                   plan={"probation_requests": probation_requests,
                                         "probation_seconds": probation_seconds,
                                         **shadow_plan(shadow, shadow_requests, shadow_sample)})
            if code is not None:
                sys.exit(code)
        http_server = start_http(store, http_addr, None, None)
        delta_dir = tempfile.TemporaryDirectory(prefix="edgekit-deltas-")
        try:
            if shadow:
                sys.exit(run_shadow(client, fleet, targets, info, key, store, share_group,
                                    http_server, url, timeout, include_offline, as_json, quiet,
                                    spec=shadow_spec(shadow_requests, shadow_sample, timeout)))
            deltas = [] if no_delta else offer_deltas(
                client, fleet, targets, info, store, [Path(p) for p in delta_from],
                Path(delta_dir.name), http_server.url_for if http_server else None,
                note=None if quiet or as_json else lambda line: click.echo(line, err=True))
            doc = desired_for_package(info, fleet, devices=targets, deltas=deltas, url=url or (
                http_server.url_for(info.sha256) if http_server else None),
                allow_breaking=allow_breaking, allow_downgrade=allow_downgrade,
                allow_rename=allow_rename, probation=probation,
                latency_budget_ms=latency_budget_ms, transfer=transfer)
            ok = _run(client, fleet, targets, doc, key, store, share_group, timeout=timeout,
                      no_wait=no_wait, include_offline=include_offline, as_json=as_json,
                      quiet=quiet)
        finally:
            if http_server:
                http_server.stop()
            delta_dir.cleanup()
    sys.exit(0 if ok else 1)



def _transfer(max_kbps: int | None, window: str | None) -> Transfer | None:
    try:
        return make_transfer(max_kbps, window, "--window")
    except EdgekitError as exc:
        raise UsageError(exc.message, hint=exc.hint) from exc


def _preflight(client: HostClient, fleet: str, info: ArtifactInfo, targets: list[str] | None,
               *, allow_downgrade: bool, force: bool, empty_fleet_ok: bool) -> None:
    """The pre-flight check; its findings are printed as warnings (refusals raise)."""
    report = check_before_deploy(client, fleet, info, devices=targets,
                                 signed_rollback=allow_downgrade, force=force,
                                 empty_fleet_ok=empty_fleet_ok)
    for finding in report.findings:
        forced = " (forced)" if finding.refuse else ""
        click.echo(f"warning: {finding.message}{forced}", err=True)


@cli.command()
@click.option("--fleet", required=True, help="Fleet to roll back.")
@_follow_options
@click.option("--to", "to_version", required=True, help="The version to go back to.")
@KEY_OPTION
@click.option("--package", type=click.Path(dir_okay=False),
              help="The package of that version, served while waiting; without it, devices"
                   " use the copy they keep on disk.")
@click.option("--name", "model_name",
              help="Model name; default: the package's, else the current desired document's.")
@_probation_options
@SHARE_OPTION
@mqtt_options
def rollback(fleet: str, devices: tuple[str, ...], broker: str, timeout: float, no_wait: bool,
             include_offline: bool, as_json: bool, quiet: bool, to_version: str,
             key_path: str | None, package: str | None, model_name: str | None,
             probation_requests: int, probation_seconds: float, max_error_rate: float,
             max_latency_ms: float | None, share_group: str, mqtt_auth: MqttAuth) -> None:
    """Send a fleet, or some of its devices, back to version --to.

    Publishes a desired document signed with the operator key (--key) that allows the
    downgrade (devices refuse older versions without one; it expires after a day) and
    follows the devices like `deploy`.
    """
    fleet = check_id(fleet, "fleet")
    targets = [check_id(d, "device") for d in devices] or None
    try:
        parse_version(to_version)
    except EdgekitError as exc:
        raise UsageError(f"--to: {exc.message}") from exc
    key = operator_key(key_path)
    store = ArtifactStore()
    info: ArtifactInfo | None = None
    if package:
        info = store.add(package)
        if info.version != to_version:
            raise UsageError(f"--package {package} holds version {info.version}, not {to_version}")
        model_name = model_name or info.name
    with mqtt_auth.client(broker).connect() as client:
        if model_name is None:
            model_name = current_model_name(client, fleet, targets, key)
        probation = _probation(probation_requests, probation_seconds, max_error_rate,
                               max_latency_ms)
        if info is not None:
            doc = desired_for_package(info, fleet, devices=targets, allow_downgrade=True,
                                      probation=probation)
        else:
            doc = make_desired(deployment=new_deployment_id(), fleet=fleet, devices=targets,
                               name=model_name, version=to_version, sha256=None, size=None,
                               allow_downgrade=True, probation=probation)
        ok = _run(client, fleet, targets, doc, key, store, share_group, timeout=timeout,
                  no_wait=no_wait, include_offline=include_offline, as_json=as_json,
                  quiet=quiet, restore_on_failure=False)
    sys.exit(0 if ok else 1)


def _run(client: HostClient, fleet: str, devices: list[str] | None, doc: DesiredDocument,
         key: Ed25519PrivateKey, store: ArtifactStore, share_group: str, *, timeout: float,
         no_wait: bool, include_offline: bool, as_json: bool, quiet: bool,
         restore_on_failure: bool = True) -> bool:
    """Deploy directly and render the outcome; return whether it succeeded."""
    view = ProgressView(sys.stderr, quiet=quiet or no_wait)
    outcome = deploy_direct(client, fleet, devices, doc, key, store, share_group,
                            timeout=timeout, no_wait=no_wait, include_offline=include_offline,
                            on_change=view.update, restore_on_failure=restore_on_failure)
    model = doc.model
    result = outcome.result
    if result is None:
        if not outcome.served_elsewhere and not doc.sources.url:
            click.echo("warning: no server answers for this artifact; devices wait until"
                       " `edgekit serve` or a controller serves it", err=True)
        if as_json:
            emit_json({"deployment": doc.deployment, "fleet": fleet,
                       "model": msgspec.to_builtins(model), "topics": outcome.topics,
                       "served": outcome.served_elsewhere})
        else:
            click.echo(f"published {doc.deployment}: {model.name} {model.version}"
                       f" -> {', '.join(outcome.topics)}")
        return True
    view.finish(result)
    if as_json:
        emit_json({**result.to_dict(), "restored": outcome.restored})
    else:
        _print_result(result)
    if outcome.restored:
        click.echo(f"every target refused {model.name} {model.version}: the desired"
                   f" document from before is back on {', '.join(outcome.restored)}", err=True)
    return outcome.ok


def _via_controller(client: HostClient, fleet: str, info: ArtifactInfo,
                    key: Ed25519PrivateKey, *, devices: list[str] | None, plan: dict[str, Any], timeout: float,
                    no_wait: bool, as_json: bool, quiet: bool) -> int | None:
    """``edgekit deploy`` through the controller that looks after ``fleet``; None when
    none does. Prints each device's reason when the rollout fails."""

    def created(rollout: dict[str, Any], controllers: list[str]) -> None:
        if not quiet:
            click.echo(f"controller {', '.join(controllers)} looks after fleet {fleet}:"
                       f" rollout {rollout['id']}: {info.name} {info.version} to"
                       f" {len(rollout.get('targets') or [])} device(s), waves"
                       f" {rollout['plan'].get('waves')}", err=True)

    def show(state: RolloutStatePayload) -> None:
        if not quiet:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(state.counts.items()))
            click.echo(f"rollout {state.rollout}: {state.state}, wave {state.wave}"
                       f" ({counts})", err=True)

    outcome = deploy_via_controller(client, fleet, info, key, devices=devices, plan=plan,
                                    timeout=timeout, no_wait=no_wait, on_created=created,
                                    on_state=show)
    if outcome is None:
        return None
    rid = outcome.rollout["id"]
    reason = outcome.final["reason"] if outcome.final else None
    if as_json:
        emit_json({"rollout": outcome.rollout, "state": outcome.state,
                   "counts": outcome.final["counts"] if outcome.final else {},
                   "reason": reason,
                   "devices": {d: vars(r) for d, r in sorted(outcome.devices.items())}})
    elif no_wait:
        click.echo(f"rollout {rid} created; follow it with `edgekit events --follow"
                   f" --rollout {rid}`")
    else:
        click.echo(f"rollout {rid} {outcome.state}" + (f": {reason}" if reason else ""))
        for device, said in sorted(outcome.devices.items()):
            why = f" [{said.reason}]" if said.reason else ""
            click.echo(f"  {device}: {said.step}{why} {said.message}".rstrip())
    if outcome.still_running:
        click.echo(f"still {outcome.state} after {timeout:g} s; it goes on in the controller"
                   f" (`edgekit events --follow --rollout {rid}`)", err=True)
    return 0 if no_wait or outcome.ok else 1


def _print_result(result: DeployResult) -> None:
    model = result.model
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result.counts().items())) or "no targets"
    click.echo(f"{result.deployment}: {model.name} {model.version} to fleet"
               f" {result.fleet}: {counts} ({result.elapsed_s:.1f} s)")
    for device, progress in sorted(result.targets.items()):
        click.echo(f"  {device}: {_describe(progress)}")
    for device, progress in sorted(result.not_waited.items()):
        click.echo(f"  {device}: not waited for ({progress.note or progress.state})")


def _describe(progress: DeviceProgress) -> str:
    outcome = progress.outcome.value if progress.outcome else "pending"
    serving = progress.serving
    parts = [outcome]
    if progress.reason:
        parts.append(f"[{progress.reason}]")
    if progress.message and progress.outcome != Outcome.SUCCEEDED:
        parts.append(progress.message)
    if serving:
        parts.append(f"(serving {serving.get('name')} {serving.get('version')})")
    return " ".join(parts)


class ProgressView:
    """One line per target on stderr: step and download percentage. On a terminal the block
    is redrawn in place; elsewhere a line is printed when a device changes step or passes
    another quarter of its download."""

    def __init__(self, stream: TextIO, *, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self._drawn = 0
        self._last: dict[str, tuple[str | None, int]] = {}
        self._lock = threading.Lock()

    def update(self, tracker: DeploymentTracker, progress: DeviceProgress | None) -> None:
        if self.quiet:
            return
        with self._lock:
            if self.tty:
                self._redraw(tracker)
            elif progress is not None and progress.device in tracker.targets:
                step = progress.step.value if progress.step else None
                quarter = int((progress.percent or 0) // 25)
                if self._last.get(progress.device) != (step, quarter):
                    self._last[progress.device] = (step, quarter)
                    self.stream.write(_line(progress) + "\n")
                    self.stream.flush()

    def finish(self, result: DeployResult) -> None:
        if self.quiet or not self.tty:
            return
        with self._lock:
            self._drawn = 0

    def _redraw(self, tracker: DeploymentTracker) -> None:
        lines = [_line(tracker.devices[d]) for d in sorted(tracker.targets)]
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F")
        for line in lines:
            self.stream.write("\x1b[2K" + line + "\n")
        self._drawn = len(lines)
        self.stream.flush()


def _line(progress: DeviceProgress) -> str:
    step = progress.outcome.value if progress.outcome else (
        progress.step.value if progress.step else "waiting")
    percent = progress.percent
    bar = ""
    if progress.step is not None and percent is not None:
        filled = int(percent // 5)
        bar = f" [{'#' * filled}{'.' * (20 - filled)}] {percent:5.1f}%"
    reason = f" {progress.reason}" if progress.reason else ""
    return f"{progress.device:<24} {step:<12}{bar}{reason}"


# --------------------------------------------------------------------------- helpers
