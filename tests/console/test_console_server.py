"""The console's server on its own (no browser, no broker): it refuses an address in use,
serves the pages and their JSON read-only, tells an open stream about a change, and ends
its streams when it stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import broker, free_port, wait_until

from edgekit.errors import EdgekitError
from edgekit.host.console import ConsoleServer
from edgekit.host.db import Store

__all__ = ["broker"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parents[2]


def test_an_address_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'c.db'}") as store, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EdgekitError, match=f"could not listen on 127.0.0.1:{port}"):
            ConsoleServer(store, f"127.0.0.1:{port}").start()


def test_stream_pages_and_a_clean_stop(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'c.db'}") as store:
        store.upsert_device_status("f1", "pi-<1>", online=True, session=1, model_name="m",
                                   model_version="1.0.0")
        console = ConsoleServer(store, "127.0.0.1:0", poll_s=0.1).start()
        try:
            page = urllib.request.urlopen(console.url + "device/f1/pi-%3C1%3E").read().decode()
            assert 'data-device="pi-&lt;1&gt;"' in page and "<1>" not in page
            csp = urllib.request.urlopen(console.url).headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp
            fleet = json.loads(urllib.request.urlopen(console.url + "api/fleet").read())
            assert [d["device"] for d in fleet["devices"]] == ["pi-<1>"]
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(console.url + "api/device/f1/nobody")
            assert missing.value.code == 404
            session = json.loads(urllib.request.urlopen(console.url + "api/session").read())
            assert session == {**session, "operator": False, "login": False, "actions": False}
            stream = urllib.request.urlopen(console.url + "api/stream")
            assert stream.readline() == b"event: hello\n"
            stream.readline(), stream.readline()
            store.record_event("f1", "agent.started", "hello", device="pi-<1>")
            assert stream.readline() == b"event: change\n"
            assert json.loads(stream.readline().removeprefix(b"data: "))["topics"] == ["events"]
            ended = threading.Event()

            def drain() -> None:
                while stream.readline():
                    pass
                ended.set()

            threading.Thread(target=drain, daemon=True).start()
        finally:
            console.stop()
        assert ended.wait(5), "the stream stayed open after stop"
        assert not any(t.name in ("edgekit-console", "edgekit-console-feed")
                       for t in threading.enumerate())


def test_edgekit_console_hashes_a_password_and_checks_its_options(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgekit.host.cli import cli
    from edgekit.host.console import verify_password

    made = CliRunner().invoke(cli, ["console", "--hash-password"],
                              input="long-enough\nlong-enough\n")
    assert made.exit_code == 0, made.output
    assert verify_password(made.stdout.strip().splitlines()[-1], "long-enough")
    short = CliRunner().invoke(cli, ["console", "--hash-password"], input="short\nshort\n")
    assert short.exit_code == 2 and "shorter than 8" in short.output
    bad = CliRunner().invoke(cli, ["console", "--db", f"sqlite:///{tmp_path / 'c.db'}",
                                   "--listen", "nowhere"])
    assert bad.exit_code == 2 and "console.listen" in bad.output


def test_controller_run_serves_the_console_until_stopped(broker: Any, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKIT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgekit.host.cli", "controller", "run", "--broker", broker.url,
         "--db", f"sqlite:///{tmp_path / 'c.db'}", "--store", str(tmp_path / "store"),
         "--console", f"127.0.0.1:{port}"],
        stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        def page() -> str | None:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
            except OSError:
                return None

        assert 'data-page="fleet"' in wait_until(page, 60, "the console of the controller")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(20)
    assert proc.returncode == 0, err
    assert f"console: http://127.0.0.1:{port}/" in err and "stopped" in err
    assert page() is None
