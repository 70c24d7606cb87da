"""The agent's configuration: one typed, validated place.

Sources, each overriding the one before: the defaults below, a TOML file (``--config``),
``EDGEKIT_<SECTION>_<KEY>`` environment variables (``EDGEKIT_MQTT_BROKER``), command-line
flags. Every key has a default and a description (``edgekit-agent check-config --keys``
lists them; docs/devices.md has the table). :func:`load_config` raises one
:class:`~edgekit.errors.ConfigError` that names the key, where its value came from and what
is wrong with it; the agent does not start on a config error (exit 2).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgekit import typedconfig
from edgekit.errors import ConfigError, UsageError
from edgekit.protocol import check_id
from edgekit.signing import load_public_key
from edgekit.typedconfig import opt as _opt

__all__ = [
    "AgentConfig",
    "BrokerAddress",
    "ConfigKey",
    "broker_address",
    "config_keys",
    "http_address",
    "load_config",
]

ENV_PREFIX = "EDGEKIT_"
_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class DeviceSection:
    id: str = _opt("", "Device id, unique in its fleet (letters, digits, _ . -). Empty: the host"
                   " name.")
    fleet: str = _opt("default", "Fleet the device belongs to; the second level of its topics.")


@dataclass
class MqttSection:
    broker: str = _opt("", "Broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)."
                       " Empty: no MQTT (Python and HTTP APIs only).")
    username: str = _opt("", "User name for the broker (also accepted in the URL).")
    password: str = _opt("", "Password for the broker; prefer EDGEKIT_MQTT_PASSWORD.",
                         secret=True)
    ca_file: str = _opt("", "CA certificate (PEM) that signed the broker's certificate;"
                        " empty: the system's CAs.", path=True)
    cert_file: str = _opt("", "Client certificate (PEM) for brokers that require one.",
                          path=True)
    key_file: str = _opt("", "Private key (PEM) of the client certificate.", path=True)
    client_id: str = _opt("", "MQTT client id. Empty: edgekit-<fleet>-<device>.")
    keepalive_s: int = _opt(30, "Keep-alive in seconds; the broker declares the device"
                            " offline after 1.5 times this without traffic.")
    reconnect_min_s: float = _opt(1.0, "First wait before reconnecting; doubles per failure.")
    reconnect_max_s: float = _opt(60.0, "Longest wait between reconnection attempts.")


@dataclass
class ModelSection:
    dir: str = _opt("/var/lib/edgekit-agent/models", "Model folder: verified packages and the"
                    " record of the active one.", path=True)
    package: str = _opt("", "Package to start with: activated when the folder has no active"
                        " model or an older one.", path=True)
    trusted_keys: list[str] = _opt([], "Release keys: public keys (PEM) whose package"
                                   " signatures are accepted. Revoke one by removing it.",
                                   path=True)
    allow_unsigned: bool = _opt(False, "Accept packages without a signature (off: refused).")
    keep: int = _opt(3, "Packages kept in the model folder (the active one included).")


@dataclass
class RuntimeSection:
    threads: int = _opt(0, "Inference threads; 0: the runtime's default.")
    providers: list[str] = _opt([], "onnxruntime execution providers in order of preference,"
                                " e.g. TensorrtExecutionProvider, CUDAExecutionProvider."
                                " Empty: CPU.")


@dataclass
class HttpSection:
    listen: str = _opt("", "HOST:PORT of the local HTTP API (127.0.0.1:8080). Empty: off.")
    max_body_bytes: int = _opt(16 * 1024 * 1024, "Largest request body accepted (413 above).")


@dataclass
class RequestsSection:
    max_batch: int = _opt(256, "Most rows one request may carry.")
    workers: int = _opt(2, "Threads that answer MQTT requests.")
    max_pending: int = _opt(64, "MQTT requests allowed to wait; more are answered 'busy'.")


@dataclass
class TelemetrySection:
    interval_s: float = _opt(10.0, "Seconds between metrics messages; 0: none.")
    queue_max: int = _opt(10000, "Bound of the on-disk store-and-forward queue, in messages;"
                          " the oldest are dropped (and counted) past it.")
    thermal_dir: str = _opt("/sys/class/thermal", "Where the board's thermal zones are read.",
                            path=True)


@dataclass
class QualitySection:
    window: int = _opt(500, "Labelled predictions in the accuracy / F1 window.")
    prediction_log: int = _opt(10000, "Recent predictions remembered so feedback can find"
                               " them.")


@dataclass
class SamplesSection:
    fraction: float = _opt(0.0, "Fraction of labelled predictions sent on the samples topic"
                           " (input, label, prediction); 0: none.")
    max_per_minute: int = _opt(30, "Rate limit of samples messages.")


@dataclass
class OtaSection:
    enabled: bool = _opt(True, "Follow the desired documents and update the model over the air.")
    chunk_bytes: int = _opt(256 * 1024, "Chunk size asked for over MQTT.")
    window: int = _opt(4, "Chunk requests in flight.")
    request_timeout_s: float = _opt(10.0, "A chunk request unanswered this long is sent again.")
    stall_timeout_s: float = _opt(300.0, "A download without progress this long fails.")
    max_artifact_bytes: int = _opt(1024**3, "Larger artifacts are refused (too_large).")
    min_free_bytes: int = _opt(64 * 1024**2, "Disk space that must stay free after a download"
                               " (no_space).")
    intent_keys: list[str] = _opt([], "Operator/controller keys: public keys (PEM) whose signed"
                                  " desired documents the device follows. Revoke one by"
                                  " removing it.", path=True)
    allow_unsigned_intents: bool = _opt(False, "INSECURE lab setting: follow unsigned desired"
                                        " documents (anyone who can publish to the broker"
                                        " then picks the model). Off: refused.")


@dataclass
class AgentSection:
    state_dir: str = _opt("", "Agent state (telemetry queue, counters). Empty:"
                          " <model.dir>/state.", path=True)
    log_level: str = _opt("info", "debug, info, warning or error.")


@dataclass
class AgentConfig:
    """The whole configuration; build it with :func:`load_config` so it is validated."""

    device: DeviceSection = field(default_factory=DeviceSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    model: ModelSection = field(default_factory=ModelSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    http: HttpSection = field(default_factory=HttpSection)
    requests: RequestsSection = field(default_factory=RequestsSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    quality: QualitySection = field(default_factory=QualitySection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    ota: OtaSection = field(default_factory=OtaSection)
    agent: AgentSection = field(default_factory=AgentSection)

    @property
    def state_dir(self) -> Path:
        return Path(self.agent.state_dir) if self.agent.state_dir else Path(self.model.dir) / "state"

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edgekit-{self.device.fleet}-{self.device.id}"

    def to_dict(self, *, mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
        return typedconfig.to_dict(self, config_keys(), mask_secrets=mask_secrets)


class ConfigKey(typedconfig.ConfigKey):
    """One configuration key, for error messages, docs and ``check-config --keys``."""

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"


def config_keys() -> list[ConfigKey]:
    """Every key of :class:`AgentConfig`, in declaration order."""
    return typedconfig.config_keys(AgentConfig, ConfigKey)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Read the file, then the environment, then ``overrides`` ({"mqtt.broker": ...}); validate.

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, a value has the wrong
            type or fails a check. The message names the key and where the value came from.
    """
    cfg = AgentConfig()
    keys = {k.dotted: k for k in config_keys()}
    sources: dict[str, str] = {}
    if path is not None:
        typedconfig.apply_file(cfg, Path(path), keys, sources, missing_hint="pass the path of"
                                " an agent.toml, or leave --config out")
    for key in keys.values():
        raw = (os.environ if env is None else env).get(key.env)
        if raw is not None:
            where = f"environment variable {key.env}"
            typedconfig.set_value(cfg, key, typedconfig.from_text(raw, key, where), sources,
                                   where, None)
    for dotted, value in (overrides or {}).items():
        if dotted not in keys:
            raise ConfigError(f"unknown config key {dotted}")
        typedconfig.set_value(cfg, keys[dotted], value, sources, "the command line", None)
    _validate(cfg, sources)
    return cfg


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str
    password: str

    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def broker_address(mqtt: MqttSection) -> BrokerAddress | None:
    """The parsed broker URL (config credentials win over the URL's), or None for no MQTT.

    Raises:
        ConfigError: the URL is not mqtt:// or mqtts:// with a host and a valid port.
    """
    address, problem = _parse_broker(mqtt)
    if problem[0]:
        raise ConfigError(f"config mqtt.broker: {problem[0]}", hint=problem[1])
    return address


def _parse_broker(mqtt: MqttSection) -> tuple[BrokerAddress | None, tuple[str, str | None]]:
    if not mqtt.broker:
        return None, ("", None)
    try:
        parts = urlsplit(mqtt.broker)
        port = parts.port
    except ValueError as exc:
        return None, (f"{mqtt.broker!r} is not a URL ({exc})", None)
    if parts.scheme not in ("mqtt", "mqtts"):
        return None, (f"scheme {parts.scheme or '(none)'!r} is not supported",
                      "use mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS")
    if not parts.hostname:
        return None, (f"{mqtt.broker!r} names no host", "use mqtt://HOST:PORT")
    if parts.path not in ("", "/") or parts.query:
        return None, (f"{mqtt.broker!r} has a path or query", "give only scheme, host and port")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=mqtt.username or unquote(parts.username or ""),
        password=mqtt.password or unquote(parts.password or ""),
    ), ("", None)


_LISTEN_RE = re.compile(r"^(\[[^\]]+\]|[^:\[\]]+):(\d{1,5})$")


def http_address(listen: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a tuple, or None when empty.

    Raises:
        ConfigError: no port, or a port outside 0..65535.
    """
    if not listen:
        return None
    match = _LISTEN_RE.match(listen)
    if not match or int(match.group(2)) > 65535:
        raise ConfigError(f"config http.listen: {listen!r} is not HOST:PORT",
                          hint="for example 127.0.0.1:8080 (port 0 picks a free port)")
    return match.group(1).strip("[]"), int(match.group(2))


def _default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip("_.-")[:64]
    return name or "device"


def _validate(cfg: AgentConfig, sources: dict[str, str]) -> None:
    def fail(dotted: str, problem: str, hint: str | None = None) -> ConfigError:
        where = sources.get(dotted.split("[")[0], "the default")
        return ConfigError(f"config {dotted} (from {where}): {problem}", hint=hint)

    if not cfg.device.id:
        cfg.device.id = _default_device_id()
    for dotted, value in (("device.id", cfg.device.id), ("device.fleet", cfg.device.fleet)):
        try:
            check_id(value, dotted)
        except UsageError as exc:
            raise fail(dotted, exc.message, exc.hint) from exc
    if cfg.agent.log_level not in _LOG_LEVELS:
        raise fail("agent.log_level", f"{cfg.agent.log_level!r} is not one of {_LOG_LEVELS}")
    address, problem = _parse_broker(cfg.mqtt)
    if problem[0]:
        raise fail("mqtt.broker", *problem)
    tls_files = [k for k in ("ca_file", "cert_file", "key_file") if getattr(cfg.mqtt, k)]
    if tls_files and (address is None or not address.tls):
        raise fail(f"mqtt.{tls_files[0]}", "TLS files are set but the broker URL is not mqtts://",
                   hint="use mqtts://HOST:PORT, or remove the TLS files")
    if bool(cfg.mqtt.cert_file) != bool(cfg.mqtt.key_file):
        missing = "mqtt.key_file" if cfg.mqtt.cert_file else "mqtt.cert_file"
        raise fail(missing, "a client certificate needs both cert_file and key_file")
    for name in tls_files:
        typedconfig.check_file(fail, f"mqtt.{name}", getattr(cfg.mqtt, name))
    if not 5 <= cfg.mqtt.keepalive_s <= 3600:
        raise fail("mqtt.keepalive_s", f"{cfg.mqtt.keepalive_s} is outside 5..3600 seconds")
    if cfg.mqtt.reconnect_min_s <= 0:
        raise fail("mqtt.reconnect_min_s", "must be more than 0")
    if cfg.mqtt.reconnect_max_s < cfg.mqtt.reconnect_min_s:
        raise fail("mqtt.reconnect_max_s", "must be at least mqtt.reconnect_min_s")
    if cfg.mqtt.client_id and not re.match(r"^[A-Za-z0-9_.:-]{1,128}$", cfg.mqtt.client_id):
        raise fail("mqtt.client_id", "use up to 128 letters, digits or _ . : -")
    if not cfg.model.dir:
        raise fail("model.dir", "must name a folder")
    if cfg.model.package:
        typedconfig.check_file(fail, "model.package", cfg.model.package)
    for i, key_path in enumerate(cfg.model.trusted_keys):
        try:
            load_public_key(key_path)
        except UsageError as exc:
            raise fail(f"model.trusted_keys[{i}]", exc.message,
                       "give the PEM public key made by `edgekit keys generate`") from exc
    if not cfg.model.trusted_keys and not cfg.model.allow_unsigned:
        raise fail("model.trusted_keys", "no trusted keys, and unsigned packages are refused:"
                   " no model could ever be accepted",
                   hint="pass --trusted-key PUB (the signer's public key), or --allow-unsigned"
                   " for unsigned test packages")
    for i, key_path in enumerate(cfg.ota.intent_keys):
        try:
            load_public_key(key_path)
        except UsageError as exc:
            raise fail(f"ota.intent_keys[{i}]", exc.message,
                       "give the operator's PEM public key (`edgekit keys generate"
                       " --role operator`)") from exc
    _positive: list[tuple[str, int, int]] = [
        ("model.keep", cfg.model.keep, 1), ("http.max_body_bytes", cfg.http.max_body_bytes, 1024),
        ("requests.max_batch", cfg.requests.max_batch, 1),
        ("requests.workers", cfg.requests.workers, 1),
        ("requests.max_pending", cfg.requests.max_pending, 1),
        ("telemetry.queue_max", cfg.telemetry.queue_max, 1),
        ("quality.window", cfg.quality.window, 1),
        ("quality.prediction_log", cfg.quality.prediction_log, 1),
        ("runtime.threads", cfg.runtime.threads, 0),
        ("samples.max_per_minute", cfg.samples.max_per_minute, 0),
        ("ota.chunk_bytes", cfg.ota.chunk_bytes, 1024), ("ota.window", cfg.ota.window, 1),
        ("ota.max_artifact_bytes", cfg.ota.max_artifact_bytes, 1),
        ("ota.min_free_bytes", cfg.ota.min_free_bytes, 0),
    ]
    for dotted, number, low in _positive:
        if number < low:
            raise fail(dotted, f"{number} is less than {low}")
    if cfg.telemetry.interval_s != 0 and cfg.telemetry.interval_s < 0.1:
        raise fail("telemetry.interval_s", f"{cfg.telemetry.interval_s} must be 0 (off) or at"
                   " least 0.1 seconds")
    for dotted, seconds in (("ota.request_timeout_s", cfg.ota.request_timeout_s),
                            ("ota.stall_timeout_s", cfg.ota.stall_timeout_s)):
        if seconds <= 0:
            raise fail(dotted, f"{seconds} must be more than 0 seconds")
    if cfg.ota.chunk_bytes > 4 * 1024 * 1024:
        raise fail("ota.chunk_bytes", f"{cfg.ota.chunk_bytes} is over the protocol's 4 MiB")
    if not 0.0 <= cfg.samples.fraction <= 1.0:
        raise fail("samples.fraction", f"{cfg.samples.fraction} is outside 0..1")
    for i, provider in enumerate(cfg.runtime.providers):
        if not re.match(r"^[A-Za-z]+ExecutionProvider$", provider):
            raise fail(f"runtime.providers[{i}]", f"{provider!r} is not an execution provider"
                       " name", hint="for example CUDAExecutionProvider")
    if cfg.http.listen:
        match = _LISTEN_RE.match(cfg.http.listen)
        if not match or int(match.group(2)) > 65535:
            raise fail("http.listen", f"{cfg.http.listen!r} is not HOST:PORT",
                       "for example 127.0.0.1:8080 (port 0 picks a free port)")
