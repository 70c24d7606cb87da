"""``edgekit-agent install BUNDLE``: an update from a site bundle, with no broker.

The install runs an agent of its own on the device's configuration, without the MQTT link
(the bundle is the intent; a document on a broker is followed by ``edgekit-agent run`` as
usual), so the update goes through the updater's journalled steps: verify, stage, activate,
probation, commit or roll back. The HTTP API serves as configured meanwhile, so requests
during the probation are answered and watched. The state folder is locked by a running
agent: the install refuses then, and says to stop the agent first (one writer of the model
folder and the journal at a time).

Whatever stops the install (a refusal, a failed probation, Ctrl-C, a kill -9), the device
ends up serving a verified model: the journal finishes or undoes the update at the next
start, as after any interrupted update.
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import UsageError
from edgekit.protocol.ota import UpdateStep

from ._agent import Agent
from .config import AgentConfig
from .ota.bundle import prepare_install

__all__ = ["InstallResult", "install_bundle", "without_broker"]


@dataclass(frozen=True)
class InstallResult:
    deployment: str
    model: dict[str, Any]
    outcome: str  # an UpdateStep value, or "timeout" / "stopped"
    reason: str | None
    message: str
    serving: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.outcome == UpdateStep.SUCCEEDED.value


def without_broker() -> dict[str, Any]:
    """Config overrides that turn the MQTT link off (TLS files go with the broker URL)."""
    return {"mqtt.broker": "", "mqtt.ca_file": "", "mqtt.cert_file": "", "mqtt.key_file": ""}


def install_bundle(config: AgentConfig, bundle: Path, *, timeout: float,
                   stop: threading.Event, on_step: Callable[[str], None]) -> InstallResult:
    """Install ``bundle`` on the device ``config`` describes (its MQTT link off: see
    :func:`without_broker`); wait until the update ends, ``timeout`` passes or ``stop`` is
    set.

    Raises:
        UsageError: an agent runs on the state folder.
        ProtocolError: the file is not a well-formed bundle.
        UpdateFailure: the intent or the package is refused before the update starts.
        ArtifactError / RuntimeBackendError / OutputWriteError: as for starting an agent.
    """
    _check_not_running(config.state_dir)
    agent = Agent(config)
    try:
        prepared = prepare_install(bundle, agent.ota)
        if prepared.done is not None:
            done = prepared.done
            return InstallResult(prepared.deployment, prepared.model, done.outcome, done.reason,
                                 f"already carried out: {done.message}", _serving(agent))
        agent.start()
        journal = agent.ota.journal
        last_step = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = journal.outcome_of(prepared.deployment)
            if outcome is not None and journal.current is None:
                return InstallResult(prepared.deployment, prepared.model, outcome.outcome,
                                     outcome.reason, outcome.message, _serving(agent))
            current = journal.current
            if current is not None and current.step != last_step:
                last_step = current.step
                on_step(last_step)
            if stop.wait(0.2):
                break
        what = "stopped" if stop.is_set() else "timeout"
        return InstallResult(prepared.deployment, prepared.model, what, None,
                             f"the install {'was stopped' if stop.is_set() else 'timed out'}"
                             f" at step '{last_step}'; the next start of the agent finishes"
                             " the update or goes back to the previous model",
                             _serving(agent))
    finally:
        agent.stop()


def _serving(agent: Agent) -> dict[str, Any] | None:
    model = agent.slot.current
    return None if model is None else {"name": model.name, "version": model.version,
                                       "sha256": model.sha256}


def _check_not_running(state_dir: Path) -> None:
    """Raises: UsageError: an agent holds the state folder's lock."""
    lock = state_dir / "agent.lock"
    if not lock.exists():
        return
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise UsageError(f"an agent is running with the state folder {state_dir}; the"
                             " install needs the model folder and the update journal to itself",
                             hint="stop the agent (e.g. `systemctl stop edgekit-agent`), run"
                                  " the install, then start it again") from exc
        fcntl.flock(handle, fcntl.LOCK_UN)
