"""Decode speed of the OTA wire documents: a chunk request, a chunk reply, a desired document.

The payloads are literal bytes (what a device and a server send), so the same script times
any checkout of edgekit that has ``parse_request``, ``decode_chunk`` and ``parse_desired``::

    PYTHONPATH=. python benchmarks/ota_wire_bench.py            # best of 7 rounds
    PYTHONPATH=. python benchmarks/ota_wire_bench.py --quick    # a second or so

Each row is the best round's time per call in microseconds (``timeit``; the best round is
the one least disturbed by other work on the machine).
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import timeit

from edgekit.protocol.ota import decode_chunk, parse_desired, parse_request

SHA = "ab" * 32
REQUEST = (b'{"schema":"edgekit.chunk-request/1","request_id":"0123abcd-17","sha256":"'
           + SHA.encode() + b'","offset":1048576,"length":1048576,'
           b'"reply_to":"edgekit/v1/f1/dev-1/reply/ota"}')
DATA = bytes(range(64))  # few bytes: the header's decode is timed more than the sha256
HEADER = (b'{"schema":"edgekit.chunk/1","request_id":"0123abcd-17","sha256":"' + SHA.encode()
          + b'","offset":0,"length":' + str(len(DATA)).encode() + b',"total":48213,'
          b'"chunk_sha256":"' + hashlib.sha256(DATA).hexdigest().encode() + b'"}')
CHUNK = struct.pack(">I", len(HEADER)) + HEADER + DATA
DESIRED = (b'{"schema":"edgekit.desired/2","deployment":"d20260131T120000-3f2a1c",'
           b'"issued":"2026-01-31T12:00:00Z","expires":"2026-02-07T12:00:00Z","fleet":"f1",'
           b'"devices":["dev-a","dev-b"],"model":{"name":"digits","version":"1.1.0",'
           b'"sha256":"' + SHA.encode() + b'","size":48213,"key_id":"9f86d081884c7d65"},'
           b'"sources":{"mqtt":{"request_topic":"edgekit/v1/f1/_artifacts/get/' + SHA.encode()
           + b'"},"url":"https://h.example/a.edgepkg"},"allow_breaking":false,'
           b'"allow_downgrade":false,"allow_rename":false,"revert":false,'
           b'"latency_budget_ms":12.5,"probation":{"requests":20,"seconds":30.0,'
           b'"max_error_rate":0.0,"max_nonfinite_rate":0.0,"max_latency_ms":null},'
           b'"transfer":{"max_kbps":256,"window":"01:00-05:00"}}')

CASES = [
    ("parse_request (chunk request)", lambda: parse_request(REQUEST)),
    ("decode_chunk (header + 64 bytes, sha256 included)", lambda: decode_chunk(CHUNK)),
    ("parse_desired (desired document)", lambda: parse_desired(DESIRED)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    rounds, number = (3, 2_000) if args.quick else (7, 20_000)
    print(f"{'call':<50} {'us/call':>8}")
    for name, call in CASES:
        call()  # fails loudly if the payload does not decode
        best = min(timeit.repeat(call, number=number, repeat=rounds)) / number
        print(f"{name:<50} {best * 1e6:>8.2f}")


if __name__ == "__main__":
    main()
