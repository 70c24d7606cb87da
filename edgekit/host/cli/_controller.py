"""``edgekit controller``, ``edgekit fleet``, ``edgekit events``, and deploying through a
running controller.

The fleet and event commands read the controller's database (``--db``, else ``$EDGEKIT_DB``,
else ``~/.edgekit/edgekit.db``). ``--json`` output keys are stable: docs/controller.md lists
them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from edgekit.errors import EdgekitError
from edgekit.host.cli._app import cli, emit_json
from edgekit.host.cli._console import start_controller_console
from edgekit.host.cli._mqtt_options import MqttAuth, mqtt_options
from edgekit.host.cli._table import format_table
from edgekit.redact import redact_url

if TYPE_CHECKING:
    from edgekit.host.db import DeviceRecord, EventRecord, Store

F = TypeVar("F", bound=Callable[..., Any])


def _db_option(fn: F) -> F:
    return click.option("--db", "db_url", metavar="URL",
                        help="Database URL (default: $EDGEKIT_DB or ~/.edgekit/edgekit.db).")(fn)


def _open(db_url: str | None) -> Store:
    from edgekit.host.db import Store

    return Store(db_url)


# --------------------------------------------------------------------------- controller


_METRICS_FILE_S = 5.0


@cli.group()
def controller() -> None:
    """The fleet controller: ingest telemetry, drive rollouts, keep the models good."""


@controller.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="controller.toml (every key has a default; see check-config --keys).")
@click.option("--broker", help="Override mqtt.broker.")
@click.option("--db", "db_url", metavar="URL", help="Override database.url.")
@click.option("--store", "store_dir", metavar="DIR", help="Override registry.store.")
@click.option("--fleet", "fleets", multiple=True, help="Override controller.fleets (repeatable).")
@click.option("--id", "controller_id", help="Override controller.id.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Override controller.log_level.")
@click.option("--metrics", "metrics_addr", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics.")
@click.option("--metrics-file", type=click.Path(dir_okay=False),
              help="Write Prometheus metrics to this file every few seconds (node_exporter"
                   " textfile collector).")
@click.option("--console", "console_listen", metavar="HOST:PORT",
              help="Serve the fleet console here (overrides console.listen).")
@mqtt_options
def controller_run(config_path: str | None, broker: str | None, db_url: str | None,
                   store_dir: str | None, fleets: tuple[str, ...], controller_id: str | None,
                   log_level: str | None, metrics_addr: str | None,
                   metrics_file: str | None, console_listen: str | None,
                   mqtt_auth: MqttAuth) -> None:
    """Run the controller until SIGINT or SIGTERM; then release its leases and stop."""
    from edgekit.host.controller import Controller, load_config
    from edgekit.host.controller.metrics import ControllerMetrics

    overrides: dict[str, Any] = mqtt_auth.overrides()
    for key, value in (("mqtt.broker", broker), ("database.url", db_url),
                       ("registry.store", store_dir), ("controller.id", controller_id),
                       ("controller.log_level", log_level), ("console.listen", console_listen)):
        if value is not None:
            overrides[key] = value
    if fleets:
        overrides["controller.fleets"] = list(fleets)
    cfg = load_config(config_path, overrides=overrides)
    logging.basicConfig(level=cfg.controller.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ctl = Controller(cfg)
    metrics = ControllerMetrics(ctl)
    metrics.instrument()
    if metrics_addr:
        metrics.serve(metrics_addr)
    ctl.start()
    click.echo(f"controller {ctl.id} running: broker {redact_url(cfg.mqtt.broker)}, fleets"
               f" {', '.join(cfg.controller.fleets)}"
               + (f", metrics on http://{metrics_addr}/metrics" if metrics_addr else ""),
               err=True)
    writer = None
    if metrics_file:
        writer = threading.Thread(target=_write_metrics, args=(stop, metrics, metrics_file),
                                  name="edgekit-metrics-file", daemon=True)
        writer.start()
    console = None
    try:
        console = start_controller_console(ctl)
        ctl.wait(stop)
    finally:
        if console is not None:
            console.stop()
        ctl.stop()
        stop.set()
        if writer is not None:
            writer.join(10.0)
        metrics.close()
    click.echo(f"controller {ctl.id} stopped", err=True)


def _write_metrics(stop: threading.Event, metrics: Any, path: str) -> None:
    """Write the metrics file every few seconds until ``stop``, and once more then."""
    while not stop.wait(_METRICS_FILE_S):
        try:
            metrics.write_file(path)
        except EdgekitError as exc:
            click.echo(f"warning: {exc.message}", err=True)
    try:
        metrics.write_file(path)
    except EdgekitError as exc:
        click.echo(f"warning: {exc.message}", err=True)


@controller.command("check-config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="controller.toml to check.")
@click.option("--keys", is_flag=True, help="List every key with its default and description.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def controller_check_config(config_path: str | None, keys: bool, as_json: bool) -> None:
    """Validate a configuration (exit 2 naming the key on an error) and print it."""
    from edgekit.host.controller import config_keys, load_config

    if keys:
        rows = [{"key": k.dotted, "type": k.type, "default": k.default, "help": k.help}
                for k in config_keys()]
        if as_json:
            emit_json({"keys": rows})
            return
        for row in rows:
            click.echo(f"{row['key']} ({row['type']}, default {row['default']!r})")
            click.echo(f"    {row['help']}")
        return
    cfg = load_config(config_path)
    if as_json:
        emit_json(cfg.to_dict())
        return
    for section, values in cfg.to_dict().items():
        click.echo(f"[{section}]")
        for name, value in values.items():
            click.echo(f"{name} = {json.dumps(value)}")


# --------------------------------------------------------------------------- fleet


@cli.group()
def fleet() -> None:
    """What the controller knows about the fleet's devices and rollouts."""


def _device_json(d: DeviceRecord) -> dict[str, Any]:
    from edgekit.host.db._timeutil import iso

    m = d.metrics
    return {"fleet": d.fleet, "device": d.device, "online": d.online,
            "model": {"name": d.model_name, "version": d.model_version,
                      "sha256": d.model_sha256},
            "agent_version": d.agent_version, "latency_p50_ms": m.latency_p50_ms,
            "latency_p95_ms": m.latency_p95_ms, "latency_p99_ms": m.latency_p99_ms,
            "accuracy": m.accuracy, "f1": m.f1, "label_count": m.label_count,
            "estimated_accuracy": m.estimated_accuracy, "estimated_count": m.estimated_count,
            "first_seen": iso(d.first_seen), "last_seen": iso(d.last_seen),
            "metrics_at": iso(d.metrics_at)}


def _fleet_summary(devices: list[DeviceRecord]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for d in devices:
        s = out.setdefault(d.fleet, {"devices": 0, "online": 0, "models": {},
                                     "labels": 0, "accuracy": None, "f1": None,
                                     "estimated": 0, "estimated_accuracy": None})
        s["devices"] += 1
        s["online"] += int(d.online)
        if d.model_version is not None:
            ref = f"{d.model_name}:{d.model_version}"
            s["models"][ref] = s["models"].get(ref, 0) + 1
        n = d.metrics.label_count or 0
        if n and d.metrics.accuracy is not None and d.metrics.f1 is not None:
            s.setdefault("_acc", 0.0)
            s.setdefault("_f1", 0.0)
            s["_acc"] += n * d.metrics.accuracy
            s["_f1"] += n * d.metrics.f1
            s["labels"] += n
        k = d.metrics.estimated_count or 0
        if k and d.metrics.estimated_accuracy is not None:
            s["_est"] = s.get("_est", 0.0) + k * d.metrics.estimated_accuracy
            s["estimated"] += k
    for s in out.values():
        acc, f1, est = s.pop("_acc", None), s.pop("_f1", None), s.pop("_est", None)
        if s["labels"]:
            s["accuracy"], s["f1"] = acc / s["labels"], f1 / s["labels"]
        if s["estimated"]:
            s["estimated_accuracy"] = est / s["estimated"]
    return out


def _age(when: dt.datetime | None, now: dt.datetime) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, (now - when).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _status_text(devices: list[DeviceRecord]) -> str:
    from edgekit.host.db import utcnow

    if not devices:
        return ("no devices have reported yet. The database is filled by a running"
                " controller: start `edgekit controller run --broker URL --fleet NAME` (same"
                " --db) and connect the agents to that broker")
    now = utcnow()
    rows = [[d.fleet, d.device, "yes" if d.online else "no",
             f"{d.model_name}:{d.model_version}" if d.model_version else None,
             d.metrics.latency_p50_ms, d.metrics.latency_p95_ms, d.metrics.accuracy,
             d.metrics.f1, d.metrics.label_count, d.metrics.estimated_accuracy,
             _age(d.last_seen, now)] for d in devices]
    lines = [format_table(["FLEET", "DEVICE", "ONLINE", "MODEL", "P50 MS", "P95 MS", "ACCURACY",
                           "F1", "LABELS", "EST. ACCURACY", "LAST SEEN"], rows), ""]
    for name, s in _fleet_summary(devices).items():
        acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.4f}"
        f1 = "-" if s["f1"] is None else f"{s['f1']:.4f}"
        models = ", ".join(f"{ref} x{n}" for ref, n in sorted(s["models"].items())) or "-"
        estimated = "" if s["estimated_accuracy"] is None else (
            f"; estimated accuracy {s['estimated_accuracy']:.4f} over {s['estimated']}"
            " predictions")
        lines.append(f"fleet {name}: {s['online']}/{s['devices']} online; models {models};"
                     f" accuracy {acc}, F1 {f1} over {s['labels']} labels{estimated}")
    return "\n".join(lines)


@fleet.command("status")
@click.option("--fleet", "fleet_name", help="Only this fleet.")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print devices and fleet summaries as JSON.")
def fleet_status(fleet_name: str | None, db_url: str | None, as_json: bool) -> None:
    """Devices: online, model, latency, accuracy and F1 with their label counts, last seen.

    The figures come from the database a running controller fills (`edgekit controller
    run`); without one it stays empty.
    """
    store = _open(db_url)
    try:
        devices = store.list_devices(fleet_name)
    finally:
        store.close()
    if as_json:
        emit_json({"devices": [_device_json(d) for d in devices],
                   "fleets": _fleet_summary(devices)})
        return
    click.echo(_status_text(devices))


@fleet.command("watch")
@click.option("--fleet", "fleet_name", help="Only this fleet.")
@_db_option
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between refreshes.")
@click.option("--iterations", type=click.IntRange(min=1),
              help="Stop after this many refreshes (default: until Ctrl-C).")
def fleet_watch(fleet_name: str | None, db_url: str | None, interval: float,
                iterations: int | None) -> None:
    """The status table, refreshed every --interval seconds until Ctrl-C."""
    from edgekit.host.db import utcnow

    store = _open(db_url)
    tty = sys.stdout.isatty()
    count = 0
    try:
        while iterations is None or count < iterations:
            if count:
                time.sleep(interval)
            text = _status_text(store.list_devices(fleet_name))
            stamp = utcnow().strftime("%Y-%m-%d %H:%M:%S UTC")
            if tty:
                click.echo("\x1b[2J\x1b[H", nl=False)
            click.echo(f"edgekit fleet watch  {stamp}  (Ctrl-C to stop)\n{text}\n")
            count += 1
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


@fleet.command("rollouts")
@click.option("--fleet", "fleet_name", help="Only this fleet.")
@click.option("--active", is_flag=True, help="Only rollouts that have not finished.")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print the rollouts as JSON.")
def fleet_rollouts(fleet_name: str | None, active: bool, db_url: str | None,
                   as_json: bool) -> None:
    """Rollouts: model, state, wave, owner, and where their devices stand."""
    store = _open(db_url)
    try:
        rollouts = store.list_rollouts(fleet=fleet_name, active=True if active else None)
        docs = []
        for r in rollouts:
            counts: dict[str, int] = {}
            for t in store.list_rollout_targets(r.id):
                counts[t.state] = counts.get(t.state, 0) + 1
            doc = r.to_dict()
            doc.pop("plan")
            docs.append({**doc, "counts": counts, "source": r.plan.get("source")})
    finally:
        store.close()
    if as_json:
        emit_json({"rollouts": docs})
        return
    if not docs:
        click.echo("no rollouts")
        return
    rows = [[d["id"], d["fleet"], f"{d['model_name']}:{d['model_version']}", d["state"],
             d["current_wave"], d["owner"],
             ", ".join(f"{n} {k}" for k, n in sorted(d["counts"].items())) or None,
             d["reason"]] for d in docs]
    click.echo(format_table(["ID", "FLEET", "MODEL", "STATE", "WAVE", "OWNER", "DEVICES",
                             "REASON"], rows))


# --------------------------------------------------------------------------- events


def _event_line(e: EventRecord) -> str:
    where = f"{e.fleet}/{e.device}" if e.device else e.fleet
    reason = f" [{e.reason}]" if e.reason else ""
    rollout = f" (rollout {e.rollout_id})" if e.rollout_id else ""
    stamp = e.ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return f"{stamp}  {where:<24} {e.level:<7} {e.kind}{reason}{rollout}  {e.message}"


@cli.command()
@click.option("--since", metavar="ISO|DURATION",
              help="Only events from this time on: 2026-05-01T12:00:00Z, or 30m, 2h, 7d ago.")
@click.option("--fleet", "fleet_name", help="Only this fleet.")
@click.option("--device", help="Only this device.")
@click.option("--kind", "kinds", multiple=True, help="Only this kind (repeatable).")
@click.option("--rollout", "rollout_id", type=int, help="Only this rollout's events.")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(min=1),
              help="Show at most the newest this many (before following).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between polls with --follow.")
@click.option("--iterations", type=click.IntRange(min=1),
              help="With --follow: stop after this many polls.")
@_db_option
@click.option("--json", "as_json", is_flag=True,
              help="JSON: one document {\"events\": [...]}; with --follow one event per line.")
def events(since: str | None, fleet_name: str | None, device: str | None,
           kinds: tuple[str, ...], rollout_id: int | None, limit: int, follow: bool,
           interval: float, iterations: int | None, db_url: str | None,
           as_json: bool) -> None:
    """The event log: device events (updates, model activations) and the controller's
    decisions (rollouts, policy), oldest first."""
    from edgekit.host.db import parse_since

    start = parse_since(since) if since else None
    store = _open(db_url)
    filters: dict[str, Any] = {"since": start, "fleet": fleet_name, "device": device,
                               "rollout_id": rollout_id, "kinds": list(kinds) or None}
    try:
        found = store.list_events(limit=limit, latest=True, **filters)
        if as_json and not follow:
            emit_json({"events": [e.to_dict() for e in found]})
            return
        cursor = _print_events(found, as_json, 0)
        polls = 0
        while follow and (iterations is None or polls < iterations):
            time.sleep(interval)
            polls += 1
            cursor = _print_events(store.list_events(after_id=cursor, **filters), as_json,
                                   cursor)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


def _print_events(found: list[EventRecord], as_json: bool, cursor: int) -> int:
    for e in found:
        click.echo(json.dumps(e.to_dict(), sort_keys=True, default=str) if as_json
                   else _event_line(e))
        cursor = max(cursor, e.id)
    return cursor
