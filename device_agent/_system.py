"""What the device is and how it is doing: hardware for the birth message, load for metrics."""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

import psutil

from edgekit.protocol import HardwareInfo, RuntimeInfo, SystemSection
from edgekit.runtimes import availability

__all__ = ["SystemSampler", "hardware_info", "read_temperature", "runtime_info"]


def hardware_info() -> HardwareInfo:
    return HardwareInfo(
        hostname=socket.gethostname(),
        system=platform.system(),
        machine=platform.machine(),
        release=platform.release(),
        os=_os_name(),
        board=_board(),
        cpu_count=os.cpu_count() or 1,
        memory_total_bytes=int(psutil.virtual_memory().total),
        python=sys.version.split()[0],
    )


def runtime_info() -> list[RuntimeInfo]:
    """The runtimes installed here; SDKs not imported yet are read from package metadata."""
    return [RuntimeInfo(key=i.key, format=i.format, available=i.available, version=i.version,
                        providers=list(i.providers))
            for i in availability(import_sdks=False)]


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _board() -> str | None:
    # A Raspberry Pi and a Jetson name themselves in the device tree.
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\x00").decode(errors="replace")
    except OSError:
        return None


def read_temperature(thermal_dir: str | os.PathLike[str]) -> float | None:
    """The hottest thermal zone in degrees Celsius, or None when the board exposes none."""
    hottest: float | None = None
    for zone in sorted(Path(thermal_dir).glob("thermal_zone*")):
        try:
            millideg = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        value = millideg / 1000.0
        hottest = value if hottest is None else max(hottest, value)
    return hottest


class SystemSampler:
    """CPU (of this process, since the previous sample), memory and temperature."""

    def __init__(self, thermal_dir: str) -> None:
        self.thermal_dir = thermal_dir
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)

    def rss_bytes(self) -> int:
        return int(self._proc.memory_info().rss)

    def sample(self) -> SystemSection:
        try:
            load1: float | None = os.getloadavg()[0]
        except OSError:
            load1 = None
        return SystemSection(
            cpu_percent=float(self._proc.cpu_percent(None)),
            rss_bytes=self.rss_bytes(),
            memory_percent=float(psutil.virtual_memory().percent),
            temperature_c=read_temperature(self.thermal_dir),
            load1=load1,
        )
