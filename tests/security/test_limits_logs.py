"""Broker passwords never appear in a log line, whether they come in a URL or an option.

Attack of issue 9 (item 9): broker URLs with passwords were logged verbatim.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _limits_support import (  # noqa: F401  (fixtures)
    LimitsPackages,
    MqttBroker,
    broker,
    limits_pkgs,
    make_agent,
)

from edgekit.redact import redact_url

SECRET = "s3cret-Pa55"


@pytest.mark.parametrize(("url", "shown"), [
    (f"mqtt://user:{SECRET}@host:1883", "mqtt://user:***@host:1883"),
    (f"mqtts://user:{SECRET}@host", "mqtts://user:***@host"),
    ("mqtt://user@host:1883", "mqtt://user@host:1883"),
    ("mqtt://host:1883", "mqtt://host:1883"),
    ("", ""),
    ("not a url", "not a url"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_agent_logs_no_broker_password(broker: MqttBroker, make_agent, tmp_path: Path,
                                       limits_pkgs: LimitsPackages) -> None:
    # The test broker accepts any credentials; the agent connects with these.
    url = broker.url.replace("mqtt://", f"mqtt://edge:{SECRET}@")
    agent = make_agent("lim-logs", "d1")
    agent.stop()
    agent.args[agent.args.index("--broker") + 1] = url
    agent.start()
    agent.wait_healthy()
    agent.stop()
    log = agent.log()
    assert "connected to mqtt://" in log, log
    assert SECRET not in log, log
