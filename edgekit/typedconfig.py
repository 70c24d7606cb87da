"""Typed configuration built from dataclasses: the machinery the agent and the controller share.

A configuration is a dataclass whose fields are section dataclasses; each section field is
declared with :func:`opt` (a default, a description, and whether the value is a path or a
secret). This module lists the keys, reads a TOML file, type-checks and sets values, and
raises :class:`~edgekit.errors.ConfigError` naming the key and where its value came from.
Which sections exist, their other sources and their validation rules stay with each
configuration (``device_agent.config``, ``edgekit.host.controller.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgekit.errors import ConfigError

__all__ = [
    "ConfigKey",
    "Setter",
    "apply_file",
    "check_file",
    "config_keys",
    "from_text",
    "opt",
    "set_value",
    "suggest",
    "to_dict",
]

_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number",
               "bool": "true or false", "list": "a list of strings"}


def opt(default: Any, help: str, *, path: bool = False, secret: bool = False) -> Any:
    """A section field with its default and description (a list default is copied per use)."""
    meta = {"help": help, "path": path, "secret": secret}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ConfigKey:
    """One configuration key, for error messages, docs and ``check-config --keys``."""

    section: str
    name: str
    type: str  # str | int | float | bool | list
    default: Any
    help: str
    path: bool
    secret: bool

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


K = TypeVar("K", bound=ConfigKey)
#: Sets one value: (config, key, value, sources, where it came from, folder of the file or None).
Setter = Callable[[Any, ConfigKey, Any, dict[str, str], str, Path | None], None]


def config_keys(config: type[Any], key_type: type[K]) -> list[K]:
    """Every key of the configuration dataclass ``config``, in declaration order."""
    keys = []
    sample = config()
    for section in dataclasses.fields(config):
        part = getattr(sample, section.name)
        for f in dataclasses.fields(part):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            keys.append(key_type(section.name, f.name,
                                 "list" if kind.startswith("list") else kind,
                                 getattr(part, f.name), f.metadata["help"], f.metadata["path"],
                                 f.metadata["secret"]))
    return keys


def to_dict(cfg: Any, keys: Iterable[ConfigKey], *,
            mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
    """``{section: {name: value}}`` of ``cfg``; set secrets read ``***`` unless unmasked."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        value = getattr(getattr(cfg, key.section), key.name)
        if key.secret and value and mask_secrets:
            value = "***"
        out.setdefault(key.section, {})[key.name] = value
    return out


def apply_file(cfg: Any, path: Path, keys: Mapping[str, ConfigKey], sources: dict[str, str], *,
               missing_hint: str, setter: Setter | None = None) -> None:
    """Set every value of the TOML file ``path`` on ``cfg`` (with ``setter``, else
    :func:`set_value`); relative paths in it are taken from the file's folder.

    Raises:
        ConfigError: the file is missing, unreadable or not TOML, a section or key is
            unknown (with the closest known name), or a value has the wrong type.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found", hint=missing_hint) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    sections = {k.section for k in keys.values()}
    for section, table in doc.items():
        if section not in sections:
            raise ConfigError(f"{path}: unknown section [{section}]" + suggest(section, sections),
                              hint=f"known sections: {', '.join(sorted(sections))}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}])")
        for name, value in table.items():
            dotted = f"{section}.{name}"
            if dotted not in keys:
                names = [k.name for k in keys.values() if k.section == section]
                raise ConfigError(f"{path}: unknown key {dotted}" + suggest(name, names),
                                  hint=f"keys of [{section}]: {', '.join(names)}")
            (setter or set_value)(cfg, keys[dotted], value, sources, str(path), path.parent)


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def from_text(raw: str, key: ConfigKey, where: str) -> Any:
    """The value of ``key`` written as text (an environment variable); lists are comma-separated.

    Raises:
        ConfigError: the text is not a value of the key's type.
    """
    text = raw.strip()
    try:
        if key.type == "bool":
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if key.type == "int":
            return int(text)
        if key.type == "float":
            return float(text)
    except ValueError as exc:
        raise ConfigError(f"config {key.dotted} (from {where}): {raw!r} is not"
                          f" {_TYPE_WORDS[key.type]}") from exc
    if key.type == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    return raw


def set_value(cfg: Any, key: ConfigKey, value: Any, sources: dict[str, str], where: str,
              base: Path | None, *, expand_user: bool = False) -> None:
    """Type-check ``value``, make a relative path key relative to ``base`` (a config file's
    folder), set it on ``cfg`` and record ``where`` it came from. With ``expand_user``, a
    ``~/...`` path counts as absolute.

    Raises:
        ConfigError: the value is not of the key's type.
    """
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[key.type]
    if not ok:
        raise ConfigError(f"config {key.dotted} (from {where}): expected"
                          f" {_TYPE_WORDS[key.type]}, found {type(value).__name__} {value!r}")
    if key.type == "float":
        value = float(value)
    if key.path and base is not None:
        # Relative paths in a file are relative to the file, as a reader of the file expects.
        if isinstance(value, list):
            value = [str(base / v) if v and not Path(v).is_absolute() else v for v in value]
        elif value and not _as_path(value, expand_user).is_absolute():
            value = str(base / value)
    setattr(getattr(cfg, key.section), key.name, value)
    sources[key.dotted] = where


def check_file(fail: Callable[[str, str], Exception], dotted: str, value: str, *,
               expand_user: bool = False) -> None:
    """Check that the file ``value`` of key ``dotted`` exists and is readable.

    Raises:
        Exception: what ``fail(dotted, problem)`` returns, when it is not.
    """
    p = _as_path(value, expand_user)
    if not p.is_file():
        raise fail(dotted, f"file {value} not found")
    if not os.access(p, os.R_OK):
        raise fail(dotted, f"file {value} is not readable by this user")


def _as_path(value: str, expand_user: bool) -> Path:
    return Path(value).expanduser() if expand_user else Path(value)
