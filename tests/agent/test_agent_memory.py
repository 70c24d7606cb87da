"""The agent keeps freed large buffers for reuse (glibc's malloc thresholds), so the 1 MiB
messages of an artifact download do not fault their pages in again one chunk after another.

Real child processes count their own minor page faults (``getrusage``): counts, not
wall-clock, so a loaded machine does not change the outcome."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The download's pattern: 200 chunk payloads of 1 MiB, a window of 4 alive at a time, each a
# fresh bytes object freed once its chunk is written.
_CHILD = """
import json, resource, sys
from device_agent._mqtt import keep_large_buffers
kept = keep_large_buffers() if sys.argv[1] == "keep" else None
MiB = 1024 * 1024
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(50):
    window = [bytes([i]) * MiB for i in range(4)]
    del window
print(json.dumps({"kept": kept, "faults": faults() - before}))
"""


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        return False


def _child(mode: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120, check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


@pytest.mark.skipif(not _glibc(), reason="keep_large_buffers sets glibc's malloc thresholds;"
                    " this C library is not glibc, where it does nothing")
def test_kept_large_buffers_fault_a_fraction_of_the_pages() -> None:
    plain = _child("plain")
    kept = _child("keep")
    assert kept["kept"] is True
    assert isinstance(plain["faults"], int) and isinstance(kept["faults"], int)
    # Without the setting every window's 4 MiB is given back and faulted in again (about
    # 50 x 1024 pages); with it, the first window's pages are reused.
    assert kept["faults"] * 3 < plain["faults"], (kept, plain)
