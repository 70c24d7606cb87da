"""Thin links, the parts on their own: the maintenance window, the token bucket, how the
device's limits and the document's combine, and the document's ``transfer`` field.

Clocks are injected (a fake monotonic clock and a fake local time) so the tests say what
the pacing does at a given moment without waiting for it.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import msgspec
import pytest

from device_agent.config import OtaSection, load_config
from device_agent.ota.download import DownloadSettings
from device_agent.ota.throttle import Pace, TokenBucket
from device_agent.ota.window import MaintenanceWindow
from edgekit.errors import ConfigError, ProtocolError
from edgekit.protocol.ota import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    make_desired,
    make_transfer,
    parse_desired,
)

SHA = "ab" * 32


def _at(hh: int, mm: int, ss: int = 0) -> dt.datetime:
    return dt.datetime(2026, 3, 1, hh, mm, ss)


@pytest.mark.parametrize(("text", "inside", "outside"), [
    ("01:00-05:00", [_at(1, 0), _at(4, 59)], [_at(0, 59), _at(5, 0), _at(13, 0)]),
    ("22:00-06:00", [_at(22, 0), _at(23, 59), _at(0, 0), _at(5, 59)], [_at(6, 0), _at(21, 59)]),
])
def test_window_contains(text: str, inside: list[dt.datetime], outside: list[dt.datetime]
                         ) -> None:
    window = MaintenanceWindow.parse(text)
    assert window is not None and str(window) == text
    assert all(window.contains(t) for t in inside)
    assert not any(window.contains(t) for t in outside)


def test_window_seconds_to_open() -> None:
    window = MaintenanceWindow.parse("22:00-06:00")
    assert window is not None
    assert window.seconds_to_open(_at(23, 0)) == 0.0
    assert window.seconds_to_open(_at(21, 59, 30)) == 30.0
    assert window.seconds_to_open(_at(6, 0)) == 16 * 3600.0
    assert MaintenanceWindow.parse("") is None


@pytest.mark.parametrize("text", ["1:00-05:00", "24:00-05:00", "01:00-01:00", "01:00", "x"])
def test_window_errors_name_the_key(text: str) -> None:
    with pytest.raises(ProtocolError, match=r"^ota\.maintenance_window: "):
        MaintenanceWindow.parse(text, "ota.maintenance_window")
    with pytest.raises(ConfigError, match="ota.maintenance_window"):
        load_config(overrides={"ota.maintenance_window": text, "model.allow_unsigned": True})


def test_token_bucket_holds_the_rate_with_debt() -> None:
    now = [0.0]
    bucket = TokenBucket(1000.0, clock=lambda: now[0])  # 1000 bytes/s, one second saved up
    assert bucket.take(4000)  # a chunk larger than the bucket goes out, into debt
    assert not bucket.take(1)
    assert bucket.seconds_to_ready() == pytest.approx(3.0)
    now[0] = 2.9
    assert not bucket.take(1)
    now[0] = 3.01
    assert bucket.take(4000)
    # Over a long stretch the bytes admitted follow the rate, whatever the request size.
    admitted = 0
    for step in range(1, 10001):
        now[0] = 3.01 + step * 0.01
        if bucket.take(512):
            admitted += 512
    assert 100 * 1000 - 4000 <= admitted <= 100 * 1000 + 4000
    # Idle time saves up at most one second of tokens.
    now[0] += 3600
    assert bucket.take(1000) and not bucket.take(1)


def test_pace_admits_only_inside_the_window() -> None:
    local = [_at(12, 0)]
    pace = Pace(None, MaintenanceWindow.parse("01:00-05:00"), clock=lambda: local[0])
    assert not pace.open() and not pace.admit(1)
    local[0] = _at(1, 30)
    assert pace.open() and pace.admit(10**9)  # no rate cap: anything inside the window


def test_pace_wait_stops_on_cancel_and_marks_the_resume() -> None:
    pace = Pace(None, MaintenanceWindow.parse("01:00-05:00"), clock=lambda: _at(12, 0))
    cancel = threading.Event()
    cancel.set()
    pace.wait(1, cancel)  # closed window, but cancelled: returns at once
    assert pace.resumed == 0.0
    # Monotonic readings: the bucket's start, admit, a refused take, the pause asked for,
    # the take that succeeds, the end of the wait.
    ticks = iter([0.0, 0.0, 1.0, 2.99, 3.5, 3.5])
    open_pace = Pace(8, None, monotonic=lambda: next(ticks))  # 1000 bytes/s
    assert open_pace.admit(3000)
    open_pace.wait(1, threading.Event())
    assert open_pace.resumed == 3.5


def _doc(**transfer: Any) -> Any:
    return make_desired(deployment="d1", fleet="f", name="m", version="1.0.0", sha256=SHA,
                        size=10, request_topic=f"edgekit/v1/f/_artifacts/get/{SHA}",
                        transfer=make_transfer(transfer.get("max_kbps"),
                                               transfer.get("window")))


@pytest.mark.parametrize(("device", "document", "rate", "window"), [
    ({}, {}, None, None),
    ({"max_kbps": 512}, {}, 512, None),
    ({"max_kbps": 512}, {"max_kbps": 256}, 256, None),  # the lower rate wins
    ({"max_kbps": 128}, {"max_kbps": 256}, 128, None),
    ({}, {"window": "22:00-06:00"}, None, "22:00-06:00"),
    ({"maintenance_window": "01:00-02:00"}, {"window": "22:00-06:00"}, None,
     "01:00-02:00"),  # the device's own window wins
])
def test_device_and_document_limits_combine(device: dict[str, Any], document: dict[str, Any],
                                            rate: int | None, window: str | None) -> None:
    pace = Pace.for_update(OtaSection(**device), _doc(**document))
    assert pace.max_kbps == rate
    assert (str(pace.window) if pace.window else None) == window
    assert pace.limited == (rate is not None or window is not None)


def test_transfer_in_the_desired_document() -> None:
    plain = msgspec.to_builtins(_doc())
    assert "transfer" not in plain  # absent unless given: older devices see the same bytes
    doc = msgspec.to_builtins(_doc(max_kbps=256, window="22:00-06:00"))
    assert doc["transfer"] == {"max_kbps": 256, "window": "22:00-06:00"}
    assert msgspec.to_builtins(parse_desired(dict(doc)).transfer) == doc["transfer"]
    bad = dict(doc, transfer={"max_kbps": 0, "window": None})
    with pytest.raises(ProtocolError, match=r"desired\.transfer\.max_kbps"):
        parse_desired(bad)
    bad = dict(doc, transfer={"max_kbps": None, "window": "7-9"})
    with pytest.raises(ProtocolError, match=r"desired\.transfer\.window"):
        parse_desired(bad)
    unknown = dict(doc, transfer={"max_kbps": 64, "future": 1})
    parsed = parse_desired(unknown).transfer
    assert msgspec.to_builtins(parsed) == {"max_kbps": 64, "window": None}


@pytest.mark.parametrize(("chunk", "kbps", "timeout", "expected"), [
    (DEFAULT_CHUNK_BYTES, None, 10.0, DEFAULT_CHUNK_BYTES),  # a fast link: as configured
    (16 * 1024 * 1024, None, 10.0, MAX_CHUNK_BYTES),  # a document's suggestion over the limit
    (DEFAULT_CHUNK_BYTES, 256, 10.0, 78 * 1024),  # 32 kB/s: a quarter of 10 s is 80 kB
    (16 * 1024, 64, 10.0, 16 * 1024),  # a thin link's own small chunks stay
    (DEFAULT_CHUNK_BYTES, 1, 1.0, 1024),  # never below 1 KiB
    (100, None, 10.0, 100),
])
def test_chunk_size_asked_for(chunk: int, kbps: int | None, timeout: float,
                              expected: int) -> None:
    """A chunk is one MQTT message: under a rate cap it must arrive well within its request's
    timeout, or it would be asked for again and again."""
    settings = DownloadSettings(chunk_bytes=chunk, request_timeout_s=timeout,
                                pace=Pace(max_kbps=kbps))
    assert settings.request_bytes() == expected
