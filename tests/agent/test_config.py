"""Configuration: file < environment < flags, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _agent_support import Models

from device_agent.config import (
    broker_address,
    config_keys,
    http_address,
    load_config,
    markdown,
)
from edgekit.errors import ConfigError
from edgekit.typedconfig import docs_block

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_need_a_trust_decision() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={})
    assert "model.trusted_keys" in err.value.message
    assert "--allow-unsigned" in (err.value.hint or "")


def test_file_env_and_flags_override_in_order(tmp_path: Path, models: Models) -> None:
    cfg_file = _write(tmp_path / "agent.toml", f"""
[device]
id = "from-file"
fleet = "file-fleet"

[mqtt]
broker = "mqtt://broker.local"

[model]
dir = "models"
trusted_keys = ["{models.public_key}"]

[telemetry]
interval_s = 5
""")
    env = {"EDGEKIT_DEVICE_ID": "from-env", "EDGEKIT_TELEMETRY_INTERVAL_S": "2.5",
           "EDGEKIT_MODEL_ALLOW_UNSIGNED": "yes", "EDGEKIT_RUNTIME_PROVIDERS":
           "CUDAExecutionProvider, CPUExecutionProvider", "UNRELATED": "x"}
    cfg = load_config(cfg_file, env=env, overrides={"device.fleet": "flag-fleet"})
    assert cfg.device.id == "from-env"  # env beats file
    assert cfg.device.fleet == "flag-fleet"  # flag beats file
    assert cfg.telemetry.interval_s == 2.5
    assert cfg.model.allow_unsigned is True
    assert cfg.runtime.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # A relative path in a file is relative to the file.
    assert Path(cfg.model.dir) == tmp_path / "models"
    assert cfg.state_dir == tmp_path / "models" / "state"
    addr = broker_address(cfg.mqtt)
    assert addr is not None and (addr.host, addr.port, addr.tls) == ("broker.local", 1883, False)
    assert cfg.client_id == "edgekit-flag-fleet-from-env"


def test_broker_urls_and_credentials() -> None:
    base = {"model.allow_unsigned": True}
    cfg = load_config(env={}, overrides={**base, "mqtt.broker": "mqtts://u%40x:p%3Aw@h.example"})
    addr = broker_address(cfg.mqtt)
    assert addr is not None
    assert (addr.host, addr.port, addr.tls, addr.username, addr.password) == (
        "h.example", 8883, True, "u@x", "p:w")
    cfg = load_config(env={"EDGEKIT_MQTT_PASSWORD": "secret"},
                      overrides={**base, "mqtt.broker": "mqtt://h:1999", "mqtt.username": "me"})
    addr = broker_address(cfg.mqtt)
    assert addr is not None and (addr.port, addr.username, addr.password) == (1999, "me", "secret")
    assert cfg.to_dict()["mqtt"]["password"] == "***"
    assert http_address("[::1]:8080") == ("::1", 8080)
    assert http_address("0.0.0.0:0") == ("0.0.0.0", 0)


@pytest.mark.parametrize(
    ("overrides", "env", "key", "problem"),
    [
        ({"mqtt.broker": "http://x:1"}, {}, "mqtt.broker", "scheme 'http'"),
        ({"mqtt.broker": "mqtt://:1883"}, {}, "mqtt.broker", "names no host"),
        ({"mqtt.broker": "mqtt://h:99999"}, {}, "mqtt.broker", "not a URL"),
        ({"device.id": "a/b"}, {}, "device.id", "not a valid id"),
        ({"device.fleet": "+"}, {}, "device.fleet", "not a valid id"),
        ({}, {"EDGEKIT_DEVICE_ID": "_fleet"}, "device.id", "not a valid id"),
        ({"http.listen": "8080"}, {}, "http.listen", "not HOST:PORT"),
        ({"mqtt.broker": "mqtt://h", "mqtt.ca_file": "/etc/hostname"}, {}, "mqtt.ca_file",
         "not mqtts://"),
        ({"mqtt.broker": "mqtts://h", "mqtt.cert_file": "/etc/hostname"}, {}, "mqtt.key_file",
         "needs both"),
        ({"mqtt.broker": "mqtts://h", "mqtt.ca_file": "/nonexistent/ca.pem"}, {}, "mqtt.ca_file",
         "not found"),
        ({"model.package": "/nonexistent/m.edgepkg"}, {}, "model.package", "not found"),
        ({"samples.fraction": 1.5}, {}, "samples.fraction", "outside 0..1"),
        ({"telemetry.interval_s": 0.01}, {}, "telemetry.interval_s", "at least 0.1"),
        ({"telemetry.queue_max": 0}, {}, "telemetry.queue_max", "less than 1"),
        ({"mqtt.keepalive_s": 1}, {}, "mqtt.keepalive_s", "outside 5..3600"),
        ({"runtime.providers": ["cuda"]}, {}, "runtime.providers[0]", "not an execution provider"),
        ({"agent.log_level": "loud"}, {}, "agent.log_level", "not one of"),
        ({}, {"EDGEKIT_TELEMETRY_QUEUE_MAX": "many"}, "telemetry.queue_max", "not an integer"),
        ({}, {"EDGEKIT_MODEL_ALLOW_UNSIGNED": "perhaps"}, "model.allow_unsigned", "not true or false"),
        ({"runtime.threads": "4"}, {}, "runtime.threads", "expected an integer"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, env: dict, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env=env, overrides={"model.allow_unsigned": True, **overrides})
    message = err.value.message
    assert f"config {key}" in message
    assert problem in message
    if env:
        assert f"(from environment variable EDGEKIT_{key.upper().replace('.', '_')})" in message
    elif key.split("[")[0] in overrides:
        assert "(from the command line)" in message
    else:
        assert "(from the default)" in message


def test_file_errors_name_the_key_and_suggest(tmp_path: Path, models: Models) -> None:
    bad = _write(tmp_path / "a.toml", '[mqtt]\nbrokr = "mqtt://h"\n')
    with pytest.raises(ConfigError, match=r"unknown key mqtt.brokr \(did you mean broker\?\)"):
        load_config(bad, env={})
    bad = _write(tmp_path / "b.toml", '[mqqt]\nbroker = "mqtt://h"\n')
    with pytest.raises(ConfigError, match=r"unknown section \[mqqt\] \(did you mean mqtt\?\)"):
        load_config(bad, env={})
    bad = _write(tmp_path / "c.toml", "[telemetry]\ninterval_s = 'often'\n")
    with pytest.raises(ConfigError, match=r"telemetry.interval_s .*expected a number, found str"):
        load_config(bad, env={})
    bad = _write(tmp_path / "d.toml", "[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
    wrong_key = _write(tmp_path / "e.toml", f'[model]\ntrusted_keys = ["{tmp_path / "a.toml"}"]\n')
    with pytest.raises(ConfigError, match=r"model.trusted_keys\[0\].*not a PEM public key"):
        load_config(wrong_key, env={})


def test_every_key_has_a_default_description_and_doc_row() -> None:
    doc = (REPO / "docs" / "devices.md").read_text()
    for key in config_keys():
        assert key.help and key.help.endswith("."), key.dotted
        assert re.match(r"^EDGEKIT_[A-Z]+_[A-Z_]+$", key.env)
        assert f"`{key.dotted}`" in doc, f"docs/devices.md does not describe {key.dotted}"
    # The table is generated from the fields: defaults, bounds and help cannot drift.
    assert docs_block(doc) == markdown(), "run `python docs/config_tables.py`"
