"""The systemd unit that runs the agent as a service (``edgekit-agent install-service``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .config import AgentConfig

__all__ = ["agent_command", "setup_commands", "unit_text"]


def agent_command() -> list[str]:
    """How to start this installation's agent: its console script, else ``python -m``."""
    script = Path(sys.executable).parent / "edgekit-agent"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "device_agent"]


def _quote(arg: str) -> str:
    # systemd splits ExecStart like a shell for plain words and honours double quotes.
    if arg and all(c.isalnum() or c in "/._-=:@+," for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(config_path: Path, config: AgentConfig, user: str,
              command: list[str] | None = None) -> str:
    """A unit that restarts the agent on failure (not on a config error, exit 2), runs it as
    ``user`` and lets it write only its model and state folders."""
    exec_start = " ".join(_quote(a) for a in [*(command or agent_command()), "run",
                                              "--config", str(config_path)])
    writable = sorted({str(Path(config.model.dir)), str(config.state_dir)})
    return f"""[Unit]
Description=edgekit device agent ({config.device.fleet}/{config.device.id})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={exec_start}
# Optional secrets (EDGEKIT_MQTT_PASSWORD=...), readable by root only.
EnvironmentFile=-/etc/edgekit/agent.env
Restart=on-failure
RestartSec=5
# Exit 2 is a configuration error: restarting cannot fix it.
RestartPreventExitStatus=2
KillSignal=SIGTERM
TimeoutStopSec=20
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={" ".join(_quote(p) for p in writable)}

[Install]
WantedBy=multi-user.target
"""


def setup_commands(user: str, config: AgentConfig, unit_path: Path) -> list[str]:
    """The commands an administrator runs after the unit is written."""
    folders = " ".join(shlex.quote(p) for p in sorted({config.model.dir, str(config.state_dir)}))
    return [
        f"sudo useradd --system --home-dir /var/lib/edgekit-agent --shell /usr/sbin/nologin"
        f" {shlex.quote(user)}",
        f"sudo mkdir -p {folders} && sudo chown -R {shlex.quote(user)}: {folders}",
        "sudo systemctl daemon-reload",
        f"sudo systemctl enable --now {shlex.quote(unit_path.stem)}",
    ]
