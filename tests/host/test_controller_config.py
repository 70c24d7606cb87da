"""Controller configuration errors name the key and where its value came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.errors import ConfigError
from edgekit.host.controller import load_config


def test_list_item_error_names_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"controller\.fleets\[1\] \(from the command line\)"):
        load_config(overrides={"controller.fleets": ["ok", "bad/fleet"]})
    conf = tmp_path / "controller.toml"
    conf.write_text('[controller]\nfleets = ["bad fleet"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert "controller.fleets[0]" in str(err.value)
    assert str(conf) in str(err.value) and "the default" not in str(err.value)
