"""The agent's HTTP server holds a fixed number of threads whatever clients do, and frees a
worker from a client that never finishes its headers; the outbox counters are durable.

Attacks of issue 9 (item 9): 300 half-open connections made 182 threads; the outbox used
``synchronous=NORMAL``, so seq/session could go backwards after a power loss.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from _limits_support import (  # noqa: F401  (fixtures)
    LimitsPackages,
    MqttBroker,
    broker,
    limits_pkgs,
    make_agent,
    wait_until,
)

from device_agent._outbox import Outbox

FAST_DEADLINES = {"EDGEKIT_HTTP_HEADER_TIMEOUT_S": "2", "EDGEKIT_HTTP_WORKERS": "8"}


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_half_open_connections_do_not_make_threads(broker: MqttBroker, make_agent,
                                                   limits_pkgs: LimitsPackages) -> None:
    agent = make_agent("lim-http", "d1", env=FAST_DEADLINES)
    agent.wait_healthy()
    assert agent.proc is not None
    baseline = _threads(agent.proc.pid)
    port = agent.http_port
    sockets = []
    try:
        for i in range(120):  # three times what the pool holds (8 workers, 4 waiting each)
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # never finished
            sockets.append(sock)
        time.sleep(0.5)  # let the server accept what it will (not a timing assertion)
        # A few threads start lazily (runtime, request pools); none per connection.
        assert _threads(agent.proc.pid) < baseline + 20, (baseline, _threads(agent.proc.pid))
        # The header deadline frees the workers; the API answers again.
        wait_until(agent.healthy, 60, "the HTTP API to answer after the flood")
        assert agent.predict_version() == "1.0.0"
    finally:
        for sock in sockets:
            sock.close()


def test_a_trickling_client_is_cut_off_at_the_header_deadline(
        broker: MqttBroker, make_agent, limits_pkgs: LimitsPackages) -> None:
    agent = make_agent("lim-slow", "d1", env=FAST_DEADLINES)
    agent.wait_healthy()
    request = b"GET /health HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=10) as sock:
        closed = False
        for i in range(len(request)):  # one byte every 0.2 s: 44 s for the whole request
            try:
                sock.sendall(request[i:i + 1])
            except OSError:
                closed = True
                break
            time.sleep(0.2)
        if not closed:
            sock.settimeout(10)
            closed = sock.recv(1 << 16) == b""
    assert closed, "the server waited for the whole trickled request"


def test_outbox_commits_are_durable(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", 100)
    try:
        assert outbox.synchronous == 2  # FULL: a commit is on disk when it returns
        assert outbox.next_value("mqtt.session") == 1
    finally:
        outbox.close()
