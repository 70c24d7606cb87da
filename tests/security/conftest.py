"""Fixtures of the signed-intent attack tests: keys of both roles, signed packages, a real
mosquitto (tests/mqtt_broker.py), the host's view of a fleet, real agents and an attacker's
anonymous client. The helpers they use are in _intent_support.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _intent_support import Agent, Attacker, Host, Keys, Packages, build_package
from mqtt_broker import MqttBroker, broker  # noqa: F401  (the module-scoped fixture)

from edgekit.signing import generate_keypair, load_private_key


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("intent-keys")
    release = generate_keypair(root / "edgekit-release")
    operator = generate_keypair(root / "edgekit-operator")
    stranger = generate_keypair(root / "stranger")
    return Keys(release=load_private_key(release.private_path),
                release_pub=release.public_path,
                operator=load_private_key(operator.private_path),
                operator_key=operator.private_path, operator_pub=operator.public_path,
                stranger=load_private_key(stranger.private_path))


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Packages:
    root = tmp_path_factory.mktemp("intent-pkgs")

    def make(name: str, version: str, seed: int) -> Path:
        return build_package(root / f"{name}-{version}.edgepkg", name=name, version=version,
                             seed=seed, sign_key=keys.release)

    return Packages(make("digits", "1.0.0", 1), make("digits", "2.0.0", 2),
                    make("digits", "3.0.0", 3), make("other", "0.0.1", 4))


@pytest.fixture
def fleet_name() -> str:
    return f"sec-{secrets.token_hex(3)}"


@pytest.fixture
def host(broker: MqttBroker, fleet_name: str, keys: Keys) -> Iterator[Host]:
    view = Host(broker, fleet_name, keys)
    yield view
    view.close()


@pytest.fixture
def attacker(broker: MqttBroker) -> Iterator[Attacker]:
    client = Attacker(broker)
    yield client
    client.close()


@pytest.fixture
def make_agent(tmp_path: Path, broker: MqttBroker, fleet_name: str,
               keys: Keys) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(device: str, model: Path, extra: list[str] | None = None) -> Agent:
        agent = Agent(tmp_path / device, broker, fleet_name, device, keys, model, extra)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()
