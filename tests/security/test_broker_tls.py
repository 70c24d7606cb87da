"""End to end on the shipped broker configuration: a real agent with its own client
certificate, and ``edgekit deploy`` with the host's, update the device over TLS through the
ACL; passwords come from the environment or a file, never from the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from _limits_support import (  # noqa: F401  (fixtures)
    HOST_IDENTITY,
    REPO,
    Agent,
    LimitsPackages,
    Pki,
    ShippedBroker,
    limits_pkgs,
    make_pki,
    read_retained_doc,
    wait_until,
)
from click.testing import CliRunner

import edgekit.protocol.ota as ota
from edgekit.host.cli import cli
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import read_retained

FLEET = "tls"
DEVICE = "dev-a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), [HOST_IDENTITY, DEVICE])


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ShippedBroker]:
    broker = ShippedBroker(tmp_path_factory.mktemp("tls-broker"), pki)
    yield broker
    broker.stop()


def _host_tls(pki: Pki) -> list[str]:
    ident = pki.clients[HOST_IDENTITY]
    return ["--ca-file", str(pki.ca), "--cert-file", str(ident.cert), "--key-file",
            str(ident.key)]


def test_agent_updates_over_tls_with_client_certificates(
        shipped: ShippedBroker, pki: Pki, limits_pkgs: LimitsPackages, tmp_path: Path) -> None:
    ident = pki.clients[DEVICE]
    agent = Agent(tmp_path / DEVICE, types.SimpleNamespace(url=shipped.url), FLEET,  # type: ignore[arg-type]
                  DEVICE, limits_pkgs.ota,
                  env={"EDGEKIT_MQTT_CA_FILE": str(pki.ca),
                       "EDGEKIT_MQTT_CERT_FILE": str(ident.cert),
                       "EDGEKIT_MQTT_KEY_FILE": str(ident.key)})
    try:
        agent.wait_healthy()
        # The deploy's pre-flight reads the device's retained status: wait until the agent's
        # TLS connection is up and its birth status is retained on the broker.
        host = pki.clients[HOST_IDENTITY]
        status_topic = f"edgekit/v1/{FLEET}/{DEVICE}/status"
        with HostClient(shipped.url, ca_file=str(pki.ca), cert_file=str(host.cert),
                        key_file=str(host.key)).connect() as client:
            wait_until(lambda: read_retained(client, status_topic).get(status_topic), 60,
                       "the agent's retained status over TLS")
        result = CliRunner().invoke(cli, [
            "deploy", str(limits_pkgs.ota.v2), "--fleet", FLEET, "--device", DEVICE, "--direct",
            "--key", str(limits_pkgs.ota.operator_private),
            "--broker", shipped.url, *_host_tls(pki), "--probation-requests", "0",
            "--probation-seconds", "1", "--timeout", "120", "--json"])
        assert result.exit_code == 0, (result.output, agent.log(), shipped.log())
        out = json.loads(result.stdout)
        assert out["targets"][DEVICE]["outcome"] == "succeeded", out
        assert agent.predict_version() == "2.0.0"
        assert "connected to mqtts://" in agent.log()
    finally:
        agent.stop()


def test_password_on_the_command_line_is_refused(shipped: ShippedBroker, pki: Pki,
                                                 limits_pkgs: LimitsPackages) -> None:
    url = shipped.url.replace("mqtts://", "mqtts://edgekit-host:s3cret@")
    result = CliRunner().invoke(cli, ["deploy", str(limits_pkgs.ota.v1), "--fleet", FLEET,
                                      "--broker", url, "--no-wait", "--direct"])
    assert result.exit_code != 0
    assert "EDGEKIT_MQTT_PASSWORD" in result.output
    assert "s3cret" not in result.output


def test_password_from_environment_or_file(tmp_path: Path, pki: Pki,
                                           limits_pkgs: LimitsPackages) -> None:
    passwd = tmp_path / "edgekit.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), HOST_IDENTITY, "h0st"],
                   check=True, capture_output=True)
    broker = ShippedBroker(tmp_path / "pw", pki, password_file=passwd)
    secret_file = tmp_path / "secret"
    secret_file.write_text("h0st\n")
    try:
        base = ["deploy", str(limits_pkgs.ota.v1), "--fleet", FLEET, "--device", DEVICE,
                "--key", str(limits_pkgs.ota.operator_private), "--broker", broker.url, "--ca-file", str(pki.ca), "--username", HOST_IDENTITY,
                "--no-wait", "--direct"]
        wrong = CliRunner().invoke(cli, base, env={"EDGEKIT_MQTT_PASSWORD": "nope"})
        assert wrong.exit_code != 0 and "refused" in wrong.output, wrong.output
        by_env = CliRunner().invoke(cli, base, env={"EDGEKIT_MQTT_PASSWORD": "h0st"})
        assert by_env.exit_code == 0, by_env.output
        by_file = CliRunner().invoke(cli, [*base, "--password-file", str(secret_file)],
                                     env={"EDGEKIT_MQTT_PASSWORD": ""})
        assert by_file.exit_code == 0, by_file.output
        doc = read_retained_doc(broker.url, ota.desired_topic(FLEET, DEVICE), pki,
                                HOST_IDENTITY, "h0st")
        assert doc["model"]["version"] == "1.0.0"
        assert "h0st" not in by_env.output + by_file.output
    finally:
        broker.stop()


def test_controller_connects_with_the_shared_options(tmp_path: Path, pki: Pki) -> None:
    passwd = tmp_path / "edgekit.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), HOST_IDENTITY, "c:tl/@#pw"],
                   check=True, capture_output=True)
    broker = ShippedBroker(tmp_path / "pw", pki, password_file=passwd)
    secret_file = tmp_path / "secret"
    secret_file.write_text("c:tl/@#pw\n")
    log_path = tmp_path / "controller.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgekit.host.cli", "controller", "run", "--broker",
                 broker.url, "--ca-file", str(pki.ca), "--username", HOST_IDENTITY,
                 "--password-file", str(secret_file), "--db", f"sqlite:///{tmp_path / 'c.db'}",
                 "--store", str(tmp_path / "store"), "--fleet", FLEET],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: b"running" in log_path.read_bytes() or proc.poll() is not None,
                       60, "the controller to connect")
            assert proc.poll() is None, log_path.read_text()
        finally:
            proc.terminate()
            proc.wait(30)
        assert "c:tl/@#pw" not in log_path.read_text()
    finally:
        broker.stop()
