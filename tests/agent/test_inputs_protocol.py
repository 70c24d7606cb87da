"""Input checks against the manifest, request decoding, and the protocol helpers."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from msgspec import to_builtins

from device_agent._inputs import (
    InputValidator,
    inputs_from_npy,
    inputs_from_npz,
    inputs_from_request,
)
from device_agent._mqtt_api import check_reply_topic
from edgekit.errors import InputError, ProtocolError, UsageError
from edgekit.manifest import QuantParams, TensorSpec
from edgekit.protocol import (
    Kind,
    MetricsPayload,
    PredictRequest,
    Schema,
    check_id,
    decode,
    decode_array,
    encode,
    encode_array,
    fleet_topic,
    parse_topic,
    subscription,
    topic,
)

SPECS = [
    TensorSpec("image", "float32", ["batch", 8, 8]),
    TensorSpec("mask", "bool", ["batch", 8]),
    TensorSpec("count", "int64", ["batch"]),
]


def _good(n: int = 2) -> dict:
    return {"image": np.zeros((n, 8, 8), np.float32), "mask": np.ones((n, 8), bool),
            "count": np.arange(n)}


def test_valid_inputs_pass_without_copy() -> None:
    v = InputValidator(SPECS, max_batch=4)
    feeds = _good()
    out = v.check(feeds)
    assert out["image"] is feeds["image"]
    # JSON-ish values are cast: float64 -> float32, ints 0/1 -> bool, whole floats -> int64
    out = v.check({"image": np.zeros((1, 8, 8)).tolist(), "mask": [[0, 1] * 4],
                   "count": [3.0]})
    assert out["image"].dtype == np.float32 and out["mask"].dtype == bool
    assert out["count"].dtype == np.int64 and out["count"][0] == 3


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"image": None}, ["input 'image' is missing"]),
        ({"extra": np.zeros(2)}, ["unknown input(s) 'extra'"]),
        ({"image": np.zeros((2, 8, 9), np.float32)}, ["axis 2 must be 8"]),
        ({"image": np.zeros((2, 64), np.float32)}, ["has shape [2, 64], expected [batch, 8, 8]"]),
        ({"count": np.arange(3)}, ["input 'count' has batch=3 but input 'image' has batch=2"]),
        ({"count": np.array([1.5, 2.0])}, ["holds fractions"]),
        ({"image": np.full((2, 8, 8), np.nan, np.float32)}, ["NaN or infinite"]),
        ({"image": np.array([["a"] * 8] * 8 * 2).reshape(2, 8, 8)},
         ["'image' has dtype <U1, expected float32"]),
        ({"image": [[["a"] * 8] * 8] * 2}, ["'image' holds <U1 values, expected numbers"]),
        ({"mask": [[1, 2] * 4] * 2}, ["'mask' has dtype int64, expected bool"]),
        ({"image": [[1, 2], [3]]}, ["not a rectangular array"]),
        ({"image": np.zeros((0, 8, 8), np.float32), "mask": np.ones((0, 8), bool),
          "count": np.arange(0)}, ["holds no rows"]),
        ({"image": np.zeros((5, 8, 8), np.float32), "mask": np.ones((5, 8), bool),
          "count": np.arange(5)}, ["more than the limit of 4"]),
    ],
)
def test_bad_inputs_list_every_problem(change: dict, fragments: list[str]) -> None:
    feeds = _good()
    for key, value in change.items():
        if value is None:
            feeds.pop(key)
        else:
            feeds[key] = value
    with pytest.raises(InputError) as err:
        InputValidator(SPECS, max_batch=4, where="digits 1.0").check(feeds)
    assert err.value.message.startswith("inputs do not fit digits 1.0")
    for fragment in fragments:
        assert fragment in err.value.message


def test_many_problems_in_one_message_and_non_mapping() -> None:
    with pytest.raises(InputError) as err:
        InputValidator(SPECS, 4).check({"image": np.zeros((2, 3)), "zzz": 1})
    message = err.value.message
    assert "'image' has shape" in message and "'mask' is missing" in message
    assert "'count' is missing" in message and "'zzz'" in message
    with pytest.raises(InputError, match="must map input names"):
        InputValidator(SPECS, 4).check([1, 2, 3])  # type: ignore[arg-type]


def test_single_input_alias_and_quantized_inputs() -> None:
    spec = TensorSpec("pixels", "int8", ["batch", 4], QuantParams(0.5, -10))
    v = InputValidator([spec], 8)
    real = v.check({"x": [[0.0, 1.0, 2.5, 3.0]]})["pixels"]
    assert real.dtype == np.float32  # real values: the session quantizes them
    raw = v.check({"pixels": np.array([[1, 2, 3, 4]], np.int8)})["pixels"]
    assert raw.dtype == np.int8
    unquantized = InputValidator([TensorSpec("p", "uint8", [1, 4])], 8)
    with pytest.raises(InputError, match="outside the range of uint8"):
        unquantized.check({"p": [[0, 1, 2, 300]]})
    with pytest.raises(InputError, match="axis 0 must be 1"):
        unquantized.check({"p": np.zeros((2, 4), np.uint8)})


def test_request_decoding() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = decode(encode(PredictRequest(inputs={"a": encode_array(arr), "b": [[1, 2]]})),
                     PredictRequest)
    feeds = inputs_from_request(request)
    np.testing.assert_array_equal(feeds["a"], arr)
    assert feeds["b"] == [[1, 2]]
    with pytest.raises(ProtocolError, match="missing required field `inputs`"):
        decode(b'{"schema": "edgekit.predict-request/1", "input": {}}', PredictRequest)
    buf = io.BytesIO()
    np.save(buf, arr)
    spec = [TensorSpec("x", "float32", ["batch", 3])]
    np.testing.assert_array_equal(inputs_from_npy(buf.getvalue(), spec)["x"], arr)
    with pytest.raises(ProtocolError, match="carries one array"):
        inputs_from_npy(buf.getvalue(), SPECS)
    with pytest.raises(ProtocolError, match="not a readable .npy"):
        inputs_from_npy(b"\x93NUMPYgarbage", spec)
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((1000, 1000), np.float32))
    with pytest.raises(ProtocolError, match="unpacks to"):
        inputs_from_npz(buf.getvalue(), max_bytes=1_000_000)
    assert inputs_from_npz(buf.getvalue(), max_bytes=10_000_000)["x"].shape == (1000, 1000)
    with pytest.raises(ProtocolError, match="not a readable .npz"):
        inputs_from_npz(b"PK\x03\x04junk", 1000)


def test_encoded_arrays_round_trip_and_refuse_garbage() -> None:
    for arr in (np.arange(5, dtype=np.int8), np.eye(3, dtype=np.float64)[None],
                np.array([True, False])):
        back = decode_array(json.loads(encode(encode_array(arr))))
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)
    doc = to_builtins(encode_array(np.zeros(4, np.float32)))
    for bad, fragment in [
        ({**doc, "dtype": "object"}, r"Invalid enum value 'object' - at `\$.dtype`"),
        ({**doc, "shape": [5]}, "needs 20"),
        ({**doc, "shape": [-1]}, r"Expected `int` >= 0 - at `\$.shape\[0\]`"),
        ({**doc, "data": "!!"}, "not valid base64"),
        ({**doc, "shape": [1 << 30, 1 << 10]}, "larger than the limit"),
        ([1, 2], "expected an object"),
    ]:
        with pytest.raises(ProtocolError, match=fragment):
            decode_array(bad)


def test_topics_ids_and_payloads() -> None:
    assert topic("f1", "pi-7", Kind.STATUS) == "edgekit/v1/f1/pi-7/status"
    assert topic("f1", "pi-7", Kind.REPLY, "app") == "edgekit/v1/f1/pi-7/reply/app"
    assert fleet_topic("f1", Kind.DESIRED) == "edgekit/v1/f1/_fleet/desired"
    assert subscription("f1", kind=Kind.METRICS) == "edgekit/v1/f1/+/metrics"
    parts = parse_topic("edgekit/v1/f1/pi-7/reply/app/x")
    assert parts is not None and (parts.fleet, parts.device, parts.kind, parts.rest) == (
        "f1", "pi-7", "reply", "app/x")
    assert parse_topic("other/v1/f/d/status") is None
    assert parse_topic("edgekit/v1/f//status") is None
    assert check_id("pi-7.lab_2", "id") == "pi-7.lab_2"
    for bad in ("", "_fleet", "a/b", "a+b", "#", "x" * 65, 5):
        with pytest.raises(UsageError):
            check_id(bad, "device id")
    payload = encode({"schema": Schema.METRICS.value, "x": float("nan"), "y": [float("inf")]})
    assert json.loads(payload) == {"schema": "edgekit.metrics/1", "x": None, "y": [None]}
    for raw, fragment in [(b"\xff", "not valid JSON"), (b"[1]", "got `array`"),
                          (b'{"schema": "edgekit.metrics/2"}',
                           "Invalid value 'edgekit.metrics/2' - at `\\$.schema`"),
                          (b"{}", "missing required field `schema`")]:
        with pytest.raises(ProtocolError, match=fragment):
            decode(raw, MetricsPayload)


def test_reply_topics_cannot_forge_telemetry() -> None:
    assert check_reply_topic("app/replies/7") == "app/replies/7"
    assert check_reply_topic("edgekit/v1/f/d/reply/app") == "edgekit/v1/f/d/reply/app"
    for bad in ("", "a/+/b", "a/#", "$SYS/x", "edgekit/v1/f/d/status",
                "edgekit/v1/f/other/metrics", "edgekit/v1/f/d/predict", None, 7, "x" * 600):
        with pytest.raises(ProtocolError):
            check_reply_topic(bad)


def test_fast_path_agrees_with_the_full_check() -> None:
    spec = [TensorSpec("x", "float32", ["batch", 4])]
    v = InputValidator(spec, max_batch=3)
    good = np.zeros((2, 4), np.float32)
    assert v.check({"x": good})["x"] is good
    for bad, fragment in [(np.zeros((), np.float32), "has shape []"),
                          (np.zeros((4, 4), np.float32), "more than the limit of 3"),
                          (np.zeros((0, 4), np.float32), "holds no rows"),
                          (np.full((1, 4), np.nan, np.float32), "NaN or infinite"),
                          (np.zeros((1, 5), np.float32), "axis 1 must be 4")]:
        with pytest.raises(InputError, match=re.escape(fragment)):
            v.check({"x": bad})
    two = InputValidator([TensorSpec("a", "float32", ["n", 2]),
                          TensorSpec("b", "int64", ["n", 1])], 8)
    with pytest.raises(InputError, match="has n=3 but input 'a' has n=2"):
        two.check({"a": np.zeros((2, 2), np.float32), "b": np.zeros((3, 1), np.int64)})
