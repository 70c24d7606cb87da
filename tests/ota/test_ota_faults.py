"""Fault injection against one real agent process, one fault after another: each update that
must be refused is refused with its reason code, each that must go through goes through, and
the device always ends serving a verified model and says which. A client sends requests
over HTTP the whole time and must see no failed request and no non-finite answer.

The agent is shared by the tests of this module (one process, like a device that lives
through all of these), so they run in order; each checks the state it starts from.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
from _ota_fleet import Agent, Fleet, LoadClient, Packages, wait_until
from mqtt_broker import MqttBroker

import edgekit.protocol.ota as ota
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota.deploy import desired_for_package
from edgekit.host.ota.server import ArtifactServer
from edgekit.host.ota.store import ArtifactStore

FLEET = "faults"
DEVICE = "dev-f"


@pytest.fixture(scope="module")
def fleet(broker: MqttBroker) -> Iterator[Fleet]:
    f = Fleet(broker, FLEET)
    yield f
    f.close()


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, broker: MqttBroker, pkgs: Packages,
           fleet: Fleet) -> Iterator[tuple[Agent, LoadClient]]:
    agent = Agent(tmp_path_factory.mktemp("faults-agent"), broker, FLEET, DEVICE, pkgs)
    agent.wait_healthy()
    fleet.wait_serving(DEVICE, "1.0.0")
    client = LoadClient(agent)
    yield agent, client
    client.stop()
    agent.stop()


def _no_failures(client: LoadClient) -> None:
    assert client.failures == [], client.failures[:5]
    assert client.ok > 0


def _serving_now(fleet: Fleet) -> str:
    model = fleet.serving(DEVICE)
    assert model is not None
    return str(model["version"])


def test_desired_document_that_is_not_json(fleet: Fleet, device: tuple[Agent, LoadClient]
                                           ) -> None:
    fleet.desire(DEVICE, b"{this is not json")
    event = fleet.outcome(DEVICE, "")
    assert event["kind"] == "update.failed" and event["reason"] == "untrusted_intent"
    assert "unsigned" in event["message"]
    assert _serving_now(fleet) == "1.0.0"
    _no_failures(device[1])


REFUSALS = [
    ("bad_signature", {}, "bad_signature"),
    ("unsigned", {}, "unsigned"),
    ("older", {}, "older_version"),
    ("wide", {}, "incompatible_io"),
    ("wide", {"allow_breaking": True}, "incompatible_io"),  # allowed, but not declared
    ("broken", {}, "load_failed"),
    ("slow", {"latency_budget_ms": 1.0}, "slow"),
]


@pytest.mark.parametrize(("package", "options", "reason"), REFUSALS,
                         ids=[f"{p}-{r}" for p, _, r in REFUSALS])
def test_refused_update_keeps_the_model(fleet: Fleet, device: tuple[Agent, LoadClient],
                                        pkgs: Packages, package: str, options: dict[str, Any],
                                        reason: str) -> None:
    before = _serving_now(fleet)
    doc = fleet.deploy(DEVICE, getattr(pkgs, package), **options)
    event = fleet.outcome(DEVICE, doc.deployment)
    assert (event["kind"], event.get("reason")) == ("update.failed", reason), event
    assert event["data"]["serving"]["version"] == before
    assert _serving_now(fleet) == before
    status_update = fleet.status[DEVICE].get("update") or {}
    assert status_update.get("deployment") == doc.deployment
    assert status_update.get("reason") == reason
    # The refused package is not left in the model folder.
    agent = device[0]
    sha = doc.model.sha256
    assert not list((agent.workdir / "models" / "packages").glob(f"*{sha[:12]}*"))
    _no_failures(device[1])


def test_nonfinite_outputs_roll_back(fleet: Fleet, device: tuple[Agent, LoadClient],
                                     pkgs: Packages) -> None:
    doc = fleet.deploy(DEVICE, pkgs.nan)  # its golden samples pass; the client's inputs not
    event = fleet.outcome(DEVICE, doc.deployment)
    assert (event["kind"], event.get("reason")) == ("update.rolled_back", "nonfinite_output")
    steps = [e["data"]["step"] for e in fleet.update_events(DEVICE, doc.deployment)]
    assert steps[:2] == ["queued", "downloading"] and "probation" in steps
    assert event["data"]["details"]["answered_by_previous"] >= 1
    fleet.wait_serving(DEVICE, "1.0.0")
    # Every NaN answer was replaced by the previous model's: the client saw none.
    _no_failures(device[1])
    assert "1.5.0" not in device[1].versions


class CorruptingClient(HostClient):
    """A server connection that flips one byte in the data of every fifth chunk reply."""

    corrupted = 0
    _replies = 0

    def publish(self, topic: str, payload: bytes | str | None, **kw: Any) -> Any:
        if topic.endswith("/reply/ota") and isinstance(payload, bytes | bytearray):
            self._replies += 1
            if self._replies % 5 == 2:
                data = bytearray(payload)
                data[-1] ^= 0xFF
                payload = bytes(data)
                self.corrupted += 1
        return super().publish(topic, payload, **kw)


def test_corrupted_chunks_are_fetched_again(broker: MqttBroker, fleet: Fleet,
                                            device: tuple[Agent, LoadClient],
                                            pkgs: Packages) -> None:
    client = CorruptingClient(broker.url)
    client.connect()
    try:
        server = ArtifactServer(client, ArtifactStore(), fleets=[FLEET])
        info = server.serve(pkgs.v2)
        server.ensure_reachable()
        doc = desired_for_package(info, FLEET, probation=ota.Probation(
            requests=5, seconds=2.0, max_error_rate=0.0, max_nonfinite_rate=0.0,
            max_latency_ms=None))
        fleet.desire(DEVICE, doc)
        event = fleet.outcome(DEVICE, doc.deployment)
        assert event["kind"] == "update.succeeded", event
        assert client.corrupted >= 1
        downloads = [e for e in fleet.update_events(DEVICE, doc.deployment)
                     if e["data"]["step"] == "downloading"]
        assert downloads[-1]["data"]["details"]["corrupt"] >= 1
        fleet.wait_serving(DEVICE, "2.0.0")
    finally:
        client.close()
    _no_failures(device[1])


class _CutHandler(BaseHTTPRequestHandler):
    """Serves one file; the first response stops half way (Content-Length promised more)."""

    data = b""
    ranges: list[str | None] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header.split("=")[1].split("-")[0]) if header else 0
        body = self.data[start:]
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        self.end_headers()
        if len(type(self).ranges) == 1:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_truncated_http_download_resumes(fleet: Fleet, device: tuple[Agent, LoadClient],
                                         pkgs: Packages) -> None:
    handler = type("Cut", (_CutHandler,), {"data": pkgs.v3.read_bytes(), "ranges": []})
    http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        info = ArtifactStore().add(pkgs.v3)
        url = f"http://127.0.0.1:{http.server_address[1]}/v3.edgepkg"
        doc = desired_for_package(info, FLEET, mqtt_source=False, url=url)
        fleet.desire(DEVICE, doc)
        event = fleet.outcome(DEVICE, doc.deployment)
        assert event["kind"] == "update.succeeded", event
        # The second request picked up where the cut one stopped.
        assert len(handler.ranges) >= 2
        resumed_at = int(handler.ranges[-1].split("=")[1].split("-")[0])
        assert 0 < resumed_at < info.size
        fleet.wait_serving(DEVICE, "3.0.0")
    finally:
        http.shutdown()
        http.server_close()
    _no_failures(device[1])


class SlowClient(HostClient):
    """A server connection that takes its time with every chunk reply."""

    def publish(self, topic: str, payload: bytes | str | None, **kw: Any) -> Any:
        if topic.endswith("/reply/ota"):
            threading.Event().wait(0.03)
        return super().publish(topic, payload, **kw)


@pytest.fixture(scope="module")
def v4(tmp_path_factory: pytest.TempPathFactory, pkgs: Packages) -> Path:
    return pkgs.make(tmp_path_factory.mktemp("v4") / "v4.edgepkg", version="4.0.0", seed=11,
                     padding=3_000_000)


def test_broker_restart_mid_transfer(broker: MqttBroker, fleet: Fleet,
                                     device: tuple[Agent, LoadClient], v4: Path) -> None:
    client = SlowClient(broker.url)
    client.connect()
    try:
        server = ArtifactServer(client, ArtifactStore(), fleets=[FLEET])
        info = server.serve(v4)
        server.ensure_reachable()
        doc = desired_for_package(info, FLEET)
        assert doc.sources.mqtt is not None
        doc = msgspec.structs.replace(doc, sources=msgspec.structs.replace(
            doc.sources, mqtt=msgspec.structs.replace(
                doc.sources.mqtt, chunk_size=32 * 1024)))  # about a hundred requests
        fleet.desire(DEVICE, doc)
        agent = device[0]
        under_way = wait_until(
            lambda: (j := agent.journal.get("current") or {}).get("offset", 0) > 0 and j, 60,
            "the download to be under way")
        assert under_way["step"] == "downloading" and under_way["offset"] < info.size
        broker.restart()
        event = fleet.outcome(DEVICE, doc.deployment, timeout=180)
        assert event["kind"] == "update.succeeded", event
        fleet.wait_serving(DEVICE, "4.0.0")
    finally:
        client.close()
    _no_failures(device[1])


def test_signed_rollback_to_a_kept_copy_and_no_replay(fleet: Fleet,
                                                      device: tuple[Agent, LoadClient],
                                                      pkgs: Packages, v4: Path) -> None:
    assert _serving_now(fleet) == "4.0.0"
    probation = ota.Probation(requests=3, seconds=1.0, max_error_rate=0.0,
                              max_nonfinite_rate=0.0, max_latency_ms=None)

    def downgrade(issued: dt.datetime | None = None) -> ota.DesiredDocument:
        return ota.make_desired(deployment=ota.new_deployment_id(), fleet=FLEET,
                                devices=[DEVICE], name="ota-model", version="3.0.0",
                                sha256=None, size=None, allow_downgrade=True,
                                probation=probation, issued=issued)

    # Signed a minute ago and captured by someone, never published (yet).
    captured = downgrade(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60))
    doc = downgrade()
    fleet.desire(DEVICE, doc)
    event = fleet.outcome(DEVICE, doc.deployment)
    assert event["kind"] == "update.succeeded", event
    sources = {e["data"].get("source") for e in fleet.update_events(DEVICE, doc.deployment)}
    assert sources >= {"kept"}
    fleet.wait_serving(DEVICE, "3.0.0")
    # Forward again (from the copy kept on disk: nothing serves v4 any more) ...
    forward = desired_for_package(ArtifactStore().add(v4), FLEET)
    fleet.desire(DEVICE, forward)
    assert fleet.outcome(DEVICE, forward.deployment)["kind"] == "update.succeeded"
    fleet.wait_serving(DEVICE, "4.0.0")
    # ... then the captured, older downgrade: a replay, refused.
    fleet.desire(DEVICE, captured)
    event = fleet.outcome(DEVICE, captured.deployment)
    assert (event["kind"], event.get("reason")) == ("update.failed", "replayed"), event
    assert _serving_now(fleet) == "4.0.0"
    _no_failures(device[1])


def test_size_in_the_document_is_a_hard_cap(fleet: Fleet, device: tuple[Agent, LoadClient],
                                            pkgs: Packages, tmp_path: Path) -> None:
    # A package the device does not keep, so it must come over the wire.
    info = fleet.serve(pkgs.make(tmp_path / "v5.edgepkg", version="5.0.0", seed=12,
                                 padding=500_000))
    doc = desired_for_package(info, FLEET)
    capped = ota.parse_desired(ota.encode_desired(msgspec.structs.replace(
        doc, model=msgspec.structs.replace(doc.model, size=info.size - 1000))))
    fleet.desire(DEVICE, capped)
    event = fleet.outcome(DEVICE, capped.deployment)
    assert (event["kind"], event.get("reason")) == ("update.failed", "too_large"), event
    agent = device[0]
    assert not list((agent.workdir / "models" / "packages").glob(".*.part"))
    assert _serving_now(fleet) == "4.0.0"
    # Through all of this the model folder kept model.keep (3) packages at most.
    assert len(list((agent.workdir / "models" / "packages").glob("*.edgepkg"))) <= 3
    _no_failures(device[1])


def test_too_little_disk_space(make_agent: Any, fleet: Fleet, pkgs: Packages) -> None:
    """Free space is real (statvfs of the model folder); the reserve that must stay free
    after the download, ota.min_free_bytes, is set beyond any disk here."""
    agent = make_agent(FLEET, "dev-small", env={"EDGEKIT_OTA_MIN_FREE_BYTES": str(10**15)})
    agent.wait_healthy()
    fleet.wait_serving("dev-small", "1.0.0")
    doc = fleet.deploy("dev-small", pkgs.v2)
    event = fleet.outcome("dev-small", doc.deployment)
    assert (event["kind"], event.get("reason")) == ("update.failed", "no_space"), event
    assert event["data"]["details"]["reserve"] == 10**15
    assert not list((agent.workdir / "models" / "packages").glob(".*.part"))
    assert (fleet.serving("dev-small") or {}).get("version") == "1.0.0"
