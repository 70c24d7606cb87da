"""The rules on configuration fields: checked in one place, errors naming the key, docs from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgekit import typedconfig
from edgekit.errors import ConfigError
from edgekit.typedconfig import ConfigKey, Invalid, Pattern, opt


def _even(value: int) -> None:
    if value % 2:
        raise Invalid(f"{value} is odd", "use an even number")


@dataclass
class _Section:
    count: int = opt(2, "A count.", ge=1, le=10)
    rate: float = opt(0.0, "A rate; 0: off.", ge=0.5, or_zero=True)
    wait_s: float = opt(1.0, "A wait.", gt=0)
    level: str = opt("info", "A level.", choices=("info", "debug"))
    names: list[str] = opt([], "Names.", pattern=Pattern(r"[a-z]+", "a lower-case name", "a..z"))
    pairs: int = opt(2, "Pairs.", check=_even, allows="an even number")
    key_file: str = opt("", "A file.", file=True)
    url: str = opt("x", "A URL.", required=True)


@dataclass
class _Config:
    part: _Section = field(default_factory=_Section)


def _load(**values: Any) -> _Config:
    cfg = _Config()
    keys = {k.dotted: k for k in typedconfig.config_keys(_Config, ConfigKey)}
    sources: dict[str, str] = {}
    for name, value in values.items():
        typedconfig.set_value(cfg, keys[f"part.{name}"], value, sources, "the test", None)
    typedconfig.validate(cfg, keys.values(), sources)
    return cfg


@pytest.mark.parametrize(("values", "key", "problem"), [
    ({"count": 0}, "part.count", "0 is outside 1..10"),
    ({"count": 11}, "part.count", "11 is outside 1..10"),
    ({"rate": 0.1}, "part.rate", "0.1 must be 0 (off) or at least 0.5"),
    ({"wait_s": 0.0}, "part.wait_s", "0.0 must be more than 0"),
    ({"level": "loud"}, "part.level", "'loud' is not one of info, debug"),
    ({"names": ["ok", "Bad"]}, "part.names[1]", "'Bad' is not a lower-case name"),
    ({"pairs": 3}, "part.pairs", "3 is odd"),
    ({"key_file": "/nonexistent/k.pem"}, "part.key_file", "file /nonexistent/k.pem not found"),
    ({"url": ""}, "part.url", "must not be empty"),
])
def test_each_rule_names_the_key_and_its_source(values: dict[str, Any], key: str,
                                                problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(**values)
    assert err.value.message == f"config {key} (from the test): {problem}"


def test_allowed_values_pass_and_hints_come_along(tmp_path: Path) -> None:
    key_file = tmp_path / "k.pem"
    key_file.write_text("key")
    cfg = _load(count=10, rate=0.0, wait_s=0.1, level="debug", names=["a", "b"], pairs=4,
                key_file=str(key_file))
    assert (cfg.part.count, cfg.part.names) == (10, ["a", "b"])
    with pytest.raises(ConfigError) as err:
        _load(names=["A"])
    assert err.value.hint == "a..z"
    with pytest.raises(ConfigError) as err:
        _load(pairs=1)
    assert err.value.hint == "use an even number"


def test_docs_table_shows_the_rules() -> None:
    keys = typedconfig.config_keys(_Config, ConfigKey)
    table = typedconfig.markdown_table(keys, {"key": lambda k: f"`{k.dotted}`"})
    lines = table.splitlines()
    assert lines[0] == "| key | type | default | allowed | meaning |"
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert rows["`part.count`"] == "| `part.count` | int | `2` | 1..10 | A count. |"
    assert "| 0 (off) or at least 0.5 |" in rows["`part.rate`"]
    assert "| info, debug |" in rows["`part.level`"]
    assert "| an even number |" in rows["`part.pairs`"]
    assert "| a readable file |" in rows["`part.key_file`"]
    page = f"intro\n{typedconfig.DOCS_BEGIN}\nold\n{typedconfig.DOCS_END}\noutro\n"
    new = typedconfig.with_docs_block(page, table)
    assert typedconfig.docs_block(new) == table
    assert new.startswith("intro\n") and new.endswith("outro\n")
