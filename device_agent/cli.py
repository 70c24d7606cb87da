"""``edgekit-agent``: run the agent, install a site bundle, check its config, install it as a
service, show runtimes.

Exit codes: 0 success, 1 failure (a refused model, a runtime that cannot load it), 2 usage
or configuration error. Errors are printed once, as ``error: <message>`` and a hint.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import platform
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgekit import __version__
from edgekit.errors import EdgekitError, RuntimeBackendError, UsageError
from edgekit.fsutil import write_bytes_atomic
from edgekit.redact import redact_url
from edgekit.runtimes import availability

from ._agent import Agent
from ._install import install_bundle, without_broker
from ._service import setup_commands, unit_text
from .config import config_keys, load_config
from .ota import UpdateFailure

__all__ = ["cli", "main"]

log = logging.getLogger("device_agent")


class _Group(click.Group):
    """Turns an :class:`EdgekitError` into ``error: ...`` and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgekitError as exc:
            click.echo(f"error: {exc.format()}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit-agent")
def cli() -> None:
    """edgekit device agent: serve a model, report over MQTT, take feedback.

    \b
    First try (no config file):
      edgekit-agent run --device-id pi-1 --fleet lab --broker mqtt://host:1883 \\
          --model digits.edgepkg --model-dir ./models --http 127.0.0.1:8080 \\
          --trusted-key edgekit-release.pub --intent-key edgekit-operator.pub
    """


# Flags that override config keys: (option declarations, config key, click kwargs).
_FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--device-id",), "device.id", {"help": "Device id (device.id)."}),
    (("--fleet",), "device.fleet", {"help": "Fleet (device.fleet)."}),
    (("--broker",), "mqtt.broker", {"metavar": "URL",
                                    "help": "mqtt://HOST:PORT or mqtts://HOST:PORT."}),
    (("--username",), "mqtt.username", {"help": "Broker user name."}),
    (("--ca-file",), "mqtt.ca_file", {"help": "CA certificate of the broker (PEM)."}),
    (("--cert-file",), "mqtt.cert_file", {"help": "Client certificate (PEM)."}),
    (("--key-file",), "mqtt.key_file", {"help": "Client certificate key (PEM)."}),
    (("--model",), "model.package", {"metavar": "PKG", "help": "Package to start with."}),
    (("--model-dir",), "model.dir", {"metavar": "DIR", "help": "Model folder."}),
    (("--trusted-key",), "model.trusted_keys", {"metavar": "PUB", "multiple": True,
                                                "help": "Trusted public key (repeatable)."}),
    (("--allow-unsigned",), "model.allow_unsigned", {"is_flag": True, "default": None,
                                                     "help": "Accept unsigned packages."}),
    (("--intent-key",), "ota.intent_keys", {"metavar": "PUB", "multiple": True,
                                            "help": "Operator public key whose signed desired"
                                                    " documents are followed (repeatable)."}),
    (("--allow-unsigned-intents",), "ota.allow_unsigned_intents",
     {"is_flag": True, "default": None,
      "help": "INSECURE lab setting: follow unsigned desired documents."}),
    (("--http",), "http.listen", {"metavar": "HOST:PORT", "help": "Serve the HTTP API here."}),
    (("--telemetry-interval",), "telemetry.interval_s",
     {"type": float, "metavar": "SECONDS", "help": "Seconds between metrics; 0: none."}),
    (("--queue-max",), "telemetry.queue_max",
     {"type": int, "help": "Bound of the telemetry queue, in messages."}),
    (("--threads",), "runtime.threads", {"type": int, "help": "Inference threads."}),
    (("--provider",), "runtime.providers", {"multiple": True,
                                            "help": "onnxruntime execution provider"
                                                    " (repeatable, in order)."}),
    (("--state-dir",), "agent.state_dir", {"metavar": "DIR", "help": "Agent state folder."}),
    (("--log-level",), "agent.log_level",
     {"type": click.Choice(["debug", "info", "warning", "error"])}),
]


def _config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and the override flags; the command receives ``config_path`` and
    ``overrides`` (config key -> value of the flags that were given)."""

    @functools.wraps(func)
    def wrapper(*args: Any, config_path: str | None, **kwargs: Any) -> Any:
        overrides: dict[str, Any] = {}
        for decls, key, _ in _FLAGS:
            value = kwargs.pop(decls[0].lstrip("-").replace("-", "_"))
            if value is None or value == ():
                continue
            overrides[key] = list(value) if isinstance(value, tuple) else value
        return func(*args, config_path=config_path, overrides=overrides, **kwargs)

    for decls, _key, kwargs in reversed(_FLAGS):
        wrapper = click.option(*decls, **kwargs)(wrapper)
    return click.option("--config", "config_path", metavar="TOML",
                        help="Config file; flags and EDGEKIT_* variables override it.")(wrapper)


@cli.command()
@_config_options
def run(config_path: str | None, overrides: dict[str, Any]) -> None:
    """Run the agent until SIGTERM or Ctrl-C."""
    cfg = load_config(config_path, overrides=overrides)
    logging.basicConfig(level=cfg.agent.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(cfg)
    try:
        agent.start()
        model = agent.model
        log.info("device %s/%s serving %s; broker %s", cfg.device.fleet, cfg.device.id,
                 f"{model.name} {model.version}" if model else "no model",
                 redact_url(cfg.mqtt.broker) or "(none)")
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping")
        agent.stop()


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@_config_options
@click.option("--timeout", default=3600.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds to wait for the update (probation included) to end.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def install(bundle: str, config_path: str | None, overrides: dict[str, Any], timeout: float,
            as_json: bool) -> None:
    """Install a site bundle (`edgekit bundle`) with no broker: verify, stage, probation.

    The agent must not be running on this state folder (stop its service first). The
    bundle's signed intent passes the checks a desired document from the broker passes;
    the model in service changes only when the package passes verification, staging and
    probation. Exit code 0 when the update succeeded (or was already done), 1 otherwise.
    """
    cfg = load_config(config_path, overrides={**overrides, **without_broker()})
    logging.basicConfig(level=cfg.agent.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        result = install_bundle(cfg, Path(bundle), timeout=timeout, stop=stop,
                                on_step=lambda step: log.info("install: %s", step))
    except UpdateFailure as refusal:
        if as_json:
            click.echo(json.dumps({"outcome": "refused", "reason": refusal.reason.value,
                                   "message": refusal.message}, indent=2))
        raise UpdateFailure(refusal.reason, f"install refused [{refusal.reason.value}]:"
                            f" {refusal.message}", hint=refusal.hint) from refusal
    if as_json:
        click.echo(json.dumps({"deployment": result.deployment, "model": result.model,
                               "outcome": result.outcome, "reason": result.reason,
                               "message": result.message, "serving": result.serving},
                              indent=2))
    else:
        model = result.model
        why = f" [{result.reason}]" if result.reason else ""
        click.echo(f"{result.deployment}: {model['name']} {model['version']}:"
                   f" {result.outcome}{why} {result.message}")
    if not result.ok:
        sys.exit(1)


@cli.command("check-config")
@_config_options
@click.option("--keys", is_flag=True, help="List every config key with its default instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check_config(config_path: str | None, overrides: dict[str, Any], keys: bool,
                 as_json: bool) -> None:
    """Validate the configuration and print the values in force (secrets masked)."""
    if keys:
        rows = [{"key": k.dotted, "type": k.type, "default": k.default, "env": k.env,
                 "allowed": k.rules.describe(), "help": k.help} for k in config_keys()]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            for row in rows:
                allowed = f" (allowed: {row['allowed']})" if row["allowed"] else ""
                click.echo(f"{row['key']:<26} {row['type']:<6} {json.dumps(row['default']):<32}"
                           f" {row['env']}\n    {row['help']}{allowed}")
        return
    cfg = load_config(config_path, overrides=overrides)
    doc = cfg.to_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for section, values in doc.items():
        click.echo(f"[{section}]")
        for name, value in values.items():
            click.echo(f"{name} = {json.dumps(value)}")
        click.echo("")
    click.echo("config ok", err=True)


@cli.command("install-service")
@click.option("--config", "config_path", required=True, metavar="TOML",
              help="Config file the service runs with (checked now).")
@click.option("--user", default="edgekit-agent", show_default=True,
              help="Dedicated system user the agent runs as.")
@click.option("--output", default="/etc/systemd/system/edgekit-agent.service",
              show_default=True, help="Where to write the unit.")
@click.option("--force", is_flag=True, help="Replace an existing unit file.")
def install_service(config_path: str, user: str, output: str, force: bool) -> None:
    """Write a systemd unit: restart on failure, a dedicated user, the config given."""
    path = Path(config_path).resolve()
    cfg = load_config(path)
    if not user or user == "root" or not user.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"--user {user!r}: give a dedicated system user, not root")
    target = Path(output)
    if target.exists() and not force:
        raise UsageError(f"{target} exists", hint="pass --force to replace it")
    write_bytes_atomic(target, unit_text(path, cfg, user).encode("utf-8"))
    click.echo(f"wrote {target}")
    click.echo("then, as root:")
    for line in setup_commands(user, cfg, target):
        click.echo(f"  {line}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(as_json: bool) -> None:
    """Show the runtimes and execution providers available on this device."""
    runtimes = [vars(info) for info in availability()]
    libraries = {}
    for name in ("numpy", "paho.mqtt", "psutil", "cryptography"):
        try:
            libraries[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except ImportError as exc:
            libraries[name] = f"missing ({exc})"
    info = {"agent_version": __version__, "python": platform.python_version(),
            "machine": platform.machine(), "runtimes": runtimes, "libraries": libraries}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"edgekit-agent {__version__}, Python {info['python']} on {info['machine']}")
    click.echo("runtimes:")
    for rt in runtimes:
        mark = "ok " if rt["available"] else "-- "
        click.echo(f"  {mark}{rt['key']:<12} {rt['format']:<7} {rt['version'] or '':<10}"
                   f" {rt['detail']}")
    click.echo("libraries:")
    for name, version in libraries.items():
        click.echo(f"  {name:<13} {version}")
    if not any(rt["available"] for rt in runtimes):
        raise RuntimeBackendError("no inference runtime is available",
                         hint="pip install 'edgekit-fleet[agent]' (or tflite-runtime with numpy<2)")


def main() -> None:
    cli(prog_name="edgekit-agent")
