"""``python -m device_agent`` is ``edgekit-agent``."""

from __future__ import annotations

from .cli import main

main()
