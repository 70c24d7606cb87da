"""A real MQTT broker for tests: mosquitto on a free port, else an embedded amqtt broker.

Use it from any test folder::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
    from mqtt_broker import MqttBroker, make_tls_files

    with MqttBroker(tmp_path, tls=make_tls_files(tmp_path / "tls"), persistence=True) as broker:
        broker.url        # mqtt://127.0.0.1:PORT
        broker.tls_url    # mqtts://127.0.0.1:PORT (mosquitto only; client cert required)
        broker.stop(); broker.start()   # same ports: an outage and a recovery; with
                                        # persistence, sessions and queued messages survive

``EDGEKIT_TEST_BROKER=amqtt`` forces the embedded broker (it runs MQTT 3.1.1, no TLS
here). The mosquitto binary is looked up on PATH and in /usr/sbin; `.ci/run` installs
Debian's ``mosquitto`` package when it is missing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["MqttBroker", "TlsFiles", "broker", "broker_kind", "free_port", "make_tls_files",
           "mosquitto_binary", "wait_until"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)


def broker_kind() -> str:
    forced = os.environ.get("EDGEKIT_TEST_BROKER")
    if forced in ("mosquitto", "amqtt"):
        return forced
    return "mosquitto" if mosquitto_binary() else "amqtt"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgekit test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name).public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), k

    server_cert, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                                   [x509.DNSName("localhost"),
                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = leaf("edgekit-test-device", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    return TlsFiles(
        ca=write_cert(ca_cert, folder / "ca.pem"),
        server_cert=write_cert(server_cert, folder / "server.pem"),
        server_key=write_key(server_key, folder / "server.key"),
        client_cert=write_cert(client_cert, folder / "client.pem"),
        client_key=write_key(client_key, folder / "client.key"),
    )


class MqttBroker:
    """A broker process on free ports of 127.0.0.1, restartable on the same ports."""

    def __init__(self, workdir: Path, *, tls: TlsFiles | None = None,
                 kind: str | None = None, persistence: bool = False) -> None:
        self.kind = kind or broker_kind()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls = tls
        self.persistence = persistence
        if (tls is not None or persistence) and self.kind != "mosquitto":
            raise RuntimeError("TLS and persistence need mosquitto")
        self.tls_port = free_port() if tls is not None else None
        self.log_path = self.workdir / f"{self.kind}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._command = self._write_config()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("this broker has no TLS listener")
        return f"mqtts://{self.host}:{self.tls_port}"

    def _write_config(self) -> list[str]:
        if self.kind == "mosquitto":
            binary = mosquitto_binary()
            if binary is None:
                raise RuntimeError("mosquitto is not installed")
            lines = [
                f"listener {self.port} {self.host}",
                "allow_anonymous true",
                f"persistence {'true' if self.persistence else 'false'}",
                f"persistence_location {self.workdir}/",
                "max_queued_messages 100000",
                f"log_dest file {self.log_path}",
                "log_type error", "log_type warning", "log_type notice",
            ]
            if os.geteuid() == 0:
                lines.append("user root")  # else mosquitto drops to a user that cannot read
            if self.tls is not None:
                lines += [
                    f"listener {self.tls_port} {self.host}",
                    f"cafile {self.tls.ca}",
                    f"certfile {self.tls.server_cert}",
                    f"keyfile {self.tls.server_key}",
                    "require_certificate true",
                ]
            conf = self.workdir / "mosquitto.conf"
            conf.write_text("\n".join(lines) + "\n")
            return [binary, "-c", str(conf)]
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]

    def start(self, timeout: float = 20.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        log = open(self.workdir / f"{self.kind}.stdout", "ab")  # noqa: SIM115 (owned by the child)
        self._proc = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        ports = [p for p in (self.port, self.tls_port) if p is not None]
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self._proc.returncode}: "
                                   + self.output())
            if all(_accepts(self.host, p) for p in ports):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not open ports {ports} in {timeout} s: "
                           + self.output())

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        text = ""
        for path in (self.log_path, self.workdir / f"{self.kind}.stdout"):
            if path.exists():
                text += path.read_text(errors="replace")[-4000:]
        return text

    def __enter__(self) -> MqttBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqttBroker]:
    """A broker shared by one test module; import this fixture where a module needs one."""
    with MqttBroker(tmp_path_factory.mktemp("broker")) as b:
        yield b


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
               interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; return its value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
