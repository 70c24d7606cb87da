"""``edgekit-agent``: exit codes and messages of ``run``, and the other commands."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from _agent_support import Models, run_agent_cli, wait_until
from click.testing import CliRunner
from mqtt_broker import free_port

from device_agent.cli import cli
from device_agent.config import config_keys


def test_unsigned_package_is_refused_without_allow_unsigned(models: Models,
                                                            tmp_path: Path) -> None:
    result = run_agent_cli(["run", "--device-id", "d", "--model", str(models.unsigned_v1),
                            "--model-dir", str(tmp_path / "m"), "--trusted-key",
                            str(models.public_key)])
    assert result.returncode == 1
    assert "error: " in result.stderr and "is not signed" in result.stderr
    assert "hint: sign it" in result.stderr
    assert not list((tmp_path / "m").glob("active.json"))


def test_config_errors_stop_the_agent_with_exit_2(models: Models, tmp_path: Path) -> None:
    result = run_agent_cli(["run", "--model-dir", str(tmp_path / "m")])
    assert result.returncode == 2
    assert "config model.trusted_keys" in result.stderr and "--allow-unsigned" in result.stderr
    result = run_agent_cli(["run", "--allow-unsigned", "--model-dir", str(tmp_path / "m")],
                           env={"EDGEKIT_MQTT_BROKER": "tcp://h:1883"})
    assert result.returncode == 2
    assert "config mqtt.broker (from environment variable EDGEKIT_MQTT_BROKER)" in result.stderr
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[http]\nlisten = 8080\n")
    result = run_agent_cli(["run", "--config", str(cfg)])
    assert result.returncode == 2 and "config http.listen" in result.stderr
    assert "expected a string, found int" in result.stderr
    result = run_agent_cli(["run", "--threads", "many"])
    assert result.returncode == 2 and "--threads" in result.stderr


def test_http_only_agent_with_and_without_a_model(models: Models, tmp_path: Path,
                                                  agents: Any) -> None:
    port = free_port()
    empty = agents(["--device-id", "nomodel", "--model-dir", str(tmp_path / "empty"),
                    "--allow-unsigned", "--http", f"127.0.0.1:{port}"], tmp_path, name="empty")

    def health() -> tuple[int, dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
        except OSError:
            return None

    status, doc = wait_until(health, 60, "the HTTP API")
    assert status == 503 and doc["status"] == "no_model" and doc["model"] is None
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predict",
                                 data=json.dumps({"inputs": {"x": [[0] * 64]}}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("a prediction without a model succeeded")
    except urllib.error.HTTPError as err:
        assert err.code == 503 and json.loads(err.read())["error"]["code"] == "no_model"
    assert empty.terminate() == 0
    assert "waiting for one to be deployed" in empty.log()

    port = free_port()
    served = agents(["--device-id", "m", "--model-dir", str(tmp_path / "m"), "--model",
                     str(models.signed_v1), "--trusted-key", str(models.public_key),
                     "--http", f"127.0.0.1:{port}"], tmp_path, name="served")
    status, doc = wait_until(health, 60, "the HTTP API")
    assert status == 200 and doc["model"]["version"] == "1.0.0" and doc["mqtt"] is None
    assert served.terminate() == 0


def test_check_config_masks_secrets_and_lists_keys(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["check-config", "--allow-unsigned", "--broker",
                                 "mqtt://h:1", "--json"],
                           env={"EDGEKIT_MQTT_PASSWORD": "hunter2", "EDGEKIT_DEVICE_ID": "d9"})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["mqtt"]["password"] == "***" and doc["device"]["id"] == "d9"
    assert "hunter2" not in result.output
    result = runner.invoke(cli, ["check-config", "--keys", "--json"])
    rows = json.loads(result.stdout)
    assert [r["key"] for r in rows] == [k.dotted for k in config_keys()]
    assert all(r["help"] and r["env"].startswith("EDGEKIT_") for r in rows)


def test_install_service_writes_a_systemd_unit(models: Models, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nid = "pi-9"\nfleet = "lab"\n[model]\ndir = "{tmp_path}/models"\n'
                   f'trusted_keys = ["{models.public_key}"]\n')
    unit = tmp_path / "edgekit-agent.service"
    runner = CliRunner()
    result = runner.invoke(cli, ["install-service", "--config", str(cfg), "--output", str(unit)])
    assert result.exit_code == 0, result.output
    text = unit.read_text()
    assert "Restart=on-failure" in text and "RestartPreventExitStatus=2" in text
    assert "User=edgekit-agent" in text and "Group=edgekit-agent" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(f"run --config {cfg.resolve()}")
    assert f"ReadWritePaths={tmp_path}/models" in text
    assert "WantedBy=multi-user.target" in text and "pi-9" in text
    assert "useradd --system" in result.output and "systemctl enable --now edgekit-agent" in (
        result.output)
    again = runner.invoke(cli, ["install-service", "--config", str(cfg), "--output", str(unit)])
    assert again.exit_code == 2 and "exists" in again.output
    root = runner.invoke(cli, ["install-service", "--config", str(cfg), "--output",
                               str(tmp_path / "x.service"), "--user", "root"])
    assert root.exit_code == 2 and not (tmp_path / "x.service").exists()
    cfg.write_text("[device]\nid = 'a/b'\n")
    bad = runner.invoke(cli, ["install-service", "--config", str(cfg), "--output",
                              str(tmp_path / "y.service")])
    assert bad.exit_code == 2 and "device.id" in bad.output
    assert not (tmp_path / "y.service").exists()


def test_doctor_lists_runtimes_and_providers() -> None:
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    runtimes = {r["key"]: r for r in doc["runtimes"]}
    assert runtimes["onnxruntime"]["available"]
    assert "CPUExecutionProvider" in runtimes["onnxruntime"]["providers"]
    assert runtimes["litert"]["available"] and runtimes["litert"]["format"] == "tflite"
    text = CliRunner().invoke(cli, ["doctor"]).output
    assert "onnxruntime" in text and "CPUExecutionProvider" in text


def test_console_script_is_installed() -> None:
    script = shutil.which("edgekit-agent", path=str(Path(sys.executable).parent))
    assert script is not None
    result = run_agent_cli(["--version"])
    assert result.returncode == 0 and "edgekit-agent" in result.stdout


def test_an_http_port_in_use_is_a_clear_error(models: Models, tmp_path: Path) -> None:
    """The bind fails inside socketserver, which closes the server before the pool's own
    state existed: that used to end in an AttributeError traceback instead of the message."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_agent_cli(["run", "--device-id", "d", "--model", str(models.unsigned_v1),
                                "--allow-unsigned", "--model-dir", str(tmp_path / "m"),
                                "--http", f"127.0.0.1:{port}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "another http.listen address" in result.stderr
    assert "Traceback" not in result.stderr
