"""Store.record_metrics_batch has the effect of record_metrics called for each message in
turn (duplicates dropped, the summary only from a newer (session, seq), last_seen only
forward), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

from edgekit.host.db import MetricsSummary, Store

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _msg(device: str, session: int, seq: int, minute: int, accuracy: float | None,
         **extra: Any) -> dict[str, Any]:
    at = T0 + dt.timedelta(minutes=minute)
    summary = None if accuracy is None else MetricsSummary(latency_p50_ms=float(seq),
                                                           accuracy=accuracy, label_count=seq)
    return {"fleet": "f", "device": device, "session": session, "seq": seq, "ts": at,
            "received": at, "payload": {"seq": seq, "x": [1.5, None]}, "summary": summary,
            **extra}


def test_batches_match_one_by_one_writes(db_url: str) -> None:
    batches = [
        [_msg("a", 1, 5, 10, 0.5), _msg("b", 0, 1, 11, None), _msg("a", 1, 5, 10, 0.9)],
        [_msg("a", 1, 3, 12, 0.1), _msg("a", 2, 1, 9, 0.7), _msg("c", 0, 7, 13, 0.3)],
        [_msg("b", 0, 2, 5, 0.6), _msg("c", 0, 6, 20, 0.2), _msg("c", 0, 7, 13, 0.3)],
    ]
    with Store(db_url) as store:
        new = [store.record_metrics_batch(b) for b in batches]
        assert new == [[True, True, False], [True, True, True], [True, True, False]]
        a, b, c = (store.get_device("f", d) for d in "abc")
        assert a is not None and b is not None and c is not None
        # a: (2, 1) is the newest message although it was sent earliest.
        assert (a.metrics.accuracy, a.metrics.label_count) == (0.7, 1)
        assert a.metrics_at == T0 + dt.timedelta(minutes=9)
        assert a.last_seen == T0 + dt.timedelta(minutes=12)
        # b: the first message had no summary; the second (older clock) still brings one.
        assert (b.metrics.accuracy, b.metrics.latency_p50_ms) == (0.6, 2.0)
        assert b.last_seen == T0 + dt.timedelta(minutes=11)
        assert not b.online and b.first_seen == T0 + dt.timedelta(minutes=11)
        # c: seq 6 arrived after seq 7 and does not replace its figures.
        assert (c.metrics.accuracy, c.last_seen) == (0.3, T0 + dt.timedelta(minutes=20))
        history = store.metrics_history("f", device="a")
        assert [(m.session, m.seq) for m in history] == [(1, 5), (1, 3), (2, 1)]
        assert history[0].payload == {"seq": 5, "x": [1.5, None]}
        assert history[0].ts == T0 + dt.timedelta(minutes=10)
        # A status written later keeps the figures the batches left.
        store.upsert_device_status("f", "a", online=True, session=2)
        again = store.get_device("f", "a")
        assert again is not None and again.online and again.metrics.accuracy == 0.7
