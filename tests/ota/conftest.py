"""Fixtures for the OTA tests with real agents: test packages (signed with keys made here), a
real broker, and agent processes that are stopped at the end. The helpers they use are in
_ota_fleet.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _ota_fleet import OPERATOR_KEY, PADDING, Agent, Packages, write_operator_key
from _ota_models import build_package
from mqtt_broker import MqttBroker, broker  # noqa: F401  (the module-scoped fixture)

from edgekit.signing import generate_keypair, load_private_key


@pytest.fixture(scope="session")
def pkgs(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    root = tmp_path_factory.mktemp("ota-pkgs")
    keys = generate_keypair(root / "signing")
    other = generate_keypair(root / "other")
    key, other_key = load_private_key(keys.private_path), load_private_key(other.private_path)

    def make(name: str, version: str, **kw: Any) -> Path:
        return build_package(root / f"{name}.edgepkg", version=version,
                             sign_key=kw.pop("sign_key", key), **kw)

    operator_public, operator_private = write_operator_key(root)
    return Packages(
        public_key=keys.public_path, operator_key=OPERATOR_KEY,
        operator_public=operator_public, operator_private=operator_private, other_key=other_key, key=key,
        v1=make("v1", "1.0.0", seed=1),
        v2=make("v2", "2.0.0", seed=2, padding=PADDING),
        v3=make("v3", "3.0.0", seed=3, padding=PADDING),
        older=make("older", "0.9.0", seed=4),
        unsigned=make("unsigned", "1.9.0", seed=5, sign_key=None),
        bad_signature=make("badsig", "1.9.1", seed=6, sign_key=other_key),
        nan=make("nan", "1.5.0", seed=7, kind="nan"),
        slow=make("slow", "1.6.0", seed=8, kind="slow"),
        wide=make("wide", "1.7.0", seed=9, kind="wide"),
        broken=make("broken", "1.8.0", seed=10, kind="broken"),
    )



@pytest.fixture
def make_agent(tmp_path: Path, broker: MqttBroker, pkgs: Packages
               ) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(fleet: str, device: str, env: dict[str, str] | None = None,
             model: Path | None = None) -> Agent:
        agent = Agent(tmp_path / device, broker, fleet, device, pkgs, env, model)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()
