"""``edgekit console``: the fleet console in the browser, and its start inside a controller."""

from __future__ import annotations

import logging
import secrets
import signal
import sys
import threading
from typing import TYPE_CHECKING

import click

from edgekit.errors import UsageError
from edgekit.host.cli._app import cli
from edgekit.host.cli._mqtt_options import MqttAuth, mqtt_options

if TYPE_CHECKING:
    from edgekit.host.console import ConsoleServer
    from edgekit.host.controller import Controller, ControllerConfig
    from edgekit.host.mqtt_client import HostClient


def start_controller_console(ctl: Controller) -> ConsoleServer | None:
    """The console of a started controller (``[console] listen``), on its database and
    broker connection; None when no console is configured.

    Raises:
        EdgekitError: the address cannot be bound.
    """
    from edgekit.host.console import ConsoleServer

    c = ctl.config.console
    if not c.listen or ctl.store is None:
        return None
    console = ConsoleServer(ctl.store, c.listen, client=ctl.client,
                            password_hash=c.password_hash or None,
                            operator_key=c.operator_key or None).start()
    click.echo(f"console: {console.url}", err=True)
    return console


def _client(cfg: ControllerConfig) -> HostClient:
    from edgekit.host.mqtt_client import HostClient

    m = cfg.mqtt
    return HostClient(m.broker, client_id=f"edgekit-console-{secrets.token_hex(4)}",
                      username=m.username or None, password=m.password or None,
                      ca_file=m.ca_file or None, cert_file=m.cert_file or None,
                      key_file=m.key_file or None, keepalive=m.keepalive_s).connect()


@cli.command("console")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="controller.toml: its [database], [mqtt] and [console] sections.")
@click.option("--db", "db_url", metavar="URL", help="Database URL (overrides database.url).")
@click.option("--broker", metavar="URL", help="MQTT broker for the operator's actions"
              " (overrides mqtt.broker). Without a broker or a config the console only reads.")
@click.option("--listen", metavar="HOST:PORT", help="Address to serve on (overrides"
              " console.listen; default 127.0.0.1:8600).")
@click.option("--operator-key", type=click.Path(dir_okay=False, exists=True),
              help="The operator's private key, which signs the console's requests"
                   " (overrides console.operator_key). Without one the console only reads.")
@click.option("--hash-password", is_flag=True,
              help="Read a password (twice) and print its hash for console.password_hash.")
@mqtt_options
def console(config_path: str | None, db_url: str | None, broker: str | None,
            listen: str | None, operator_key: str | None, hash_password: bool,
            mqtt_auth: MqttAuth) -> None:
    """Serve the fleet console against a controller's database until SIGINT or SIGTERM.

    \b
    Read-only for everyone; an operator who logs in (console.password_hash, or
    $EDGEKIT_CONSOLE_PASSWORD) can start, abort and roll back rollouts: requests signed
    with the operator key, which the fleet's controller carries out. docs/console.md
    describes the pages.
    """
    from edgekit.host.console import ConsoleServer
    from edgekit.host.console import hash_password as make_hash
    from edgekit.host.controller import load_config
    from edgekit.host.db import Store

    if hash_password:
        password = click.prompt("operator password", hide_input=True,
                                confirmation_prompt=True, err=True)
        if len(password) < 8:
            raise UsageError("the password is shorter than 8 characters")
        click.echo(make_hash(password))
        return
    overrides: dict[str, str] = {**mqtt_auth.overrides(), **{
        k: v for k, v in (("database.url", db_url), ("mqtt.broker", broker),
                          ("console.listen", listen), ("console.operator_key", operator_key))
        if v}}
    cfg = load_config(config_path, overrides=overrides)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = _client(cfg) if broker or config_path else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with Store(cfg.database.url or None) as store, ConsoleServer(
                store, cfg.console.listen or "127.0.0.1:8600", client=client,
                password_hash=cfg.console.password_hash or None,
                operator_key=cfg.console.operator_key or None) as server:
            read_only = "" if server.context.submitter else \
                " (read-only: actions need a broker and an operator key)"
            click.echo(f"console: {server.url}{read_only}", err=True)
            while not stop.wait(0.5):
                pass
    finally:
        if client is not None:
            client.close()
