"""``edgekit serve``: packages served to devices over MQTT (and HTTP) until interrupted."""

from __future__ import annotations

import signal
import threading
import time

import click

from edgekit.host.cli._app import cli
from edgekit.host.cli._deploy import BROKER_OPTION, SHARE_OPTION
from edgekit.host.cli._mqtt_options import MqttAuth, mqtt_options
from edgekit.host.ota.store import ArtifactStore
from edgekit.host.ota.usecase import start_artifact_server, start_http


@cli.command()
@click.argument("packages", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--fleet", "fleets", multiple=True, required=True,
              help="Fleet to serve (repeatable; '+' serves every fleet).")
@BROKER_OPTION
@click.option("--http", "http_addr", metavar="HOST:PORT",
              help="Also serve the packages over HTTP at /artifacts/<sha256> (Range requests).")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="Certificate (PEM) to serve HTTPS instead of HTTP.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Key of --tls-cert.")
@SHARE_OPTION
@mqtt_options
def serve(packages: tuple[str, ...], fleets: tuple[str, ...], broker: str,
          http_addr: str | None, tls_cert: str | None, tls_key: str | None,
          share_group: str, mqtt_auth: MqttAuth) -> None:
    """Serve PACKAGES to devices in chunks over MQTT (and HTTP), until interrupted.

    Devices ask for the artifact a desired document names; `edgekit deploy` serves its own
    package while it waits, so run this for devices that update later (offline ones) when
    no controller is running.
    """
    store = ArtifactStore()
    infos = [store.add(p) for p in packages]
    client = mqtt_auth.client(broker).connect()
    http_server = start_http(store, http_addr, tls_cert, tls_key)
    try:
        server = start_artifact_server(client, store, list(fleets), share_group)
        for info in infos:
            where = f" and {http_server.url_for(info.sha256)}" if http_server else ""
            click.echo(f"serving {info.name} {info.version} ({info.sha256[:12]}, {info.size}"
                       f" bytes) to fleet {', '.join(fleets)} on {client.broker}{where}",
                       err=True)
        _wait_for_signal()
        click.echo(f"served {server.stats.chunks} chunks, {server.stats.bytes} bytes"
                   f" ({server.stats.errors} errors)", err=True)
    finally:
        if http_server:
            http_server.stop()
        client.close()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        time.sleep(0.2)
