"""``edgekit bundle``: a package and its signed intent in one file, for air-gapped sites."""

from __future__ import annotations

import click
import msgspec

from edgekit.host.cli._app import cli, emit_json
from edgekit.host.cli._deploy import KEY_OPTION, _probation, _probation_options
from edgekit.host.keys import operator_key
from edgekit.host.ota.bundle import make_bundle
from edgekit.protocol import check_id


@cli.command()
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("--fleet", required=True, help="Fleet the bundle is for.")
@click.option("--device", "--devices", "devices", multiple=True,
              help="Only this device of the fleet (repeatable); default: every device.")
@KEY_OPTION
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The bundle file to write (e.g. site.bundle).")
@click.option("--expires-days", type=click.FloatRange(min=0.01, max=400), default=30.0,
              show_default=True,
              help="Devices refuse the bundle after this many days (it travels by hand).")
@click.option("--allow-downgrade", is_flag=True,
              help="Let devices install PACKAGE even when it is not newer than what they"
                   " committed.")
@click.option("--allow-rename", is_flag=True,
              help="Let devices switch to PACKAGE even when it is another model (name).")
@click.option("--allow-breaking", is_flag=True,
              help="Accept changed inputs/outputs when the manifest marks the change breaking.")
@_probation_options
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def bundle(package: str, fleet: str, devices: tuple[str, ...], key_path: str | None,
           output: str, expires_days: float, allow_downgrade: bool, allow_rename: bool,
           allow_breaking: bool, probation_requests: int, probation_seconds: float,
           max_error_rate: float, max_latency_ms: float | None, as_json: bool) -> None:
    """Write a signed site bundle of PACKAGE for devices no broker reaches.

    The bundle holds PACKAGE and the desired document `edgekit deploy` would publish,
    signed with the operator key (--sign-key): devices check it exactly as they check one
    from the broker. On the device: `edgekit-agent install site.bundle --config agent.toml`.
    """
    fleet = check_id(fleet, "fleet")
    targets = [check_id(d, "device") for d in devices] or None
    key = operator_key(key_path)
    result = make_bundle(package, fleet, key, output, devices=targets,
                         probation=_probation(probation_requests, probation_seconds,
                                              max_error_rate, max_latency_ms),
                         ttl_s=expires_days * 86400.0, allow_downgrade=allow_downgrade,
                         allow_rename=allow_rename, allow_breaking=allow_breaking)
    doc = result.document
    model = doc.model
    if as_json:
        emit_json({"path": str(result.path), "size": result.size,
                   "deployment": doc.deployment, "fleet": fleet, "devices": doc.devices,
                   "model": msgspec.to_builtins(model), "expires": doc.expires})
        return
    whom = ", ".join(doc.devices) if doc.devices else "every device"
    click.echo(f"wrote {result.path} ({result.size} bytes): {model.name} {model.version}"
               f" for fleet {fleet} ({whom}), deployment {doc.deployment}, valid until"
               f" {doc.expires}")
