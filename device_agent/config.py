"""The agent's configuration: one typed, validated place.

Sources, each overriding the one before: the defaults below, a TOML file (``--config``),
``EDGEKIT_<SECTION>_<KEY>`` environment variables (``EDGEKIT_MQTT_BROKER``), command-line
flags. Every key has a default, a description and the values it allows, written on its
field (``edgekit-agent check-config --keys`` lists them; docs/devices.md has the table,
generated from the fields by ``python docs/config_tables.py``). :func:`load_config` raises one
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
from edgekit.errors import ConfigError, ProtocolError, UsageError
from edgekit.protocol import check_id
from edgekit.protocol.ota import DEFAULT_CHUNK_BYTES, parse_window
from edgekit.protocol.ota import MAX_CHUNK_BYTES as _MAX_CHUNK
from edgekit.protocol.ota import MAX_KBPS as _MAX_KBPS
from edgekit.signing import load_public_key
from edgekit.typedconfig import Invalid, Pattern
from edgekit.typedconfig import opt as _opt

__all__ = [
    "AgentConfig",
    "BrokerAddress",
    "ConfigKey",
    "broker_address",
    "config_keys",
    "http_address",
    "load_config",
    "markdown",
]

ENV_PREFIX = "EDGEKIT_"
_LOG_LEVELS = ("debug", "info", "warning", "error")
_ID_RULE = "1 to 64 letters, digits, _ . -, starting with a letter or digit"
_LISTEN_RE = re.compile(r"^(\[[^\]]+\]|[^:\[\]]+):(\d{1,5})$")
_CLIENT_ID = Pattern(r"[A-Za-z0-9_.:-]{1,128}", "a valid client id",
                     "use up to 128 letters, digits or _ . : -")
_PROVIDER = Pattern(r"[A-Za-z]+ExecutionProvider", "an execution provider name",
                    "for example CUDAExecutionProvider")


def _an_id(value: str) -> None:
    try:
        check_id(value, "id")
    except UsageError as exc:
        raise Invalid(f"{value!r} is not a valid id", exc.hint) from exc


def _broker(value: str) -> None:
    problem, hint = _parse_broker(value, "", "")[1]
    if problem:
        raise Invalid(problem, hint)


def _public_key(value: str) -> None:
    try:
        load_public_key(value)
    except UsageError as exc:
        raise Invalid(exc.message,
                      "give the PEM public key made by `edgekit keys generate`") from exc


def _window(value: str) -> None:
    try:
        parse_window(value, "window")
    except ProtocolError as exc:
        raise Invalid(exc.message, exc.hint) from exc


def _listen(value: str) -> None:
    match = _LISTEN_RE.match(value)
    if value and (not match or int(match.group(2)) > 65535):
        raise Invalid(f"{value!r} is not HOST:PORT",
                      "for example 127.0.0.1:8080 (port 0 picks a free port)")


@dataclass
class DeviceSection:
    id: str = _opt("", "Device id, unique in its fleet (letters, digits, _ . -). Empty: the host"
                   " name.", check=_an_id, allows=_ID_RULE)
    fleet: str = _opt("default", "Fleet the device belongs to; the second level of its topics.",
                      check=_an_id, allows=_ID_RULE)


@dataclass
class MqttSection:
    broker: str = _opt("", "Broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)."
                       " Empty: no MQTT (Python and HTTP APIs only).",
                       check=_broker, allows="empty, mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    username: str = _opt("", "User name for the broker (also accepted in the URL).")
    password: str = _opt("", "Password for the broker; prefer EDGEKIT_MQTT_PASSWORD.",
                         secret=True)
    ca_file: str = _opt("", "CA certificate (PEM) that signed the broker's certificate;"
                        " empty: the system's CAs.", file=True)
    cert_file: str = _opt("", "Client certificate (PEM) for brokers that require one.",
                          file=True)
    key_file: str = _opt("", "Private key (PEM) of the client certificate.", file=True)
    client_id: str = _opt("", "MQTT client id. Empty: edgekit-<fleet>-<device>.",
                          pattern=_CLIENT_ID)
    keepalive_s: int = _opt(30, "Keep-alive in seconds; the broker declares the device"
                            " offline after 1.5 times this without traffic.", ge=5, le=3600)
    reconnect_min_s: float = _opt(1.0, "First wait before reconnecting; doubles per failure.",
                                  gt=0)
    reconnect_max_s: float = _opt(60.0, "Longest wait between reconnection attempts.")


@dataclass
class ModelSection:
    dir: str = _opt("/var/lib/edgekit-agent/models", "Model folder: verified packages and the"
                    " record of the active one.", path=True, required=True)
    package: str = _opt("", "Package to start with: activated when the folder has no active"
                        " model or an older one.", file=True)
    trusted_keys: list[str] = _opt([], "Release keys: public keys (PEM) whose package"
                                   " signatures are accepted. Revoke one by removing it.",
                                   path=True, check=_public_key, allows="PEM public keys")
    allow_unsigned: bool = _opt(False, "Accept packages without a signature (off: refused).")
    keep: int = _opt(3, "Packages kept in the model folder (the active one included).", ge=1)


@dataclass
class RuntimeSection:
    threads: int = _opt(0, "Inference threads; 0: the runtime's default.", ge=0)
    providers: list[str] = _opt([], "onnxruntime execution providers in order of preference,"
                                " e.g. TensorrtExecutionProvider, CUDAExecutionProvider."
                                " Empty: CPU.", pattern=_PROVIDER)


@dataclass
class HttpSection:
    listen: str = _opt("", "HOST:PORT of the local HTTP API (127.0.0.1:8080). Empty: off.",
                       check=_listen, allows="empty or HOST:PORT")
    max_body_bytes: int = _opt(16 * 1024 * 1024, "Largest request body accepted (413 above).",
                               ge=1024)
    workers: int = _opt(16, "Threads that serve connections; more connections wait (up to four"
                        " per thread), then are closed at once.", ge=1)
    header_timeout_s: float = _opt(10.0, "A connection must send a request's line and headers"
                                   " within this time (also the keep-alive idle limit).", gt=0)
    body_timeout_s: float = _opt(30.0, "A request's body must arrive within this time.", gt=0)


@dataclass
class RequestsSection:
    max_batch: int = _opt(256, "Most rows one request may carry.", ge=1)
    workers: int = _opt(2, "Threads that answer MQTT requests.", ge=1)
    max_pending: int = _opt(64, "MQTT requests allowed to wait; more are answered 'busy'.", ge=1)
    max_request_bytes: int = _opt(8 * 1024 * 1024, "Largest MQTT predict payload; a larger one"
                                  " is answered with an error, never parsed.", ge=1024)


@dataclass
class TelemetrySection:
    interval_s: float = _opt(10.0, "Seconds between metrics messages; 0: none.",
                             ge=0.1, or_zero=True)
    queue_max: int = _opt(10000, "Bound of the on-disk store-and-forward queue, in messages;"
                          " the oldest are dropped (and counted) past it.", ge=1)
    queue_max_bytes: int = _opt(64 * 1024**2, "Bound of the same queue in bytes (topics and"
                                " payloads): telemetry spooled while no broker is reachable"
                                " stays within it; the oldest are dropped (and counted) past"
                                " it.", ge=64 * 1024, le=64 * 1024**3)
    thermal_dir: str = _opt("/sys/class/thermal", "Where the board's thermal zones are read.",
                            path=True)


@dataclass
class QualitySection:
    window: int = _opt(500, "Labelled predictions in the accuracy / F1 window.", ge=1)
    prediction_log: int = _opt(10000, "Recent predictions remembered so feedback can find"
                               " them.", ge=1)


@dataclass
class SamplesSection:
    fraction: float = _opt(0.0, "Fraction of labelled predictions sent on the samples topic"
                           " (input, label, prediction); 0: none.", ge=0.0, le=1.0)
    max_per_minute: int = _opt(30, "Rate limit of samples messages.", ge=0)


@dataclass
class OtaSection:
    enabled: bool = _opt(True, "Follow the desired documents and update the model over the air.")
    chunk_bytes: int = _opt(DEFAULT_CHUNK_BYTES, "Chunk size asked for over MQTT (capped under a"
                            " rate limit, see docs/ota.md).", ge=1024, le=_MAX_CHUNK)
    window: int = _opt(4, "Chunk requests in flight (of ota.chunk_bytes each).", ge=1)
    request_timeout_s: float = _opt(10.0, "A chunk request unanswered this long is sent again.",
                                    gt=0)
    stall_timeout_s: float = _opt(300.0, "A download without progress this long fails.", gt=0)
    max_artifact_bytes: int = _opt(1024**3, "Larger artifacts are refused (too_large).", ge=1)
    min_free_bytes: int = _opt(64 * 1024**2, "Disk space that must stay free after a download"
                               " (no_space).", ge=0)
    intent_keys: list[str] = _opt([], "Operator/controller keys: public keys (PEM) whose signed"
                                  " desired documents the device follows. Revoke one by"
                                  " removing it.", path=True, check=_public_key,
                                  allows="PEM public keys")
    allow_unsigned_intents: bool = _opt(False, "INSECURE lab setting: follow unsigned desired"
                                        " documents (anyone who can publish to the broker"
                                        " then picks the model). Off: refused.")
    max_kbps: int = _opt(0, "Thin links: ask for artifact bytes at most this many kilobits a"
                         " second (a token bucket on chunk requests); a desired document's"
                         " transfer.max_kbps lowers it. 0: no cap.", ge=0, le=_MAX_KBPS)
    maintenance_window: str = _opt("", "Thin links: download only between these local times,"
                                   " HH:MM-HH:MM (22:00-06:00 runs over midnight); wins over"
                                   " a desired document's transfer.window. Empty: any time.",
                                   check=_window, allows="empty or HH:MM-HH:MM")
    nice: int = _opt(10, "Verify and stage a downloaded model this many nice steps below the"
                     " agent's priority (Linux), so that requests to the model in service go"
                     " first. 0: at the agent's priority.", ge=0, le=19)
    direct_io: bool = _opt(True, "Write a download to disk with O_DIRECT where the file system"
                           " takes it (Linux), past the page cache: it does not push the"
                           " model in service out of memory. Off: plain writes.")


@dataclass
class AgentSection:
    state_dir: str = _opt("", "Agent state (telemetry queue, counters). Empty:"
                          " <model.dir>/state.", path=True)
    log_level: str = _opt("info", "Log level.", choices=_LOG_LEVELS)


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


def markdown() -> str:
    """The table of every key, for docs/devices.md."""
    return typedconfig.markdown_table(config_keys(), {
        "key": lambda k: f"`{k.dotted}`",
        "environment": lambda k: f"`{k.env}`" + (" (comma-separated)" if k.type == "list" else ""),
    })


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
    if not cfg.device.id:
        cfg.device.id = _default_device_id()
    typedconfig.validate(cfg, keys.values(), sources)
    _check_together(cfg, sources)
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
    address, (problem, hint) = _parse_broker(mqtt.broker, mqtt.username, mqtt.password)
    if problem:
        raise ConfigError(f"config mqtt.broker: {problem}", hint=hint)
    return address


def _parse_broker(url: str, username: str, password: str
                  ) -> tuple[BrokerAddress | None, tuple[str, str | None]]:
    if not url:
        return None, ("", None)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return None, (f"{url!r} is not a URL ({exc})", None)
    if parts.scheme not in ("mqtt", "mqtts"):
        return None, (f"scheme {parts.scheme or '(none)'!r} is not supported",
                      "use mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS")
    if not parts.hostname:
        return None, (f"{url!r} names no host", "use mqtt://HOST:PORT")
    if parts.path not in ("", "/") or parts.query:
        return None, (f"{url!r} has a path or query", "give only scheme, host and port")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=username or unquote(parts.username or ""),
        password=password or unquote(parts.password or ""),
    ), ("", None)


def http_address(listen: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a tuple, or None when empty.

    Raises:
        ConfigError: no port, or a port outside 0..65535.
    """
    try:
        _listen(listen)
    except Invalid as exc:
        raise ConfigError(f"config http.listen: {exc.problem}", hint=exc.hint) from exc
    match = _LISTEN_RE.match(listen)
    return (match.group(1).strip("[]"), int(match.group(2))) if match else None


def _default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip("_.-")[:64]
    return name or "device"


def _check_together(cfg: AgentConfig, sources: dict[str, str]) -> None:
    """The rules that tie several keys together (each key's own rules are on its field)."""
    def fail(dotted: str, problem: str, hint: str | None = None) -> ConfigError:
        return typedconfig.config_error(sources, dotted, problem, hint)

    mqtt = cfg.mqtt
    tls_files = [k for k in ("ca_file", "cert_file", "key_file") if getattr(mqtt, k)]
    if tls_files and urlsplit(mqtt.broker).scheme != "mqtts":
        raise fail(f"mqtt.{tls_files[0]}", "TLS files are set but the broker URL is not mqtts://",
                   hint="use mqtts://HOST:PORT, or remove the TLS files")
    if bool(mqtt.cert_file) != bool(mqtt.key_file):
        missing = "mqtt.key_file" if mqtt.cert_file else "mqtt.cert_file"
        raise fail(missing, "a client certificate needs both cert_file and key_file")
    if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
        raise fail("mqtt.reconnect_max_s", "must be at least mqtt.reconnect_min_s")
    if not cfg.model.trusted_keys and not cfg.model.allow_unsigned:
        raise fail("model.trusted_keys", "no trusted keys, and unsigned packages are refused:"
                   " no model could ever be accepted",
                   hint="pass --trusted-key PUB (the signer's public key), or --allow-unsigned"
                   " for unsigned test packages")
