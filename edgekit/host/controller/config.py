"""The controller's configuration (``controller.toml``): typed, validated in one place.

Every key has a default and a description (``edgekit controller check-config --keys`` lists
them; docs/controller.md has the table). Sources, each overriding the one before: the
defaults, a TOML file, then ``overrides`` (``{"mqtt.broker": "mqtt://..."}``) from the
command line or from a program that starts the controller in-process. :func:`load_config`
raises one :class:`~edgekit.errors.ConfigError` that names the key and where its value came
from; the controller does not start on a config error.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit import typedconfig
from edgekit.errors import ConfigError, UsageError
from edgekit.protocol import check_id
from edgekit.typedconfig import ConfigKey
from edgekit.typedconfig import opt as _opt

__all__ = [
    "ConfigKey",
    "ConsoleSection",
    "ControllerConfig",
    "ControllerSection",
    "DatabaseSection",
    "IngestSection",
    "MqttSection",
    "PolicySection",
    "RegistrySection",
    "RolloutSection",
    "ServeSection",
    "config_keys",
    "load_config",
    "parse_canary",
    "to_toml",
]

_LOG_LEVELS = ("debug", "info", "warning", "error")
_METRICS = ("accuracy", "f1")
_STRATEGIES = ("registry-then-retrain", "registry", "retrain")
_SHIFT_MEASURES = ("tv", "psi")
_LABEL_TIMEOUT_ACTIONS = ("continue", "abort")
_GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CANARY_RE = re.compile(r"^(\d+(?:\.\d+)?)(%?)$")


@dataclass
class ControllerSection:
    id: str = _opt("", "This controller's id, unique among the controllers sharing a database;"
                   " a restarted controller with the same id resumes its rollouts at once."
                   " Empty: <hostname>-<random>.")
    fleets: list[str] = _opt(["+"], "Fleets this controller looks after; \"+\" means every"
                             " fleet on the broker.")
    tick_s: float = _opt(1.0, "Seconds between two passes over the rollouts.")
    lease_s: float = _opt(30.0, "Lease on a rollout; another controller takes a rollout over"
                          " this long after its owner stopped renewing it.")
    signing_key: str = _opt("", "Ed25519 private key (PEM) that signs rollback instructions and"
                            " retrained packages. Empty: aborted rollouts cannot send devices"
                            " back to an older version, and retrained packages are unsigned.",
                            path=True)
    workdir: str = _opt("", "Folder for maintenance jobs (exported data, retrained models)."
                        " Empty: <registry.store>/.controller.", path=True)
    log_level: str = _opt("info", "debug, info, warning or error.")


@dataclass
class DatabaseSection:
    url: str = _opt("", "SQLAlchemy URL: sqlite:///path.db or postgresql://user@host/db. Empty:"
                    " $EDGEKIT_DB, else ~/.edgekit/edgekit.db.", secret=True)


@dataclass
class RegistrySection:
    store: str = _opt("", "Artifact folder of the model registry. Empty: $EDGEKIT_STORE, else"
                      " ~/.edgekit/artifacts.", path=True)
    trusted_keys: list[str] = _opt([], "Public keys (PEM); when set, packages that deploy"
                                   " requests register must be signed by one of them.",
                                   path=True)


@dataclass
class MqttSection:
    broker: str = _opt("mqtt://127.0.0.1:1883", "Broker URL, mqtt://HOST[:PORT] or"
                       " mqtts://HOST[:PORT].")
    username: str = _opt("", "User name for the broker (also accepted in the URL).")
    password: str = _opt("", "Password for the broker.", secret=True)
    ca_file: str = _opt("", "CA certificate (PEM) of the broker; empty: the system's CAs.",
                        path=True)
    cert_file: str = _opt("", "Client certificate (PEM) for brokers that require one.",
                          path=True)
    key_file: str = _opt("", "Private key (PEM) of the client certificate.", path=True)
    client_id: str = _opt("", "MQTT client id. Empty: edgekit-controller-<id>.")
    keepalive_s: int = _opt(30, "MQTT keep-alive in seconds.")
    share_group: str = _opt("", "Shared-subscription group for metrics, events, samples and"
                            " rollout requests, so several controllers split the fleet's"
                            " messages ($share/<group>/...). Empty: plain subscriptions (one"
                            " controller, or a broker without shared subscriptions).")


@dataclass
class IngestSection:
    workers: int = _opt(2, "Threads that write incoming messages to the database.")
    queue_max: int = _opt(20000, "Messages waiting for a worker; past it the MQTT thread waits"
                          " (the broker holds the rest).")
    samples: bool = _opt(True, "Store labelled samples sent by devices.")


@dataclass
class ServeSection:
    mqtt: bool = _opt(True, "Serve registered artifacts in chunks over MQTT.")
    share_group: str = _opt("edgekit-artifacts", "Shared-subscription group of the artifact"
                            " servers. Empty: plain subscriptions (brokers without shared"
                            " subscriptions, such as amqtt).")
    max_chunk: int = _opt(1024 * 1024, "Largest chunk sent, in bytes.")
    http_listen: str = _opt("", "HOST:PORT of an HTTP artifact server; desired documents then"
                            " name its URL too. Empty: off.")
    http_public_url: str = _opt("", "Base URL devices use to reach the HTTP server. Empty: the"
                                " bound address.")


@dataclass
class RolloutSection:
    canary: str = _opt("1", "Size of the first wave: a count (\"2\") or a share of the targets"
                       " (\"10%\", rounded up, at least 1).")
    wave_factor: float = _opt(2.0, "Each wave is this many times larger than the one before"
                              " (1: equal waves).")
    device_timeout_s: float = _opt(300.0, "A device that has not succeeded or failed this long"
                                   " after it was asked counts as failed (timed out).")
    max_failure_rate: float = _opt(0.2, "Abort when more than this share of the devices with an"
                                   " outcome failed or timed out ...")
    min_devices: int = _opt(3, "... once at least this many devices have an outcome (a single"
                            " failure then aborts a rollout smaller than this).")
    wave_min_labels: int = _opt(0, "Labelled predictions each device of a wave must report with"
                                " the new model before the next wave starts (0: do not wait).")
    labels_timeout_s: float = _opt(600.0, "How long a wave waits for those labels.")
    labels_timeout_action: str = _opt("continue", "When the labels do not come in time:"
                                      " continue (with a warning event) or abort.")
    quality_metric: str = _opt("accuracy", "Field metric compared between the new and the"
                               " previous model: accuracy or f1 (macro).")
    quality_margin: float = _opt(0.05, "Abort when the new model's metric on the updated devices"
                                 " is below the previous model's on the same devices by more"
                                 " than this.")
    quality_min_labels: int = _opt(50, "Labels needed, for each model, before the quality check"
                                   " decides anything.")
    include_offline: bool = _opt(False, "Make offline devices targets too (they time out unless"
                                 " they come back in time); off: they follow the fleet's"
                                 " document when they come back.")
    rollback_timeout_s: float = _opt(300.0, "How long an aborted rollout waits for its devices"
                                     " to report the previous model again.")
    probation_requests: int = _opt(20, "Requests a device serves with the new model before it"
                                   " commits it (0: no request count).")
    probation_seconds: float = _opt(30.0, "Seconds a device serves the new model before it"
                                    " commits it (0: no time limit).")


@dataclass
class PolicySection:
    enabled: bool = _opt(False, "Run the maintenance policy (watch field quality, update the"
                         " model when it drops).")
    metric: str = _opt("accuracy", "Quality metric: accuracy or f1 (macro).")
    threshold: float = _opt(0.0, "Breach when the fleet's metric is below this (0: off).")
    relative_drop: float = _opt(0.1, "Breach when the metric is this share below the model's"
                                " baseline in its manifest (0.1: 10% lower; 0: off).")
    min_labels: int = _opt(50, "Labels a window needs (over the fleet) to count.")
    consecutive: int = _opt(3, "Breached windows in a row needed to act (hysteresis).")
    interval_s: float = _opt(30.0, "Length of one policy window, in seconds.")
    confidence_drop: float = _opt(0.15, "Warn when the mean confidence falls this far below the"
                                  " baseline (0: off).")
    max_shift: float = _opt(0.25, "Warn when the prediction distribution moves this far from"
                            " the baseline (0: off).")
    shift_measure: str = _opt("tv", "Distance of prediction distributions: tv (total"
                              " variation, 0..1) or psi (population stability index).")
    samples_window_s: float = _opt(3600.0, "Labelled field samples from this many seconds back"
                                   " are the data candidates are judged (and retrained) on.")
    min_samples: int = _opt(100, "Labelled samples needed before a candidate is judged.")
    holdout_fraction: float = _opt(0.3, "Share of those samples held out for judging; the rest"
                                   " is what the retrain command gets.")
    margin: float = _opt(0.02, "A candidate must beat the current model on the held-out"
                         " samples by at least this much to be rolled out.")
    strategy: str = _opt("registry-then-retrain", "Where candidates come from: registry,"
                         " retrain, or registry-then-retrain (retrain only when no registered"
                         " model is good enough).")
    retrain_command: str = _opt("", "Command that trains a new model. Placeholders: {data}"
                                " (.npz of recent labelled samples), {model} (the current"
                                " .edgepkg), {output} (the file to write), {workdir}. Empty:"
                                " no retraining.")
    retrain_output: str = _opt("candidate.onnx", "File name the retrain command writes: a"
                               " source model the converter reads (.onnx, .pt2, .keras, ...),"
                               " converted with the running model's recipe, or an .edgepkg.")
    retrain_timeout_s: float = _opt(900.0, "Longest a retrain command may run.")
    cooldown_s: float = _opt(300.0, "After acting, wait this long before acting again.")


@dataclass
class ConsoleSection:
    listen: str = _opt("", "Serve the fleet console (a web UI) on HOST:PORT. Empty: no"
                       " console. docs/console.md describes it.")
    password_hash: str = _opt("", "scrypt hash of the operator's password (`edgekit console"
                              " --hash-password` makes one); $EDGEKIT_CONSOLE_PASSWORD works"
                              " too. Neither: the console is read-only.", secret=True)
    operator_key: str = _opt("", "Ed25519 private key (PEM) of the operator, for the requests"
                             " the console sends to the controller.", path=True)


@dataclass
class ControllerConfig:
    """The whole configuration; build it with :func:`load_config` so it is validated."""

    controller: ControllerSection = field(default_factory=ControllerSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    serve: ServeSection = field(default_factory=ServeSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    policy: PolicySection = field(default_factory=PolicySection)
    console: ConsoleSection = field(default_factory=ConsoleSection)

    @property
    def share_group(self) -> str | None:
        return self.mqtt.share_group or None

    def to_dict(self, *, mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
        return typedconfig.to_dict(self, config_keys(), mask_secrets=mask_secrets)


def config_keys() -> list[ConfigKey]:
    """Every key of :class:`ControllerConfig`, in declaration order."""
    return typedconfig.config_keys(ControllerConfig, ConfigKey)


def load_config(path: str | os.PathLike[str] | None = None, *,
                overrides: Mapping[str, Any] | None = None) -> ControllerConfig:
    """Read the TOML file (if any), apply ``overrides`` (``{"section.key": value}``), validate.

    Raises:
        ConfigError: the file is missing or not TOML, a section or key is unknown, a value
            has the wrong type or fails a check; the message names the key.
    """
    cfg = ControllerConfig()
    keys = {k.dotted: k for k in config_keys()}
    sources: dict[str, str] = {}
    if path is not None:
        typedconfig.apply_file(cfg, Path(path), keys, sources,
                                missing_hint="pass the path of a controller.toml", setter=_set)
    for dotted, value in (overrides or {}).items():
        if dotted not in keys:
            raise ConfigError(f"unknown config key {dotted}" + typedconfig.suggest(dotted, keys),
                              hint="see `edgekit controller check-config --keys`")
        _set(cfg, keys[dotted], value, sources, "the command line", None)
    _validate(cfg, sources)
    return cfg


def to_toml(cfg: ControllerConfig) -> str:
    """The configuration as a ``controller.toml`` (secrets included: keep the file private)."""
    lines: list[str] = []
    for section, values in cfg.to_dict(mask_secrets=False).items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def parse_canary(text: str, targets: int) -> int:
    """The canary size for ``targets`` devices: a count, or a percentage rounded up.

    Raises:
        ConfigError: ``text`` is neither.
    """
    match = _CANARY_RE.match(str(text).strip())
    if not match:
        raise ConfigError(f"config rollout.canary: {text!r} is neither a count nor a"
                          " percentage", hint="write for example \"1\", \"3\" or \"10%\"")
    number = float(match.group(1))
    if match.group(2):
        size = -(-number * targets // 100)  # ceiling without float surprises at whole numbers
        return max(1, min(targets, int(size))) if targets else 0
    return max(1, min(targets, int(number))) if targets else 0


# --------------------------------------------------------------------------- internals


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _set(cfg: ControllerConfig, key: ConfigKey, value: Any, sources: dict[str, str],
         where: str, base: Path | None) -> None:
    if key.dotted == "rollout.canary" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # `canary = 2` in TOML means the count 2
    typedconfig.set_value(cfg, key, value, sources, where, base, expand_user=True)


def _validate(cfg: ControllerConfig, sources: dict[str, str]) -> None:
    def fail(dotted: str, problem: str, hint: str | None = None) -> ConfigError:
        # A list item ("controller.fleets[0]") came from wherever its list came from.
        origin = sources.get(dotted) or sources.get(dotted.split("[", 1)[0], "the default")
        return ConfigError(f"config {dotted} (from {origin}): {problem}", hint=hint)

    c = cfg.controller
    if not c.id:
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-._")[:48]
        c.id = f"{host or 'controller'}-{uuid.uuid4().hex[:6]}"
    elif not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", c.id):
        raise fail("controller.id", f"{c.id!r} is not a valid id",
                   "use 1 to 64 letters, digits, '_', '.' or '-'")
    if not c.fleets:
        raise fail("controller.fleets", "names no fleet", 'use ["+"] for every fleet')
    for i, fleet in enumerate(c.fleets):
        if fleet == "+":
            continue
        try:
            check_id(fleet, "fleet")
        except UsageError as exc:
            raise fail(f"controller.fleets[{i}]", exc.message, exc.hint) from exc
    if "+" in c.fleets and len(c.fleets) > 1:
        raise fail("controller.fleets", '"+" already means every fleet; list nothing else')
    if c.log_level not in _LOG_LEVELS:
        raise fail("controller.log_level", f"{c.log_level!r} is not one of {_LOG_LEVELS}")
    if c.signing_key:
        _check_file(fail, "controller.signing_key", c.signing_key)
    for i, key_path in enumerate(cfg.registry.trusted_keys):
        _check_file(fail, f"registry.trusted_keys[{i}]", key_path)
    m = cfg.mqtt
    if not re.match(r"^mqtts?://[^/\s]+$", m.broker.rstrip("/")):
        raise fail("mqtt.broker", f"{m.broker!r} is not mqtt://HOST[:PORT] or"
                   " mqtts://HOST[:PORT]")
    for name in ("ca_file", "cert_file", "key_file"):
        if getattr(m, name):
            _check_file(fail, f"mqtt.{name}", getattr(m, name))
    if bool(m.cert_file) != bool(m.key_file):
        raise fail("mqtt.key_file" if m.cert_file else "mqtt.cert_file",
                   "a client certificate needs both cert_file and key_file")
    for dotted, group in (("mqtt.share_group", m.share_group),
                          ("serve.share_group", cfg.serve.share_group)):
        if group and not _GROUP_RE.match(group):
            raise fail(dotted, f"{group!r} is not a valid share group",
                       "use 1 to 64 letters, digits, '_', '.' or '-'")
    if cfg.console.listen and not re.match(r"^[^:\s]+:\d{1,5}$", cfg.console.listen):
        raise fail("console.listen", f"{cfg.console.listen!r} is not HOST:PORT",
                   "for example 127.0.0.1:8600 (port 0 picks a free port)")
    if cfg.console.operator_key:
        _check_file(fail, "console.operator_key", cfg.console.operator_key)
    if cfg.serve.http_listen and not re.match(r"^[^:\s]+:\d{1,5}$", cfg.serve.http_listen):
        raise fail("serve.http_listen", f"{cfg.serve.http_listen!r} is not HOST:PORT",
                   "for example 0.0.0.0:8081 (port 0 picks a free port)")
    r, p = cfg.rollout, cfg.policy
    try:
        parse_canary(r.canary, 100)
    except ConfigError as exc:
        raise fail("rollout.canary", f"{r.canary!r} is neither a count nor a percentage",
                   exc.hint) from exc
    for dotted, value, allowed in (
        ("rollout.labels_timeout_action", r.labels_timeout_action, _LABEL_TIMEOUT_ACTIONS),
        ("rollout.quality_metric", r.quality_metric, _METRICS),
        ("policy.metric", p.metric, _METRICS),
        ("policy.strategy", p.strategy, _STRATEGIES),
        ("policy.shift_measure", p.shift_measure, _SHIFT_MEASURES),
    ):
        if value not in allowed:
            raise fail(dotted, f"{value!r} is not one of {', '.join(allowed)}")
    ranges: list[tuple[str, float, float, float | None]] = [
        ("controller.tick_s", c.tick_s, 0.01, None),
        ("controller.lease_s", c.lease_s, 1.0, None),
        ("mqtt.keepalive_s", m.keepalive_s, 5, 3600),
        ("ingest.workers", cfg.ingest.workers, 1, 64),
        ("ingest.queue_max", cfg.ingest.queue_max, 1, None),
        ("serve.max_chunk", cfg.serve.max_chunk, 1024, 16 * 1024 * 1024),
        ("rollout.wave_factor", r.wave_factor, 1.0, None),
        ("rollout.device_timeout_s", r.device_timeout_s, 0.1, None),
        ("rollout.max_failure_rate", r.max_failure_rate, 0.0, 1.0),
        ("rollout.min_devices", r.min_devices, 1, None),
        ("rollout.wave_min_labels", r.wave_min_labels, 0, None),
        ("rollout.labels_timeout_s", r.labels_timeout_s, 0.1, None),
        ("rollout.quality_margin", r.quality_margin, 0.0, 1.0),
        ("rollout.quality_min_labels", r.quality_min_labels, 1, None),
        ("rollout.rollback_timeout_s", r.rollback_timeout_s, 0.1, None),
        ("rollout.probation_requests", r.probation_requests, 0, None),
        ("rollout.probation_seconds", r.probation_seconds, 0.0, None),
        ("policy.threshold", p.threshold, 0.0, 1.0),
        ("policy.relative_drop", p.relative_drop, 0.0, 1.0),
        ("policy.min_labels", p.min_labels, 1, None),
        ("policy.consecutive", p.consecutive, 1, None),
        ("policy.interval_s", p.interval_s, 0.1, None),
        ("policy.confidence_drop", p.confidence_drop, 0.0, 1.0),
        ("policy.max_shift", p.max_shift, 0.0, None),
        ("policy.samples_window_s", p.samples_window_s, 1.0, None),
        ("policy.min_samples", p.min_samples, 2, None),
        ("policy.holdout_fraction", p.holdout_fraction, 0.05, 0.95),
        ("policy.margin", p.margin, 0.0, 1.0),
        ("policy.retrain_timeout_s", p.retrain_timeout_s, 1.0, None),
        ("policy.cooldown_s", p.cooldown_s, 0.0, None),
    ]
    for dotted, number, low, high in ranges:
        if number < low or (high is not None and number > high):
            span = f"{low:g}..{high:g}" if high is not None else f"at least {low:g}"
            raise fail(dotted, f"{number!r} is outside {span}")
    if p.enabled and p.threshold == 0 and p.relative_drop == 0:
        raise fail("policy.threshold", "the policy is enabled but neither policy.threshold nor"
                   " policy.relative_drop is set, so it could never act",
                   "set one of them, or policy.enabled = false")
    if p.strategy == "retrain" and not p.retrain_command:
        raise fail("policy.retrain_command", "policy.strategy is retrain but no command is set")
    if p.retrain_command:
        for name in re.findall(r"\{(\w*)\}", p.retrain_command):
            if name not in ("data", "model", "output", "workdir"):
                raise fail("policy.retrain_command", f"unknown placeholder {{{name}}}",
                           "use {data}, {model}, {output} and {workdir}")
    if not p.retrain_output or "/" in p.retrain_output or p.retrain_output.startswith("."):
        raise fail("policy.retrain_output", f"{p.retrain_output!r} is not a plain file name")


def _check_file(fail: Any, dotted: str, value: str) -> None:
    typedconfig.check_file(fail, dotted, value, expand_user=True)
