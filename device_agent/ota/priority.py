"""The update's CPU-heavy steps at a lower OS priority than the model in service.

Verifying a package (hashing it, inflating the model, building an inference session) and
staging it (the golden samples, a second session) take a device's CPU for a while. The
agent serves requests meanwhile, and those should not wait for an update: :func:`run_niced`
runs such a step in a short-lived thread whose nice value is raised by ``nice`` (Linux keeps
a nice value per thread, so the threads that answer requests keep theirs). Where the OS
does not offer that, the step runs as it would have, at the agent's priority.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["run_niced", "thread_nice"]

log = logging.getLogger("device_agent.ota")

T = TypeVar("T")


def thread_nice() -> int | None:
    """The calling thread's nice value (Linux), or None where the OS has no per-thread one."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return None


def _lower_own_priority(nice: int) -> None:
    current = thread_nice()
    if current is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, current + nice))
    except OSError as exc:  # a sandbox that refuses it: run at the agent's priority
        log.debug("could not lower the update's priority: %s", exc)


def run_niced(fn: Callable[[], T], nice: int, name: str = "ota-work") -> T:
    """Call ``fn`` in a thread ``nice`` steps below the caller's priority and return its
    result, or raise what it raised. ``nice`` 0 calls it here, in the caller's thread."""
    if nice <= 0 or thread_nice() is None:
        return fn()
    with ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_lower_own_priority,
                            initargs=(nice,)) as worker:
        return worker.submit(fn).result()
