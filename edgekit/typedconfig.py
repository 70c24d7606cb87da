"""Typed configuration built from dataclasses: the machinery the agent and the controller share.

A configuration is a dataclass whose fields are section dataclasses; each section field is
declared with :func:`opt`: its default, its description, and what values it allows (bounds,
choices, a pattern, a check, an existing file), written on the field itself::

    keepalive_s: int = opt(30, "MQTT keep-alive in seconds.", ge=5, le=3600)

This module lists the keys, reads a TOML file, type-checks and sets values, checks every
value against its field's rules (:func:`validate`), renders the keys as a Markdown table for
the docs, and raises :class:`~edgekit.errors.ConfigError` naming the key and where its value
came from. Which sections exist, their other sources and the rules that tie several keys
together stay with each configuration (``device_agent.config``,
``edgekit.host.controller.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgekit.errors import ConfigError

__all__ = [
    "DOCS_BEGIN",
    "DOCS_END",
    "ConfigKey",
    "Invalid",
    "Pattern",
    "Rules",
    "Setter",
    "apply_file",
    "check_file",
    "config_error",
    "config_keys",
    "docs_block",
    "from_text",
    "markdown_table",
    "opt",
    "set_value",
    "suggest",
    "to_dict",
    "validate",
    "with_docs_block",
]

#: The lines around the key tables that ``docs/config_tables.py`` writes into the docs.
DOCS_BEGIN = "<!-- config keys: generated from the fields by `python docs/config_tables.py` -->"
DOCS_END = "<!-- end of config keys -->"

_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number",
               "bool": "true or false", "list": "a list of strings"}


class Invalid(Exception):
    """Raised by a field's ``check`` when a value is not allowed; :func:`validate` turns it
    into a :class:`ConfigError` that names the key and where the value came from."""

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


@dataclass(frozen=True)
class Pattern:
    """A regular expression a non-empty value must match in full, and what it means.

    The error reads ``<value> is not <meaning>``, followed by ``hint``.
    """

    regex: str
    meaning: str
    hint: str | None = None


@dataclass(frozen=True)
class Rules:
    """What values a key allows; checked by :func:`validate`, shown by :func:`markdown_table`.

    Numbers: ``ge`` / ``gt`` / ``le`` bounds (``or_zero``: 0 is allowed too, meaning off).
    Strings: ``choices``, a :class:`Pattern` (empty strings pass it unless ``required``), and
    ``file`` (a set value must be a readable file). ``check`` gets each value (each item of
    a list) and raises :class:`Invalid`; ``allows``, when given, is what the docs show.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    or_zero: bool = False
    choices: tuple[str, ...] = ()
    pattern: Pattern | None = None
    required: bool = False
    file: bool = False
    check: Callable[[Any], None] | None = None
    allows: str = ""

    def describe(self) -> str:
        """The allowed values in words (empty: anything of the key's type)."""
        if self.allows:
            return self.allows
        parts = []
        if self.choices:
            parts.append(", ".join(self.choices))
        if self.ge is not None and self.le is not None:
            parts.append(f"{self.ge:g}..{self.le:g}")
        elif self.ge is not None:
            parts.append(f"0 (off) or at least {self.ge:g}" if self.or_zero
                         else f"at least {self.ge:g}")
        elif self.le is not None:
            parts.append(f"at most {self.le:g}")
        if self.gt is not None:
            parts.append(f"more than {self.gt:g}")
        if self.pattern is not None:
            parts.append(self.pattern.meaning)
        if self.required:
            parts.append("not empty")
        if self.file:
            parts.append("a readable file")
        return "; ".join(parts)

    def problem(self, value: Any) -> Invalid | None:
        """Why ``value`` (one value, not a list) is not allowed, or None when it is."""
        number = isinstance(value, int | float) and not isinstance(value, bool)
        found = self._number_problem(value) if number else self._text_problem(value)
        if found is None and self.check is not None:
            try:
                self.check(value)
            except Invalid as exc:
                return exc
        return found

    def _text_problem(self, value: Any) -> Invalid | None:
        if self.required and value == "":
            return Invalid("must not be empty")
        if self.choices and value not in self.choices:
            return Invalid(f"{value!r} is not one of {', '.join(self.choices)}")
        if self.pattern is not None and value and not re.fullmatch(self.pattern.regex, value):
            return Invalid(f"{value!r} is not {self.pattern.meaning}", self.pattern.hint)
        return None

    def _number_problem(self, value: float) -> Invalid | None:
        if self.or_zero and value == 0:
            return None
        if self.ge is not None and self.le is not None and not self.ge <= value <= self.le:
            return Invalid(f"{value!r} is outside {self.ge:g}..{self.le:g}")
        if self.ge is not None and value < self.ge:
            return Invalid(f"{value!r} must be 0 (off) or at least {self.ge:g}" if self.or_zero
                           else f"{value!r} is less than {self.ge:g}")
        if self.le is not None and value > self.le:
            return Invalid(f"{value!r} is more than {self.le:g}")
        if self.gt is not None and value <= self.gt:
            return Invalid(f"{value!r} must be more than {self.gt:g}")
        return None


def opt(default: Any, help: str, *, path: bool = False, secret: bool = False,
        ge: float | None = None, gt: float | None = None, le: float | None = None,
        or_zero: bool = False, choices: tuple[str, ...] = (), pattern: Pattern | None = None,
        required: bool = False, file: bool = False, check: Callable[[Any], None] | None = None,
        allows: str = "") -> Any:
    """A section field: its default, its description and the values it allows (:class:`Rules`).

    ``path``: relative values in a file are relative to the file (``file`` implies it);
    ``secret``: shown as ``***``. A list default is copied per use.
    """
    rules = Rules(ge=ge, gt=gt, le=le, or_zero=or_zero, choices=choices, pattern=pattern,
                  required=required, file=file, check=check, allows=allows)
    meta = {"help": help, "path": path or file, "secret": secret, "rules": rules}
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
    rules: Rules = Rules()

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
                                 f.metadata["secret"], f.metadata["rules"]))
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


def validate(cfg: Any, keys: Iterable[ConfigKey], sources: Mapping[str, str], *,
             expand_user: bool = False) -> None:
    """Check every value of ``cfg`` against the rules on its field (each item of a list on
    its own, named ``key[i]``).

    Raises:
        ConfigError: the first value that is not allowed, naming its key and its source.
    """
    for key in keys:
        value = getattr(getattr(cfg, key.section), key.name)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            dotted = key.dotted if i is None else f"{key.dotted}[{i}]"
            invalid = key.rules.problem(item)
            if invalid is not None:
                raise config_error(sources, dotted, invalid.problem, invalid.hint)
            if key.rules.file and item:
                check_file(lambda d, p: config_error(sources, d, p), dotted, item,
                           expand_user=expand_user)


def config_error(sources: Mapping[str, str], dotted: str, problem: str,
                 hint: str | None = None) -> ConfigError:
    """``config <key> (from <source>): <problem>``; a list item (``key[0]``) came from
    wherever its list came from."""
    origin = sources.get(dotted) or sources.get(dotted.split("[", 1)[0], "the default")
    return ConfigError(f"config {dotted} (from {origin}): {problem}", hint=hint)


def markdown_table(keys: Iterable[K], columns: Mapping[str, Callable[[K], str]]) -> str:
    """A Markdown table of ``keys``: the ``columns`` (title: cell of a key) first, then type,
    default, allowed values and meaning, all from the fields."""
    every: dict[str, Callable[[K], str]] = {
        **columns,
        "type": lambda k: k.type,
        "default": lambda k: f"`{json.dumps(k.default)}`",
        "allowed": lambda k: k.rules.describe(),
        "meaning": lambda k: k.help,
    }
    lines = ["| " + " | ".join(every) + " |", "|" + "---|" * len(every)]
    for key in keys:
        cells = [html.escape(cell(key), quote=False).replace("|", "\\|")
                 for cell in every.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def docs_block(doc: str) -> str:
    """The generated part of a docs page (between the markers), or an empty string."""
    if DOCS_BEGIN not in doc or DOCS_END not in doc:
        return ""
    return doc.split(DOCS_BEGIN, 1)[1].split(DOCS_END, 1)[0].strip("\n") + "\n"


def with_docs_block(doc: str, block: str) -> str:
    """``doc`` with its generated part replaced by ``block``.

    Raises:
        ValueError: the page has no markers.
    """
    if DOCS_BEGIN not in doc or DOCS_END not in doc:
        raise ValueError(f"the page lacks the lines {DOCS_BEGIN!r} and {DOCS_END!r}")
    head, rest = doc.split(DOCS_BEGIN, 1)
    tail = rest.split(DOCS_END, 1)[1]
    return f"{head}{DOCS_BEGIN}\n\n{block.strip()}\n\n{DOCS_END}{tail}"
