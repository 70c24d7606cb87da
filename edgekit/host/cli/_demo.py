"""``edgekit demo``: the whole loop in one command."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit.host.cli._app import cli, emit_json


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Folder for report.html, summary.json and work/ (logs).")
@click.option("--devices", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Agent processes to start.")
@click.option("--broker", help="Use this MQTT broker (mqtt://HOST:PORT) instead of starting"
              " the embedded amqtt broker.")
@click.option("--rate", type=float, default=20.0, show_default=True,
              help="Requests per second per device.")
@click.option("--baseline", "baseline_s", type=float, default=20.0, show_default=True,
              help="Seconds of clean traffic before the drift.")
@click.option("--recovered", "recovered_s", type=float, default=20.0, show_default=True,
              help="Seconds of drifted traffic on the updated model.")
@click.option("--console", "console_listen", metavar="HOST:PORT",
              help="Serve the fleet console here for the demo's whole run (the URL is"
              " printed); $EDGEKIT_CONSOLE_PASSWORD lets an operator log in.")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json to stdout at the end.")
def demo(out: Path, devices: int, broker: str | None, rate: float, baseline_s: float,
         recovered_s: float, console_listen: str | None, as_json: bool) -> None:
    """Run the whole loop on this machine and write a report.

    \b
    Starts a broker (embedded amqtt unless --broker), a controller and N real agent
    processes; trains the digits CNN, converts, signs, registers and deploys it; sends
    clean digits, then rotated and noisy ones (labels come back as feedback). Accuracy
    drops, the controller's policy fires, the retrain command trains on the collected
    samples, the better model goes out canary first, accuracy recovers.
    Writes OUT/report.html (plots, event log) and OUT/summary.json.
    """
    from edgekit.host.demo.runner import DemoOptions, run_demo

    summary = run_demo(DemoOptions(out=out, devices=devices, broker=broker, rate=rate,
                                   baseline_s=baseline_s, recovered_s=recovered_s, console=console_listen,
                                   echo=lambda s: click.echo(s, err=as_json)))
    if as_json:
        emit_json(summary)
        return
    acc = summary["fleet_accuracy"]
    secs = summary["phase_seconds"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:.1f}%"

    click.echo(f"fleet accuracy: before drift {pct(acc['before_drift'])}, during drift"
               f" {pct(acc['during_drift'])}, after update {pct(acc['after_update'])}")
    click.echo(f"policy fired -> whole fleet on {summary['final_version']}:"
               f" {secs['policy_fired_to_fleet_updated'] or 0:.1f} s; total {secs['total']:.1f} s")
