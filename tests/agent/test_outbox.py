"""The store-and-forward queue on its own: order, bound, persistence, counters."""

from __future__ import annotations

import json
from pathlib import Path

from device_agent._outbox import Outbox


def _payload(seq: int) -> bytes:
    return json.dumps({"seq": seq}).encode()


def test_order_bound_and_drop_count_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state" / "q.sqlite"
    box = Outbox(path, max_messages=5)
    seqs = [box.put("t/metrics", _payload, "seq.metrics") for _ in range(8)]
    assert seqs == list(range(1, 9))
    kept = box.peek(0, 100)
    assert [json.loads(m.payload)["seq"] for m in kept] == [4, 5, 6, 7, 8]  # oldest dropped
    assert box.depth == 5 and box.dropped == 3
    box.remove([kept[0].id, kept[1].id])
    assert box.depth == 3
    assert [json.loads(m.payload)["seq"] for m in box.peek(kept[1].id, 1)] == [6]
    assert box.next_value("mqtt.session") == 1 and box.next_value("mqtt.session") == 2
    box.close()

    again = Outbox(path, max_messages=5)
    assert again.depth == 3 and again.dropped == 3
    assert [json.loads(m.payload)["seq"] for m in again.peek(0, 10)] == [6, 7, 8]
    assert again.put("t/metrics", _payload, "seq.metrics") == 9  # numbers keep growing
    assert again.put("t/events", _payload, "seq.events") == 1  # one counter per kind
    assert again.next_value("mqtt.session") == 3
    again.close()


def test_a_failing_payload_builder_leaves_nothing_behind(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.sqlite", max_messages=10)

    def broken(seq: int) -> bytes:
        raise ValueError("cannot encode")

    try:
        box.put("t", broken, "seq.x")
    except ValueError:
        pass
    assert box.depth == 0 and box.counter("seq.x") == 0
    assert box.put("t", _payload, "seq.x") == 1
    box.close()


def test_byte_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    topic = "t/metrics"

    def big(seq: int) -> bytes:
        return json.dumps({"seq": seq, "pad": "x" * 990}).encode()

    size = len(topic) + len(big(1))
    box = Outbox(path, max_messages=1000, max_bytes=5 * size + size // 2)
    for _ in range(12):
        box.put(topic, big, "seq.metrics")
    kept = box.peek(0, 100)
    assert [json.loads(m.payload)["seq"] for m in kept] == [8, 9, 10, 11, 12]
    assert box.depth == 5 and box.dropped == 7
    assert box.bytes == sum(len(m.topic) + len(m.payload) for m in kept) <= box.max_bytes
    box.remove([kept[0].id])
    left = sum(len(m.topic) + len(m.payload) for m in kept[1:])
    assert box.bytes == left
    box.close()
    # The byte count is the queue's, not the process's: a reopened queue knows it.
    again = Outbox(path, max_messages=1000, max_bytes=2 * size + 10)
    assert again.bytes == left  # nothing dropped until the next message
    again.put(topic, big, "seq.metrics")
    assert again.depth == 2 and again.dropped == 7 + 3
    assert [json.loads(m.payload)["seq"] for m in again.peek(0, 10)] == [12, 13]
    again.close()
