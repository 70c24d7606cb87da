"""The update's CPU-heavy steps run below the priority of the threads that serve requests
(device_agent/ota/priority.py). Linux keeps a nice value per thread; these tests read it."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from device_agent.config import load_config
from device_agent.ota.priority import run_niced, thread_nice
from edgekit.errors import ConfigError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="per-thread nice values are a Linux feature")


def _seen() -> tuple[int, int | None]:
    return threading.get_native_id(), thread_nice()


@linux
def test_the_step_runs_niced_in_its_own_thread_and_the_caller_keeps_its_priority() -> None:
    before = thread_nice()
    assert before is not None
    if before > 19 - 5:
        pytest.skip("this test process already runs at the lowest priority")
    tid, nice = run_niced(_seen, 5)
    assert tid != threading.get_native_id()
    assert nice == before + 5
    assert thread_nice() == before  # the serving side of the agent is left as it was
    # A second step starts from the caller's priority again, not from the last step's.
    assert run_niced(_seen, 3)[1] == before + 3


@linux
def test_nice_is_capped_at_the_lowest_priority() -> None:
    before = thread_nice()
    assert before is not None
    assert run_niced(_seen, 40)[1] == 19


def test_zero_runs_the_step_in_the_callers_thread() -> None:
    assert run_niced(_seen, 0) == (threading.get_native_id(), thread_nice())


def test_what_the_step_raises_reaches_the_caller() -> None:
    error = ValueError("the package is not signed")

    def fails() -> None:
        raise error

    with pytest.raises(ValueError) as caught:
        run_niced(fails, 10)
    assert caught.value is error


@linux
def test_a_sandbox_that_refuses_setpriority_still_runs_the_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise PermissionError("not allowed here")

    monkeypatch.setattr(os, "setpriority", refuse)
    assert run_niced(lambda: 42, 10) == 42


@pytest.mark.parametrize(("value", "words"), [("20", "outside 0..19"), ("-1", "outside 0..19"),
                                              ("x", "not an integer")])
def test_an_ota_nice_out_of_range_is_refused_naming_the_key(value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=rf"ota\.nice .*EDGEKIT_OTA_NICE.*{words}"):
        load_config(env={"EDGEKIT_OTA_NICE": value})
