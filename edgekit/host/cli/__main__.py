"""``python -m edgekit.host.cli``: the same as the ``edgekit`` command."""

from edgekit.host.cli import main

main()
