"""The console's actions without a browser: an operator's abort and roll back reach a real
controller over a real mosquitto through the signed requests the console builds, and the
devices go back; a request signed by a key the controller does not trust changes nothing;
the checks on forms, password hashes and requests refuse what they must.

Simulated devices (tests/host/_controller_sim.SimDevice) stand in for agents here: the
abort needs a rollout that stays running, i.e. a device that never answers an update.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from mqtt_broker import broker, wait_until

from edgekit.artifact import sha256_file
from edgekit.errors import ConfigError, ProtocolError, UsageError
from edgekit.host.console import hash_password, verify_password
from edgekit.host.console._actions import Action, Submitter, build_request, parse_action
from edgekit.host.console._auth import check_hash
from edgekit.host.controller import load_config
from edgekit.host.controller.remote import RemoteRolloutError, RemoteUsageError
from edgekit.host.controller.service import Controller
from edgekit.host.db import RolloutState, Store, TargetState
from edgekit.host.mqtt_client import HostClient
from edgekit.host.registry import Registry
from edgekit.protocol import encode
from edgekit.protocol.controller import parse_rollout_request
from edgekit.signing import generate_keypair, load_private_key, load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from _controller_sim import SimDevice  # noqa: E402
from _digits import write_digits_package  # noqa: E402

__all__ = ["broker"]  # the fixture, imported for pytest


def _setup(broker: Any, tmp_path: Path, name: str, behavior: dict[str, str] | None = None,
           accuracy: dict[str, float] | None = None,
           **overrides: Any) -> tuple[Any, str, str, list[SimDevice]]:
    """A registry with digits 1.0.0 and 2.0.0, a controller config that trusts the operator
    key for requests, and two simulated devices serving 1.0.0 (not started)."""
    keys = generate_keypair(tmp_path / "signer")
    key = load_private_key(keys.private_path)
    v1 = write_digits_package(tmp_path / "v1.edgepkg", version="1.0.0", sign_key=key)
    v2 = write_digits_package(tmp_path / "v2.edgepkg", version="2.0.0", alpha=30.0, sign_key=key)
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    fleet = f"{name}-{secrets.token_hex(3)}"
    with Store(db_url) as store:
        Registry(store, tmp_path / "store").push(v1)
        Registry(store, tmp_path / "store").push(v2)
    cfg = load_config(overrides={
        "mqtt.broker": broker.url, "database.url": db_url, "registry.store": str(tmp_path / "store"),
        "controller.fleets": [fleet], "controller.tick_s": 0.1, "controller.lease_s": 5.0,
        "controller.signing_key": str(keys.private_path),
        "controller.operator_keys": [str(keys.public_path)], "rollout.canary": "1",
        "rollout.device_timeout_s": 120.0, "rollout.rollback_timeout_s": 30.0,
        "rollout.probation_requests": 0, "rollout.probation_seconds": 0.0, **overrides})
    serving = {"name": "digits", "version": "1.0.0", "sha256": sha256_file(v1)}
    sims = [SimDevice(broker.url, fleet, f"dev{i}", serving=serving, behavior=behavior,
                      accuracy=accuracy, trusted=[load_public_key(keys.public_path)]) for i in range(2)]
    return cfg, str(keys.private_path), fleet, sims


def test_an_operator_abort_sends_the_devices_back(broker: Any, tmp_path: Path) -> None:
    cfg, key_path, fleet, sims = _setup(broker, tmp_path, "abort", {"2.0.0": "silent"})
    db_url = cfg.database.url
    client = HostClient(broker.url).connect()
    try:
        with Controller(cfg), Store(db_url) as store:
            for sim in sims:
                sim.start()
            wait_until(lambda: len(store.list_devices(fleet, online=True)) == 2, 30, "devices")
            submitter = Submitter(client, load_private_key(key_path))
            started = submitter.submit(build_request(
                parse_action("rollout", {"fleet": fleet, "model": "digits:2.0.0"})))
            rollout_id = int(started["id"])
            wait_until(lambda: any(t.state == TargetState.ASSIGNED
                                   for t in store.list_rollout_targets(rollout_id)), 30,
                       "the canary to be asked")
            abort = build_request(Action("abort", fleet, "digits", "2.0.0", rollout_id=rollout_id))
            reply = submitter.submit(abort)
            assert reply["id"] == rollout_id and reply["state"] in ("aborting", "aborted")
            # The same request again (a retry) is answered with the same rollout.
            assert submitter.submit(abort)["id"] == rollout_id
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
                submitter.submit(build_request(
                    Action("abort", fleet, "digits", "2.0.0", rollout_id=rollout_id)))
            with pytest.raises(RemoteUsageError, match="no rollout"):
                submitter.submit(build_request(
                    Action("abort", fleet, "digits", "1.0.0", rollout_id=rollout_id)))
    finally:
        client.close()
        for sim in sims:
            sim.stop()


def test_an_operator_roll_back_returns_the_fleet_to_the_model_deployed_before(
        broker: Any, tmp_path: Path) -> None:
    # The field says the earlier model is worse (0.6 against 0.9): the operator's roll back
    # goes through all the same, with no quality gate and no wait for labels, while the
    # rollouts forward are judged (at least 20 labels, margin 0.05).
    cfg, key_path, fleet, sims = _setup(
        broker, tmp_path, "back", accuracy={"1.0.0": 0.6, "2.0.0": 0.9},
        **{"rollout.quality_min_labels": 20, "rollout.quality_margin": 0.05})
    client = HostClient(broker.url).connect()
    intruder = load_private_key(generate_keypair(tmp_path / "intruder").private_path)
    try:
        with Controller(cfg), Store(cfg.database.url) as store:
            for sim in sims:
                sim.start()
            wait_until(lambda: len(store.list_devices(fleet, online=True)) == 2, 30, "devices")
            submitter = Submitter(client, load_private_key(key_path))

            def deploy(version: str) -> int:
                rollout_id = int(submitter.submit(build_request(parse_action(
                    "rollout", {"fleet": fleet, "model": f"digits:{version}"})))["id"])
                wait_until(lambda: store.get_rollout(rollout_id).state
                           == RolloutState.SUCCEEDED, 60, f"the rollout to {version}")
                return rollout_id

            first = deploy("1.0.0")
            back_request = build_request(Action("rollback", fleet, "digits", "1.0.0",
                                                rollout_id=first))
            # Nothing deployed before the first rollout: nothing to go back to.
            with pytest.raises(RemoteUsageError, match="no other model"):
                submitter.submit(back_request)
            second = deploy("2.0.0")
            assert {sim.version for sim in sims} == {"2.0.0"}
            # Only the fleet's latest succeeded rollout can be rolled back.
            with pytest.raises(RemoteUsageError, match="not fleet .* latest"):
                submitter.submit(build_request(Action("rollback", fleet, "digits", "1.0.0",
                                                      rollout_id=first)))
            request = build_request(Action("rollback", fleet, "digits", "2.0.0",
                                           rollout_id=second))
            # Signed by a key the controller does not trust: refused, nothing created.
            with pytest.raises(RemoteRolloutError, match="not trusted"):
                Submitter(client, intruder, timeout=10).submit(request)
            assert len(store.list_rollouts(fleet=fleet)) == 2
            back = submitter.submit(request)
            assert (back["model_name"], back["model_version"]) == ("digits", "1.0.0")
            assert submitter.submit(request)["id"] == back["id"]  # a retry: the same rollout
            record = store.get_rollout(int(back["id"]))
            assert record.plan["back"] == {"rollout": second, "allow_downgrade": True,
                                           "allow_rename": False}
            wait_until(lambda: store.get_rollout(record.id).state == RolloutState.SUCCEEDED,
                       60, "the roll back")
            assert {sim.version for sim in sims} == {"1.0.0"}
            assert store.list_events(rollout_id=second, kinds=["rollout.quality"])
            assert not store.list_events(rollout_id=record.id, kinds=["rollout.quality"])
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
    ("rollback", {"fleet": "f", "model": "m:1", "rollout": "0"}, "rollout id"),
    ("delete", {"fleet": "f", "model": "m:1"}, "unknown action"),
])
def test_action_forms_are_checked(kind: str, form: dict[str, str], problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        parse_action(kind, form)


def test_requests_the_console_builds_parse_on_the_controller() -> None:
    start = build_request(parse_action("rollout", {"fleet": "f", "model": "m:2", "canary": "50%"}))
    parsed = parse_rollout_request(encode(start))
    assert parsed == start
    assert (parsed.action, parsed.version, parsed.plan) == ("rollout", "2", {"canary": "50%"})
    abort = build_request(Action("abort", "f", "m", "2", rollout_id=7))
    assert parse_rollout_request(encode(abort)).rollout_id == 7
    back = parse_rollout_request(encode(build_request(
        Action("rollback", "f", "m", "2", rollout_id=7))))
    assert (back.action, back.rollout_id) == ("rollback", 7)
    with pytest.raises(ProtocolError, match="rollback needs rollout_id"):
        parse_rollout_request(encode({**msgspec.to_builtins(back), "rollout_id": None}))
    fields = msgspec.to_builtins(abort)
    for broken in ({**fields, "rollout_id": "7"}, {**fields, "rollout_id": True},
                   {**fields, "action": "drop"}):
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


def test_the_demo_gives_its_controller_a_console(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from edgekit.host.demo.runner import _console_settings

    operator = generate_keypair(tmp_path / "operator")
    assert _console_settings(None, operator) == {}
    monkeypatch.delenv("EDGEKIT_CONSOLE_PASSWORD", raising=False)
    settings = _console_settings("127.0.0.1:0", operator)
    host, port = settings["console.listen"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0 and "console.password_hash" not in settings
    assert settings["console.operator_key"] == str(operator.private_path)
    monkeypatch.setenv("EDGEKIT_CONSOLE_PASSWORD", "demo-pw")
    stored = _console_settings("127.0.0.1:8600", operator)["console.password_hash"]
    assert verify_password(stored, "demo-pw") and "demo-pw" not in stored
    load_config(overrides=_console_settings("127.0.0.1:8600", operator))  # valid keys
