"""The controller's configuration (``controller.toml``): typed, validated in one place.

Every key has a default, a description and the values it allows, written on its field
(``edgekit controller check-config --keys`` lists them; docs/controller.md has the tables,
generated from the fields by ``python docs/config_tables.py``). Sources, each overriding the one before: the
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
from edgekit.typedconfig import ConfigKey, Invalid, Pattern
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
    "markdown",
    "parse_canary",
    "to_toml",
]

_LOG_LEVELS = ("debug", "info", "warning", "error")
_METRICS = ("accuracy", "f1")
_POLICY_METRICS = (*_METRICS, "estimated_accuracy")
_STRATEGIES = ("registry-then-retrain", "registry", "retrain")
_PICKS = ("offline", "shadow")
_SHIFT_MEASURES = ("tv", "psi")
_LABEL_TIMEOUT_ACTIONS = ("continue", "abort")
_CANARY_RE = re.compile(r"^(\d+(?:\.\d+)?)(%?)$")
_PLACEHOLDERS = ("data", "model", "output", "workdir")
_NAME_HINT = "use 1 to 64 letters, digits, '_', '.' or '-'"
_ID = Pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "a valid id", _NAME_HINT)
_GROUP = Pattern(r"[A-Za-z0-9_.-]{1,64}", "a valid share group", _NAME_HINT)
_BROKER = Pattern(r"mqtts?://[^/\s]+/?", "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
_LISTEN = Pattern(r"[^:\s]+:\d{1,5}", "HOST:PORT",
                  "for example 0.0.0.0:8081 (port 0 picks a free port)")
_CONSOLE_LISTEN = Pattern(r"[^:\s]+:\d{1,5}", "HOST:PORT",
                          "for example 127.0.0.1:8600 (port 0 picks a free port)")
_SCRYPT_RE = re.compile(r"scrypt\$[1-9]\d{0,6}\$[1-9]\d{0,3}\$[1-9]\d{0,3}"
                        r"\$(?:[0-9a-f]{2}){8,64}\$[0-9a-f]{64}")


def _fleet(value: str) -> None:
    if value != "+":
        try:
            check_id(value, "fleet")
        except UsageError as exc:
            raise Invalid(exc.message, exc.hint) from exc


def _canary(value: str) -> None:
    if not _CANARY_RE.match(str(value).strip()):
        raise Invalid(f"{value!r} is neither a count nor a percentage",
                      "write for example \"1\", \"3\" or \"10%\"")


def _retrain_command(value: str) -> None:
    for name in re.findall(r"\{(\w*)\}", value):
        if name not in _PLACEHOLDERS:
            raise Invalid(f"unknown placeholder {{{name}}}",
                          "use " + ", ".join(f"{{{p}}}" for p in _PLACEHOLDERS))


def _scrypt_hash(value: str) -> None:
    # The message leaves the value out: a password hash is not for logs.
    if value and not _SCRYPT_RE.fullmatch(value):
        raise Invalid("the value is not an scrypt hash",
                      "make one with `edgekit console --hash-password`")


def _plain_file_name(value: str) -> None:
    if not value or "/" in value or value.startswith("."):
        raise Invalid(f"{value!r} is not a plain file name")


@dataclass
class ControllerSection:
    id: str = _opt("", "This controller's id, unique among the controllers sharing a database;"
                   " a restarted controller with the same id resumes its rollouts at once."
                   " Empty: <hostname>-<random>.", pattern=_ID,
                   allows="1 to 64 letters, digits, _ . -, starting with a letter or digit")
    fleets: list[str] = _opt(["+"], "Fleets this controller looks after; \"+\" means every"
                             " fleet on the broker.",
                             check=_fleet, allows="fleet ids, or \"+\" alone")
    tick_s: float = _opt(1.0, "Seconds between two passes over the rollouts.", ge=0.01)
    lease_s: float = _opt(30.0, "Lease on a rollout; another controller takes a rollout over"
                          " this long after its owner stopped renewing it.", ge=1.0)
    signing_key: str = _opt("", "Operator key: Ed25519 private key (PEM) that signs every"
                            " desired document the controller publishes (devices trust its"
                            " public half as ota.intent_keys). Empty: no rollouts.",
                            file=True)
    operator_keys: list[str] = _opt([], "Operator public keys (PEM) whose signed rollout"
                                    " requests this controller accepts; revoke one by"
                                    " removing it. Empty: every remote request is refused.",
                                    file=True)
    release_key: str = _opt("", "Release key: Ed25519 private key (PEM) that signs retrained"
                            " packages (devices trust it as model.trusted_keys). Empty:"
                            " retrained packages are unsigned.", file=True)
    workdir: str = _opt("", "Folder for maintenance jobs (exported data, retrained models)"
                        " and the deltas rollouts offer. Empty: <registry.store>/.controller.",
                        path=True)
    log_level: str = _opt("info", "Log level.", choices=_LOG_LEVELS)


@dataclass
class DatabaseSection:
    url: str = _opt("", "SQLAlchemy URL: sqlite:///path.db or postgresql://user@host/db. Empty:"
                    " $EDGEKIT_DB, else ~/.edgekit/edgekit.db.", secret=True)


@dataclass
class RegistrySection:
    store: str = _opt("", "Artifact folder of the model registry. Empty: $EDGEKIT_STORE, else"
                      " ~/.edgekit/artifacts.", path=True)
    trusted_keys: list[str] = _opt([], "Release public keys (PEM); when set, a rollout request"
                                   " is refused unless the registered package is signed by"
                                   " one of them.", file=True)


@dataclass
class MqttSection:
    broker: str = _opt("mqtt://127.0.0.1:1883", "Broker URL, mqtt://HOST[:PORT] or"
                       " mqtts://HOST[:PORT].", pattern=_BROKER, required=True)
    username: str = _opt("", "User name for the broker (also accepted in the URL).")
    password: str = _opt("", "Password for the broker.", secret=True)
    ca_file: str = _opt("", "CA certificate (PEM) of the broker; empty: the system's CAs.",
                        file=True)
    cert_file: str = _opt("", "Client certificate (PEM) for brokers that require one.",
                          file=True)
    key_file: str = _opt("", "Private key (PEM) of the client certificate.", file=True)
    client_id: str = _opt("", "MQTT client id. Empty: edgekit-controller-<id>.")
    keepalive_s: int = _opt(30, "MQTT keep-alive in seconds.", ge=5, le=3600)
    share_group: str = _opt("", "Shared-subscription group for metrics, events, samples and"
                            " rollout requests, so several controllers split the fleet's"
                            " messages ($share/<group>/...). Empty: plain subscriptions (one"
                            " controller, or a broker without shared subscriptions).",
                            pattern=_GROUP)


@dataclass
class IngestSection:
    workers: int = _opt(2, "Threads that write incoming messages to the database.", ge=1, le=64)
    queue_max: int = _opt(20000, "Messages waiting for a worker; past it the MQTT thread waits"
                          " (the broker holds the rest).", ge=1)
    samples: bool = _opt(True, "Store labelled samples sent by devices.")


@dataclass
class ServeSection:
    mqtt: bool = _opt(True, "Serve registered artifacts in chunks over MQTT.")
    share_group: str = _opt("edgekit-artifacts", "Shared-subscription group of the artifact"
                            " servers. Empty: plain subscriptions (brokers without shared"
                            " subscriptions, such as amqtt).", pattern=_GROUP)
    max_chunk: int = _opt(1024 * 1024, "Largest chunk sent, in bytes.",
                          ge=1024, le=16 * 1024 * 1024)
    http_listen: str = _opt("", "HOST:PORT of an HTTP artifact server; desired documents then"
                            " name its URL too. Empty: off.", pattern=_LISTEN)
    http_public_url: str = _opt("", "Base URL devices use to reach the HTTP server. Empty: the"
                                " bound address.")


@dataclass
class RolloutSection:
    canary: str = _opt("1", "Size of the first wave: a count (\"2\") or a share of the targets"
                       " (\"10%\", rounded up, at least 1).",
                       check=_canary, allows="a count or a percentage")
    wave_factor: float = _opt(2.0, "Each wave is this many times larger than the one before"
                              " (1: equal waves).", ge=1.0)
    device_timeout_s: float = _opt(300.0, "A device that has not succeeded or failed this long"
                                   " after it was asked counts as failed (timed out).", ge=0.1)
    max_failure_rate: float = _opt(0.2, "Abort when more than this share of the devices with an"
                                   " outcome failed or timed out ...", ge=0.0, le=1.0)
    min_devices: int = _opt(3, "... once at least this many devices have an outcome (a single"
                            " failure then aborts a rollout smaller than this).", ge=1)
    wave_min_labels: int = _opt(0, "Labelled predictions each device of a wave must report with"
                                " the new model before the next wave starts (0: do not wait).",
                                ge=0)
    labels_timeout_s: float = _opt(600.0, "How long a wave waits for those labels.", ge=0.1)
    labels_timeout_action: str = _opt("continue", "When the labels do not come in time:"
                                      " continue (with a warning event) or abort.",
                                      choices=_LABEL_TIMEOUT_ACTIONS)
    quality_metric: str = _opt("accuracy", "Field metric compared between the new and the"
                               " previous model: accuracy or f1 (macro).", choices=_METRICS)
    quality_margin: float = _opt(0.05, "Abort when the new model's metric on the updated devices"
                                 " is below the previous model's on the same devices by more"
                                 " than this.", ge=0.0, le=1.0)
    quality_min_labels: int = _opt(50, "Labels needed, for each model, before the quality check"
                                   " decides anything.", ge=1)
    include_offline: bool = _opt(False, "Make offline devices targets too (they time out unless"
                                 " they come back in time); off: they follow the fleet's"
                                 " document when they come back.")
    rollback_timeout_s: float = _opt(300.0, "How long an aborted rollout waits for its devices"
                                     " to report the previous model again.", ge=0.1)
    probation_requests: int = _opt(20, "Requests a device serves with the new model before it"
                                   " commits it (0: no request count).", ge=0)
    probation_seconds: float = _opt(30.0, "Seconds a device serves the new model before it"
                                    " commits it (0: no time limit).", ge=0.0)
    deltas: bool = _opt(True, "Offer each device a delta (docs/ota.md) from the package it"
                        " serves, when the registry holds that package and the delta is"
                        " smaller than the new one; off: the full package only.")
    shadow_enabled: bool = _opt(False, "Shadow stage before the canary: the canary's devices"
                                " run the new model beside their own on live requests and"
                                " report; the canary starts only when the reports pass.")
    shadow_requests: int = _opt(200, "Shadowed requests each device reports on.", ge=1,
                                le=1_000_000)
    shadow_sample: float = _opt(0.2, "Share of live requests the new model also runs in the"
                                " shadow stage.", ge=0.001, le=1.0)
    shadow_timeout_s: float = _opt(600.0, "Abort when a device has not reported this long"
                                   " after the shadow stage began.", ge=1.0)
    shadow_min_agreement: float = _opt(0.9, "Every device's agreement (top-1 share, or mean"
                                       " cosine for embeddings) must reach this.", ge=-1.0,
                                       le=1.0)
    shadow_min_accuracy_delta: float = _opt(-0.02, "Where a device has shadow_min_labels"
                                            " labels: new accuracy minus serving accuracy must"
                                            " reach this.", ge=-1.0, le=1.0)
    shadow_min_labels: int = _opt(20, "Labelled rows a report needs before its accuracy"
                                  " counts.", ge=1)


@dataclass
class PolicySection:
    enabled: bool = _opt(False, "Run the maintenance policy (watch field quality, update the"
                         " model when it drops).")
    metric: str = _opt("accuracy", "Quality metric: accuracy, f1 (macro), or"
                       " estimated_accuracy (estimated without labels from every prediction's"
                       " output, by the accuracy estimate in the package; packages without one"
                       " report none).", choices=_POLICY_METRICS)
    threshold: float = _opt(0.0, "Breach when the fleet's metric is below this (0: off).",
                            ge=0.0, le=1.0)
    relative_drop: float = _opt(0.1, "Breach when the metric is this share below the model's"
                                " baseline in its manifest (0.1: 10% lower; 0: off).",
                                ge=0.0, le=1.0)
    min_labels: int = _opt(50, "Labels a window needs (over the fleet) to count.", ge=1)
    min_estimated: int = _opt(200, "Predictions with an accuracy estimate a window needs (over"
                              " the fleet) to count, with metric = estimated_accuracy.", ge=1)
    consecutive: int = _opt(3, "Breached windows in a row needed to act (hysteresis).", ge=1)
    interval_s: float = _opt(30.0, "Length of one policy window, in seconds.", ge=0.1)
    confidence_drop: float = _opt(0.15, "Warn when the mean confidence falls this far below the"
                                  " baseline (0: off).", ge=0.0, le=1.0)
    max_shift: float = _opt(0.25, "Warn when the prediction distribution moves this far from"
                            " the baseline (0: off).", ge=0.0)
    shift_measure: str = _opt("tv", "Distance of prediction distributions: tv (total"
                              " variation, 0..1) or psi (population stability index).",
                              choices=_SHIFT_MEASURES)
    samples_window_s: float = _opt(3600.0, "Labelled field samples from this many seconds back"
                                   " are the data candidates are judged (and retrained) on.",
                                   ge=1.0)
    min_samples: int = _opt(100, "Labelled samples needed before a candidate is judged.", ge=2)
    holdout_fraction: float = _opt(0.3, "Share of those samples held out for judging; the rest"
                                   " is what the retrain command gets.", ge=0.05, le=0.95)
    margin: float = _opt(0.02, "A candidate must beat the current model on the held-out"
                         " samples by at least this much to be rolled out.", ge=0.0, le=1.0)
    strategy: str = _opt("registry-then-retrain", "Where candidates come from: registry,"
                         " retrain, or registry-then-retrain (retrain only when no registered"
                         " model is good enough).", choices=_STRATEGIES)
    retrain_command: str = _opt("", "Command that trains a new model. Placeholders: {data}"
                                " (.npz of recent labelled samples), {model} (the current"
                                " .edgepkg), {output} (the file to write), {workdir}. Empty:"
                                " no retraining.", check=_retrain_command)
    retrain_output: str = _opt("candidate.onnx", "File name the retrain command writes: a"
                               " source model the converter reads (.onnx, .pt2, .keras, ...),"
                               " converted with the running model's recipe, or an .edgepkg.",
                               check=_plain_file_name, allows="a plain file name")
    retrain_timeout_s: float = _opt(900.0, "Longest a retrain command may run.", ge=1.0)
    cooldown_s: float = _opt(300.0, "After acting, wait this long before acting again.", ge=0.0)
    pick: str = _opt("offline", "How the candidate to roll out is chosen: offline (the best"
                     " on the held-out samples, if better by margin) or shadow (each candidate"
                     " shadowed in turn on the canary's devices; the best shadow evidence among"
                     " those that pass the rollout's shadow gate wins).", choices=_PICKS)
    shadow_candidates: int = _opt(3, "With pick = shadow: the most candidates shadowed (the"
                                  " best offline first).", ge=1, le=20)


@dataclass
class ConsoleSection:
    listen: str = _opt("", "Serve the fleet console (a web UI) on HOST:PORT. Empty: no"
                       " console. docs/console.md describes it.", pattern=_CONSOLE_LISTEN)
    password_hash: str = _opt("", "scrypt hash of the operator's password (`edgekit console"
                              " --hash-password` makes one); $EDGEKIT_CONSOLE_PASSWORD works"
                              " too. Neither: the console is read-only.", secret=True,
                              check=_scrypt_hash, allows="an scrypt hash")
    operator_key: str = _opt("", "Operator key: Ed25519 private key (PEM) that signs the"
                             " console's requests (rollout, abort, roll back); its public half"
                             " must be in controller.operator_keys. Empty: no actions.",
                             file=True)


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


def markdown() -> str:
    """A table of keys per section, for docs/controller.md."""
    parts = []
    keys = config_keys()
    for section in dict.fromkeys(k.section for k in keys):
        table = typedconfig.markdown_table([k for k in keys if k.section == section],
                                           {"key": lambda k: f"`{k.name}`"})
        parts.append(f"### `[{section}]`\n\n{table}")
    return "\n".join(parts)


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
    _fill_defaults(cfg)
    typedconfig.validate(cfg, keys.values(), sources, expand_user=True)
    _check_together(cfg, sources)
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


def _fill_defaults(cfg: ControllerConfig) -> None:
    if not cfg.controller.id:
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-._")[:48]
        cfg.controller.id = f"{host or 'controller'}-{uuid.uuid4().hex[:6]}"


def _check_together(cfg: ControllerConfig, sources: dict[str, str]) -> None:
    """The rules that tie several keys together (each key's own rules are on its field)."""
    def fail(dotted: str, problem: str, hint: str | None = None) -> ConfigError:
        return typedconfig.config_error(sources, dotted, problem, hint)

    fleets, m, p = cfg.controller.fleets, cfg.mqtt, cfg.policy
    if not fleets:
        raise fail("controller.fleets", "names no fleet", 'use ["+"] for every fleet')
    if "+" in fleets and len(fleets) > 1:
        raise fail("controller.fleets", '"+" already means every fleet; list nothing else')
    if bool(m.cert_file) != bool(m.key_file):
        raise fail("mqtt.key_file" if m.cert_file else "mqtt.cert_file",
                   "a client certificate needs both cert_file and key_file")
    if p.enabled and p.threshold == 0 and p.relative_drop == 0:
        raise fail("policy.threshold", "the policy is enabled but neither policy.threshold nor"
                   " policy.relative_drop is set, so it could never act",
                   "set one of them, or policy.enabled = false")
    if p.strategy == "retrain" and not p.retrain_command:
        raise fail("policy.retrain_command", "policy.strategy is retrain but no command is set")
