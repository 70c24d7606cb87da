"""Key roles on the command line: ``edgekit keys generate --role`` and where commands that
sign intents find the operator key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.errors import UsageError
from edgekit.host.cli import cli
from edgekit.host.keys import operator_key
from edgekit.signing import key_id


def test_generate_names_keys_after_their_role(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for role in ("release", "operator"):
        result = runner.invoke(cli, ["keys", "generate", "--role", role, "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["role"] == role and out["private"] == f"edgekit-{role}.key"
        assert oct(os.stat(out["private"]).st_mode & 0o777) == "0o600"
    human = runner.invoke(cli, ["keys", "generate", "ops2", "--role", "operator"])
    assert "--intent-key" in human.output and "controller.operator_keys" in human.output
    assert runner.invoke(cli, ["keys", "generate", "--role", "root"]).exit_code == 2


def test_operator_key_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGEKIT_OPERATOR_KEY", raising=False)
    with pytest.raises(UsageError, match="no operator key"):
        operator_key(None)
    CliRunner().invoke(cli, ["keys", "generate", "--role", "operator"])
    default = operator_key(None)  # ./edgekit-operator.key
    CliRunner().invoke(cli, ["keys", "generate", "elsewhere"])
    monkeypatch.setenv("EDGEKIT_OPERATOR_KEY", "elsewhere.key")
    from_env = operator_key(None)
    given = operator_key("edgekit-operator.key")
    assert key_id(default.public_key()) == key_id(given.public_key())
    assert key_id(from_env.public_key()) != key_id(default.public_key())
    with pytest.raises(UsageError, match="not a PEM private key"):
        operator_key("edgekit-operator.pub")
