"""Write the configuration key tables of docs/devices.md and docs/controller.md from the fields.

    python docs/config_tables.py           # rewrite the tables
    python docs/config_tables.py --check   # exit 1 when a page is out of date

The tables sit between the marker lines of :mod:`edgekit.typedconfig`; the tests check them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from device_agent import config as agent_config
from edgekit import typedconfig
from edgekit.host.controller import config as controller_config

DOCS = Path(__file__).resolve().parent
PAGES = {DOCS / "devices.md": agent_config.markdown, DOCS / "controller.md": controller_config.markdown}


def main(check: bool) -> int:
    stale = []
    for page, render in PAGES.items():
        text = page.read_text(encoding="utf-8")
        new = typedconfig.with_docs_block(text, render())
        if new != text:
            stale.append(page.name)
            if not check:
                page.write_text(new, encoding="utf-8")
    if stale:
        print(("out of date: " if check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and check else 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
