"""The local HTTP API over real sockets: JSON, .npy and .npz bodies, feedback, health,
Prometheus metrics, and wrong requests that get a 4xx while the agent keeps serving."""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
from collections.abc import Iterator

import numpy as np
import pytest
from _agent_support import Models

from device_agent import Agent, load_config
from edgekit.protocol import encode, encode_array


@pytest.fixture(scope="module")
def served(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    root = tmp_path_factory.mktemp("http-agent")
    cfg = load_config(env={}, overrides={
        "model.dir": str(root / "models"), "model.package": str(models.unsigned_v1),
        "model.allow_unsigned": True, "http.listen": "127.0.0.1:0", "telemetry.interval_s": 0.0,
        "http.max_body_bytes": 64 * 1024, "requests.max_batch": 32})
    agent = Agent(cfg)
    agent.start()
    yield agent
    agent.stop()


def call(agent: Agent, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = agent.http_address.rsplit(":", 1)  # type: ignore[union-attr]
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(agent: Agent, path: str, doc: object) -> tuple[int, dict]:
    status, _, body = call(agent, "POST", path, encode(doc),
                           {"Content-Type": "application/json"})
    return status, json.loads(body)


def test_predict_json_npy_npz_agree(served: Agent, models: Models) -> None:
    x, _ = models.data
    status, doc = post_json(served, "/predict", {"inputs": {"x": x[:3].tolist()}})
    assert status == 200 and doc["ok"] is True and doc["schema"] == "edgekit.predict-reply/1"
    reference = served.predict({"x": x[:3]}).outputs["probs"]
    np.testing.assert_allclose(doc["outputs"]["probs"], reference, rtol=1e-6)
    assert doc["classes"] == list(reference.argmax(1))
    assert doc["labels"] == [f"digit-{c}" for c in reference.argmax(1)]
    assert doc["model"]["name"] == "digits" and doc["prediction_id"]

    status, doc = post_json(served, "/predict?outputs=encoded",
                            {"inputs": {"x": encode_array(x[:3])}})
    assert status == 200 and doc["outputs"]["probs"]["dtype"] == "float32"

    buf = io.BytesIO()
    np.save(buf, x[:3])
    status, headers, body = call(served, "POST", "/predict?outputs=none", buf.getvalue(),
                                 {"Content-Type": "application/x-npy"})
    doc = json.loads(body)
    assert status == 200 and "outputs" not in doc and doc["classes"] == list(reference.argmax(1))

    buf = io.BytesIO()
    np.savez(buf, x=x[:3])
    status, headers, body = call(served, "POST", "/predict", buf.getvalue(),
                                 {"Content-Type": "application/octet-stream",
                                  "Accept": "application/x-npz"})
    assert status == 200 and headers["content-type"] == "application/x-npz"
    assert headers["x-prediction-id"] and headers["x-model"] == "digits 1.0.0"
    with np.load(io.BytesIO(body)) as npz:
        np.testing.assert_allclose(npz["probs"], reference, rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code", "fragment"),
    [
        (b"{not json", "application/json", 400, "bad_request", "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "bad_request", "Expected `object`, got `array`"),
        (b'{"inputs": {"x": [[1, 2, 3]]}}', "application/json", 422, "invalid_input",
         "expected [batch, 64]"),
        (b'{"inputs": {"image": [[0]]}}', "application/json", 422, "invalid_input",
         "input 'x' is missing"),
        (b'{"schema": "edgekit.predict-request/9", "inputs": {}}', "application/json", 400,
         "bad_request", "Invalid value 'edgekit.predict-request/9' - at `$.schema`"),
        (b'{"inputs": {"x": {"dtype": "float32", "shape": [1, 64], "data": "AAAA"}}}',
         "application/json", 400, "bad_request", "needs 256"),
        (b"\x93NUMPY junk", "application/x-npy", 400, "bad_request", "not a readable .npy"),
        (b"PK\x03\x04 junk", "application/zip", 400, "bad_request", "not a readable .npz"),
        (json.dumps({"inputs": {"x": np.zeros((33, 64)).tolist()}}).encode(), "application/json",
         422, "invalid_input", "more than the limit of 32"),
        (b"x" * (64 * 1024 + 1), "application/json", 413, "bad_request", "over the limit"),
    ],
)
def test_wrong_requests_get_4xx_and_serving_goes_on(served: Agent, models: Models, body: bytes,
                                                     ctype: str, status: int, code: str,
                                                     fragment: str) -> None:
    got, _, raw = call(served, "POST", "/predict", body, {"Content-Type": ctype})
    doc = json.loads(raw)
    assert got == status and doc["ok"] is False
    assert doc["error"]["code"] == code and fragment in doc["error"]["message"]
    ok, doc = post_json(served, "/predict", {"inputs": {"x": models.data[0][:1].tolist()}})
    assert ok == 200 and doc["ok"] is True


def test_routes_methods_and_health(served: Agent) -> None:
    assert call(served, "GET", "/nope")[0] == 404
    assert call(served, "GET", "/predict")[0] == 405
    assert call(served, "POST", "/health", b"{}")[0] == 405
    status, _, body = call(served, "GET", "/health")
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "ok" and doc["model"]["version"] == "1.0.0"
    assert doc["mqtt"] is None


def test_feedback_over_http_and_prometheus_metrics(served: Agent, models: Models) -> None:
    x, y = models.data
    status, doc = post_json(served, "/predict", {"inputs": {"x": x[1500:1510].tolist()}})
    assert status == 200
    pid, classes = doc["prediction_id"], doc["classes"]
    labels = [int(v) for v in y[1500:1510]]
    status, fb = post_json(served, "/feedback", {"prediction_id": pid, "labels": labels})
    assert status == 200 and fb == {"ok": True, "labelled": 10}
    status, fb = post_json(served, "/feedback", {"prediction_id": pid, "labels": labels})
    assert status == 409 and fb["error"]["code"] == "already_labelled"
    status, fb = post_json(served, "/feedback", {"prediction_id": "zz", "label": 1})
    assert status == 404 and fb["error"]["code"] == "unknown_prediction"
    status, headers, body = call(served, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-z_][a-z0-9_]*)(\{[^}]*\})? (\S+)$", line)
        assert match, f"not a Prometheus sample line: {line!r}"
        values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    correct = sum(int(c == t) for c, t in zip(classes, labels, strict=True))
    assert values["edgekit_agent_window_labels"] >= 10
    assert values["edgekit_agent_feedback_total"] >= 10
    info = [line for line in text.splitlines() if line.startswith("edgekit_agent_model_info{")]
    assert len(info) == 1 and 'name="digits"' in info[0] and 'version="1.0.0"' in info[0]
    assert values["process_resident_memory_bytes"] > 1e6
    assert values["edgekit_agent_requests_total"] == served.stats.requests_total
    assert served.window.snapshot().labels >= 10 and correct >= 8
    # A real histogram in seconds, cumulative since start: buckets that only grow, the
    # +Inf bucket equal to _count, a _sum; a telemetry interval does not reset it.
    count = values["edgekit_agent_request_latency_seconds_count"]
    assert count == served.stats.requests_total >= 1
    assert values['edgekit_agent_request_latency_seconds_bucket{le="+Inf"}'] == count
    assert 0 < values["edgekit_agent_request_latency_seconds_sum"] < count * 10
    buckets = [v for k, v in values.items() if k.startswith(
        "edgekit_agent_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and len(buckets) > 10
    assert "# TYPE edgekit_agent_request_latency_seconds histogram" in text
    served.tick()
    _, _, again = call(served, "GET", "/metrics")
    assert f"edgekit_agent_request_latency_seconds_count {count}" in again.decode()


def raw_exchange(agent: Agent, request: bytes, replies: int = 1) -> bytes:
    """Send ``request`` as bytes on a fresh connection; read until ``replies`` replies have
    arrived or the server closes."""
    host, port = agent.http_address.rsplit(":", 1)  # type: ignore[union-attr]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while data.count(b"HTTP/1.") < replies or not data.endswith((b"}", b"\r\n\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_request_heads_are_read_as_the_stdlib_reads_them(served: Agent, models: Models) -> None:
    body = encode({"inputs": {"x": models.data[0][:1].tolist()}, "outputs": "none"})
    head = (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-TYPE: application/json\r\n"
            b"CONTENT-LENGTH: " + str(len(body)).encode() + b"\r\n")
    # Names in any case, the first of a repeated field, a folded line, a line that is no
    # field (skipped).
    got = raw_exchange(served, head + b"X-Request-Id: first\r\n  part\r\nx-request-id: second"
                       b"\r\nnot a field\r\nConnection: close\r\n\r\n" + body)
    status, _, reply = got.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close" in status
    assert json.loads(reply)["request_id"] == "first part"
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT\r\n", status)
    # Expect: 100-continue gets the interim reply before the answer.
    got = raw_exchange(served, head + b"Expect: 100-continue\r\nConnection: close\r\n\r\n" + body,
                       replies=2)
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    # HTTP/1.0 closes after the reply unless it asks to keep the connection.
    got = raw_exchange(served, head.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n" + body)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in got
    # A request line it cannot read gets the stdlib's error page (without a status line,
    # as the stdlib answers before it knows the version); too many or too long fields a 431.
    for request, start in (
            (b"POST /predict HTTP/x.1\r\n\r\n", b"<!DOCTYPE HTML>"),
            (b"POST /predict HTTP/2.0\r\n\r\n", b"<!DOCTYPE HTML>"),
            (b"POST /predict\r\n\r\n", b"<!DOCTYPE HTML>"),  # HTTP/0.9 takes GET only
            (head + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
             b"HTTP/1.1 431 "),
            (head + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n", b"HTTP/1.1 431 ")):
        assert raw_exchange(served, request).startswith(start), request[:60]
    for request, code in ((b"POST /predict HTTP/x.1\r\n\r\n", b"400"),
                          (b"POST /predict HTTP/2.0\r\n\r\n", b"505")):
        assert b"Error code: " + code in raw_exchange(served, request)
    assert call(served, "GET", "/health")[0] == 200  # and the server goes on
