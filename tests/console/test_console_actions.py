"""The console's actions without a browser: an operator's abort reaches a real controller
over a real mosquitto through the request the console builds, and the devices go back; the
checks on forms, password hashes and abort requests refuse what they must.

Simulated devices (tests/host/_controller_sim.SimDevice) stand in for agents here: the
abort needs a rollout that stays running, i.e. a device that never answers an update.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import broker, wait_until

from edgekit.artifact import sha256_file
from edgekit.errors import ConfigError, ProtocolError, UsageError
from edgekit.host.console import hash_password, verify_password
from edgekit.host.console._actions import Action, Submitter, build_request, parse_action
from edgekit.host.console._auth import check_hash
from edgekit.host.controller import load_config
from edgekit.host.controller.remote import RemoteUsageError
from edgekit.host.controller.service import Controller
from edgekit.host.db import RolloutState, Store, TargetState
from edgekit.host.mqtt_client import HostClient
from edgekit.host.registry import Registry
from edgekit.protocol.controller import parse_rollout_request
from edgekit.signing import generate_keypair, load_private_key, load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from _controller_sim import SimDevice  # noqa: E402
from _digits import write_digits_package  # noqa: E402

__all__ = ["broker"]  # the fixture, imported for pytest


def test_an_operator_abort_sends_the_devices_back(broker: Any, tmp_path: Path) -> None:
    keys = generate_keypair(tmp_path / "signer")
    key = load_private_key(keys.private_path)
    v1 = write_digits_package(tmp_path / "v1.edgepkg", version="1.0.0", sign_key=key)
    v2 = write_digits_package(tmp_path / "v2.edgepkg", version="2.0.0", alpha=30.0, sign_key=key)
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    fleet = f"abort-{secrets.token_hex(3)}"
    with Store(db_url) as store:
        Registry(store, tmp_path / "store").push(v1)
        Registry(store, tmp_path / "store").push(v2)
    cfg = load_config(overrides={
        "mqtt.broker": broker.url, "database.url": db_url, "registry.store": str(tmp_path / "store"),
        "controller.fleets": [fleet], "controller.tick_s": 0.1, "controller.lease_s": 5.0,
        "controller.signing_key": str(keys.private_path), "rollout.canary": "1",
        "rollout.device_timeout_s": 120.0, "rollout.rollback_timeout_s": 30.0,
        "rollout.probation_requests": 0, "rollout.probation_seconds": 0.0})
    serving = {"name": "digits", "version": "1.0.0", "sha256": sha256_file(v1)}
    sims = [SimDevice(broker.url, fleet, f"dev{i}", serving=serving,
                      behavior={"2.0.0": "silent"}, trusted=[load_public_key(keys.public_path)])
            for i in range(2)]
    client = HostClient(broker.url).connect()
    try:
        with Controller(cfg), Store(db_url) as store:
            for sim in sims:
                sim.start()
            wait_until(lambda: len(store.list_devices(fleet, online=True)) == 2, 30, "devices")
            submitter = Submitter(client)
            started = submitter.submit(fleet, build_request(
                parse_action("rollout", {"fleet": fleet, "model": "digits:2.0.0"})))
            rollout_id = int(started["id"])
            wait_until(lambda: any(t.state == TargetState.ASSIGNED
                                   for t in store.list_rollout_targets(rollout_id)), 30,
                       "the canary to be asked")
            abort = build_request(Action("abort", fleet, "digits", "2.0.0", rollout_id=rollout_id))
            reply = submitter.submit(fleet, abort)
            assert reply["id"] == rollout_id and reply["state"] in ("aborting", "aborted")
            # The same request again (a retry) is answered with the same rollout.
            assert submitter.submit(fleet, abort)["id"] == rollout_id
            final = wait_until(lambda: (r := store.get_rollout(rollout_id)).state
                               == RolloutState.ABORTED and r, 60, "the rollout to be aborted")
            assert final.reason == "aborted by an operator"
            states = sorted(t.state for t in store.list_rollout_targets(rollout_id))
            assert states == ["rolled_back", "skipped"]
            requested = store.list_events(rollout_id=rollout_id,
                                          kinds=["rollout.abort_requested"])
            assert [e.reason for e in requested] == ["operator"]
            # A finished rollout cannot be aborted; the controller says why.
            with pytest.raises(RemoteUsageError, match="only a pending or running"):
                submitter.submit(fleet, build_request(
                    Action("abort", fleet, "digits", "2.0.0", rollout_id=rollout_id)))
            with pytest.raises(RemoteUsageError, match="no rollout"):
                submitter.submit(fleet, build_request(
                    Action("abort", fleet, "digits", "1.0.0", rollout_id=rollout_id)))
    finally:
        client.close()
        for sim in sims:
            sim.stop()


@pytest.mark.parametrize(("kind", "form", "problem"), [
    ("rollout", {"fleet": "f", "model": "digits"}, "NAME:VERSION"),
    ("rollout", {"fleet": "bad/fleet", "model": "m:1"}, "not a fleet id"),
    ("rollout", {"fleet": "f", "model": "m:1", "canary": "lots"}, "canary"),
    ("abort", {"fleet": "f", "model": "m:1", "rollout": "x"}, "rollout id"),
    ("abort", {"fleet": "f", "model": "m:1"}, "rollout is missing"),
    ("delete", {"fleet": "f", "model": "m:1"}, "unknown action"),
])
def test_action_forms_are_checked(kind: str, form: dict[str, str], problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        parse_action(kind, form)


def test_requests_the_console_builds_parse_on_the_controller() -> None:
    start = build_request(parse_action("rollout", {"fleet": "f", "model": "m:2", "canary": "50%"}))
    parsed = parse_rollout_request(json.dumps(start).encode())
    assert (parsed["action"], parsed["version"], parsed["plan"]) == ("rollout", "2", {"canary": "50%"})
    abort = build_request(Action("abort", "f", "m", "2", rollout_id=7))
    assert parse_rollout_request(json.dumps(abort).encode())["rollout_id"] == 7
    for broken in ({**abort, "rollout_id": "7"}, {**abort, "rollout_id": True},
                   {**abort, "action": "drop"}):
        with pytest.raises(ProtocolError):
            parse_rollout_request(json.dumps(broken).encode())


def test_password_hashes() -> None:
    stored = hash_password("s3cret")
    check_hash(stored)
    assert verify_password(stored, "s3cret") and not verify_password(stored, "s3cre")
    assert not verify_password("scrypt$1$2", "s3cret")
    for bad in ("s3cret", "scrypt$16384$8$1$zz$00", stored[:-2]):
        with pytest.raises(ConfigError, match="password_hash"):
            check_hash(bad)


@pytest.mark.parametrize("module", ["edgekit.host.console", "edgekit.host.console._actions",
                                    "edgekit.host.console._app", "edgekit.host.console._auth",
                                    "edgekit.host.console._data", "edgekit.host.console._live",
                                    "edgekit.host.console._server"])
def test_console_exports_are_honest(module: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    exported = list(mod.__all__)
    assert len(set(exported)) == len(exported)
    assert all(hasattr(mod, name) for name in exported)
    public = {n for n, v in vars(mod).items() if not n.startswith("_") and callable(v)
              and getattr(v, "__module__", "") == mod.__name__}
    assert public <= set(exported), f"{module}: {public - set(exported)} not in __all__"


def test_the_wheel_carries_the_static_files() -> None:
    """Every file the pages load is matched by the package data of pyproject.toml."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["edgekit.host.console"]
    package = root / "edgekit" / "host" / "console"
    files = [p.relative_to(package).as_posix() for p in (package / "static").rglob("*")
             if p.is_file()]
    assert {"static/console.js", "static/console.css", "static/vendor/uplot/LICENSE",
            "static/vendor/uplot/uPlot.iife.min.js"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, g) and name.count("/") == g.count("/")
                   for g in globs), f"{name} is not in the package data"


def test_the_demo_gives_its_controller_a_console(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekit.host.demo.runner import _console_settings

    assert _console_settings(None) == {}
    monkeypatch.delenv("EDGEKIT_CONSOLE_PASSWORD", raising=False)
    settings = _console_settings("127.0.0.1:0")
    host, port = settings["console.listen"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0 and "console.password_hash" not in settings
    monkeypatch.setenv("EDGEKIT_CONSOLE_PASSWORD", "demo-pw")
    stored = _console_settings("127.0.0.1:8600")["console.password_hash"]
    assert verify_password(stored, "demo-pw") and "demo-pw" not in stored
    load_config(overrides=_console_settings("127.0.0.1:8600"))  # valid controller keys
