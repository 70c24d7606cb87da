"""Helpers for the limits and broker tests: hostile packages, a plain file server, peak-memory
measurement of a subprocess or an agent, real agents and a host's view of a fleet (reused
from tests/ota), and certificates for per-device broker identities.

Everything runs for real: mosquitto on a free port, agent subprocesses, onnxruntime. Waits
poll with generous timeouts; no test asserts on wall-clock time.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
for _folder in (TESTS, TESTS / "ota"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from _ota_fleet import OPERATOR_KEY, Agent, Fleet, Packages, write_operator_key  # noqa: E402
from _ota_models import build_package  # noqa: E402
from mqtt_broker import MqttBroker, broker, free_port, mosquitto_binary, wait_until  # noqa: E402,F401

from edgekit.signing import generate_keypair, load_private_key  # noqa: E402

__all__ = ["HOST_IDENTITY", "REPO", "Agent", "Fleet", "Identity", "LimitsPackages", "MqttBroker",
           "Pki", "ShippedBroker", "broker", "build_package", "file_server", "free_port",
           "limits_pkgs", "make_agent", "make_pki", "mosquitto_binary", "peak_rss_kib",
           "python_peak_growth_mib", "read_retained_doc", "shipped_config", "wait_until",
           "write_bomb"]

@dataclass(frozen=True)
class LimitsPackages:
    """Signed good packages (the agents' Packages) plus the trusted key's files."""

    ota: Packages
    key: Any
    public_key: Path
    root: Path


@pytest.fixture(scope="session")
def limits_pkgs(tmp_path_factory: pytest.TempPathFactory) -> LimitsPackages:
    root = tmp_path_factory.mktemp("limits-pkgs")
    keys = generate_keypair(root / "signing")
    other = generate_keypair(root / "other")
    key, other_key = load_private_key(keys.private_path), load_private_key(other.private_path)

    def make(name: str, version: str, **kw: Any) -> Path:
        return build_package(root / f"{name}.edgepkg", version=version,
                             sign_key=kw.pop("sign_key", key), **kw)

    v1 = make("v1", "1.0.0", seed=1)
    # The operator key of the OTA helpers: Fleet signs desired documents with it, and the
    # agents trust it for intents.
    operator_public, operator_private = write_operator_key(root)
    ota = Packages(public_key=keys.public_path, operator_key=OPERATOR_KEY,
                   operator_public=operator_public, operator_private=operator_private,
                   other_key=other_key, key=key, v1=v1,
                   v2=make("v2", "2.0.0", seed=2), v3=v1, older=v1, unsigned=v1,
                   bad_signature=v1, nan=v1, slow=v1, wide=v1, broken=v1)
    return LimitsPackages(ota, key, keys.public_path, root)


@pytest.fixture
def make_agent(tmp_path: Path, broker: MqttBroker, limits_pkgs: LimitsPackages
               ) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(fleet: str, device: str, env: dict[str, str] | None = None) -> Agent:
        agent = Agent(tmp_path / device, broker, fleet, device, limits_pkgs.ota, env)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()


def write_bomb(path: Path, *, member_bytes: int, name: str = "bomb") -> Path:
    """A package of ~1 MB whose model member inflates to ``member_bytes`` of zeros, with a
    manifest that declares that size and a signature that is junk (a valid-looking document
    from no trusted key). Written as a stream: building it needs no memory."""
    zeros = bytes(1 << 20)
    digest = hashlib.sha256()
    for _ in range(member_bytes >> 20):
        digest.update(zeros)
    manifest = {
        "schema_version": 1, "name": name, "version": "9.0.0",
        "created": "2026-01-01T00:00:00+00:00", "task": "classification", "labels": None,
        "source": {"framework": "onnx"}, "recipe": {}, "tools": {},
        "target": {"format": "onnx", "model_file": "model.onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
        "outputs": [{"name": "probs", "dtype": "float32", "shape": ["batch", 10]}],
        "files": {"model.onnx": {"sha256": digest.hexdigest(), "size": member_bytes}},
    }
    signature = {"algorithm": "ed25519", "key_id": "0123456789abcdef",
                 "signature": "AAAA" * 22}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        zf.writestr("signature.json", json.dumps(signature))
        with zf.open("model.onnx", "w", force_zip64=True) as member:
            for _ in range(member_bytes >> 20):
                member.write(zeros)
    return path


def python_peak_growth_mib(code: str, setup: str = "") -> dict[str, Any]:
    """Run ``setup`` then ``code`` in a fresh interpreter; return the growth of its peak RSS
    during ``code`` (MiB) and what ``code`` stored in ``result``."""
    script = "\n".join([
        "import json, resource",
        setup,
        "result = None",
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss",
        "try:",
        *("    " + line for line in code.splitlines()),
        "except Exception as exc:",
        "    result = f'{type(exc).__name__}: {exc}'",
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss",
        "print(json.dumps({'growth_mib': (after - before) / 1024, 'result': result}))",
    ])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_kib(pid: int) -> int:
    """The high-water mark of a process's resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


class _OneFile(http.server.BaseHTTPRequestHandler):
    data_path: Path

    def do_GET(self) -> None:  # noqa: N802  (the name http.server calls)
        data = self.data_path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class file_server:  # noqa: N801  (used as a context manager, like open)
    """Serve one file over plain HTTP at ``.url`` (a host a desired document may name, when
    the artifact server would refuse to hold the file)."""

    def __init__(self, path: Path) -> None:
        handler = type("Handler", (_OneFile,), {"data_path": path})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/{path.name}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> file_server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------- broker identities

SHIPPED = REPO / "deploy" / "mosquitto"
HOST_IDENTITY = "edgekit-host"


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, Identity]


def make_pki(folder: Path, client_names: list[str]) -> Pki:
    """A CA, a server certificate for 127.0.0.1, and one client certificate per name (its CN),
    made here with the cryptography package."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgekit fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, stem: str, server: bool = False
             ) -> Identity:
        k = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(ca_name).public_key(k.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return Identity(write_cert(cert, folder / f"{stem}.pem"),
                        write_key(k, folder / f"{stem}.key"))

    server = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, "server", server=True)
    clients = {name: leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, f"client-{name}")
               for name in client_names}
    return Pki(write_cert(ca, folder / "ca.pem"), server.cert, server.key, clients)


def shipped_config(workdir: Path, pki: Pki, port: int, *, password_file: Path | None = None
                   ) -> Path:
    """deploy/mosquitto/mosquitto.conf with only its paths, port and log destination replaced
    (every replacement must find its line, so the test follows the shipped file); with
    ``password_file``, the documented per-device password variant."""
    text = (SHIPPED / "mosquitto.conf").read_text()
    replacements = {
        "listener 8883": f"listener {port} 127.0.0.1",
        "cafile /etc/mosquitto/certs/ca.pem": f"cafile {pki.ca}",
        "certfile /etc/mosquitto/certs/server.pem": f"certfile {pki.server_cert}",
        "keyfile /etc/mosquitto/certs/server.key": f"keyfile {pki.server_key}",
        "acl_file /etc/mosquitto/edgekit.acl": f"acl_file {SHIPPED / 'acl'}",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {workdir}/",
        "log_dest syslog": f"log_dest file {workdir / 'mosquitto.log'}",
    }
    if password_file is not None:
        replacements["require_certificate true"] = "require_certificate false"
        replacements["use_identity_as_username true"] = f"password_file {password_file}"
    for old, new in replacements.items():
        assert old in text, f"the shipped mosquitto.conf no longer has {old!r}"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text += "user root\n"  # else mosquitto drops to a user that cannot read the test files
    conf = workdir / "mosquitto.conf"
    conf.write_text(text)
    return conf


class ShippedBroker:
    """mosquitto running the shipped configuration on a free port of 127.0.0.1."""

    def __init__(self, workdir: Path, pki: Pki, *, password_file: Path | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            pytest.skip("mosquitto is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.url = f"mqtts://127.0.0.1:{self.port}"
        conf = shipped_config(workdir, pki, self.port, password_file=password_file)
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        wait_until(self._listening, 20, "the shipped mosquitto to listen")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.log()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def read_retained_doc(url: str, where: str, pki: Pki, username: str, password: str
                      ) -> dict[str, Any]:
    """The retained JSON document on ``where``, read as ``username`` over TLS; a signed
    envelope is opened with the OTA tests' operator key."""
    from edgekit.host.mqtt_client import HostClient
    from edgekit.host.ota.deploy import read_retained
    from edgekit.protocol.signed import is_sealed, open_sealed

    with HostClient(url, ca_file=str(pki.ca), username=username,
                    password=password).connect() as c:
        payload = read_retained(c, where).get(where)
    assert payload, f"nothing retained on {where}"
    if is_sealed(payload):
        payload = open_sealed(payload, [OPERATOR_KEY.public_key()]).payload
    return dict(json.loads(payload))
