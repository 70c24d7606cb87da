"""The broker credential and TLS options every host command that talks MQTT shares.

``--username``, ``--ca-file``, ``--cert-file``, ``--key-file`` and ``--password-file``; the
password itself comes from ``EDGEKIT_MQTT_PASSWORD`` or the file, never from the command line
(where ``ps`` and shell history would show it): a ``--broker`` URL that carries one is refused.
The agent takes the same options (``edgekit-agent run --help``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from edgekit.errors import UsageError
from edgekit.host.mqtt_client import HostClient

__all__ = ["PASSWORD_ENV", "MqttAuth", "mqtt_options"]

PASSWORD_ENV = "EDGEKIT_MQTT_PASSWORD"


@dataclass(frozen=True)
class MqttAuth:
    """What the options gave; ``None`` fields were not given."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def client(self, broker: str, **kwargs: Any) -> HostClient:
        """A :class:`HostClient` for ``broker`` with these credentials (not yet connected)."""
        return HostClient(broker, username=self.username, password=self.password,
                          ca_file=self.ca_file, cert_file=self.cert_file,
                          key_file=self.key_file, **kwargs)

    def overrides(self) -> dict[str, str]:
        """The given values as overrides of the ``mqtt.*`` keys of a configuration."""
        pairs = (("mqtt.username", self.username), ("mqtt.password", self.password),
                 ("mqtt.ca_file", self.ca_file), ("mqtt.cert_file", self.cert_file),
                 ("mqtt.key_file", self.key_file))
        return {key: value for key, value in pairs if value is not None}


def _read_password(password_file: str | None) -> str | None:
    """Raises: UsageError: the file cannot be read."""
    if password_file is None:
        return os.environ.get(PASSWORD_ENV) or None
    try:
        text = Path(password_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--password-file {password_file}: {exc.strerror}") from exc
    return text.rstrip("\r\n")


def _refuse_url_password(broker: object) -> None:
    if isinstance(broker, str) and "://" in broker and urlsplit(broker).password:
        raise UsageError("the --broker URL carries a password, which the command line exposes",
                         hint=f"drop it from the URL; set {PASSWORD_ENV} or pass"
                              " --password-file FILE")


_FILE = click.Path(dir_okay=False, exists=True)
_OPTIONS = [
    click.option("--username", envvar="EDGEKIT_MQTT_USERNAME",
                 help="Broker user name (env EDGEKIT_MQTT_USERNAME); the password comes from"
                      f" {PASSWORD_ENV} or --password-file."),
    click.option("--password-file", type=_FILE,
                 help=f"File holding the broker password (else env {PASSWORD_ENV})."),
    click.option("--ca-file", type=_FILE, help="CA certificate (PEM) of the broker (mqtts://)."),
    click.option("--cert-file", type=_FILE, help="Client certificate (PEM) for the broker."),
    click.option("--key-file", type=_FILE, help="Private key (PEM) of --cert-file."),
]


def mqtt_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options; the command receives one ``mqtt_auth: MqttAuth`` argument instead.

    Raises (when the command runs):
        UsageError: ``--broker`` carries a password, or ``--password-file`` is unreadable.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, username: str | None, password_file: str | None,
                ca_file: str | None, cert_file: str | None, key_file: str | None,
                **kwargs: Any) -> Any:
        _refuse_url_password(kwargs.get("broker"))
        auth = MqttAuth(username=username, password=_read_password(password_file),
                        ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        return func(*args, mqtt_auth=auth, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
