"""Deltas without a broker: the builder and the applier on real packages (ONNX, TFLite), and
the applier's refusal of hostile delta files (ops out of bounds, literal bombs, names, wrong
base or target)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard
from _ota_fleet import Packages

from edgekit.delta import apply_delta
from edgekit.errors import ArtifactError, ProtocolError
from edgekit.host.ota.delta import build_delta, delta_bytes, write_delta
from edgekit.protocol.ota.delta import (
    LITERAL,
    BaseMember,
    DeltaHeader,
    DeltaSegment,
    decode_header,
    encode_header,
)


def _rebuild(delta: bytes, base: Path, target_sha: str, target_size: int, scratch: Path,
             **kw: Any) -> bytes:
    out = io.BytesIO()
    apply_delta(io.BytesIO(delta), base, out.write, scratch, target_sha256=target_sha,
                target_size=target_size, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def pair(pkgs: Packages, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """v1 and a 2.0.0 of the same weights (new manifest, same model), plus the padding."""
    root = tmp_path_factory.mktemp("delta-pair")
    return pkgs.v1, pkgs.make(root / "v1-as-2.edgepkg", version="2.0.0", seed=1)


def test_rebuilds_exactly_and_copies_the_unchanged_model(pair: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    base, target = pair
    delta = build_delta(base, target)
    raw = target.read_bytes()
    rebuilt = _rebuild(delta, base, hashlib.sha256(raw).hexdigest(), len(raw), tmp_path)
    assert rebuilt == raw
    header, _ = decode_header(delta)
    copied = [op for s in header.segments for op in s.ops if op[0] != LITERAL]
    assert [m.name for m in header.members] == ["model.onnx", "golden.npz"]
    assert copied and len(delta) < len(raw) // 2
    assert delta_bytes(base, target) == len(delta)
    assert list(tmp_path.iterdir()) == []  # the scratch members are gone


def test_other_weights_rebuild_too(pkgs: Packages, tmp_path: Path) -> None:
    delta = write_delta(pkgs.v1, pkgs.v2, tmp_path / "out")
    raw = pkgs.v2.read_bytes()
    data = delta.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == delta.sha256 and len(data) == delta.size
    scratch = tmp_path / "s"
    scratch.mkdir()
    assert _rebuild(data, pkgs.v1, delta.target_sha256, len(raw), scratch) == raw


def _doc(delta: bytes) -> tuple[dict[str, Any], bytes]:
    header, at = decode_header(delta)
    return msgspec.to_builtins(header), delta[at:]


def _pack(doc: dict[str, Any], literals: bytes) -> bytes:
    """A delta file around ``doc`` as given (unchecked: a hostile sender's)."""
    body = msgspec.json.encode(doc)
    return b"EKDELTA1" + len(body).to_bytes(4, "big") + body + literals


@pytest.mark.parametrize("hostile, message", [
    (lambda d: d["segments"][-1]["ops"].__setitem__(0, [1, 10**9, 5]), "past the end"),
    (lambda d: d["segments"][0]["ops"].append([7, 0, 1]), "does not exist"),
    (lambda d: d["segments"][0].__setitem__("size", 1), "ops give"),
    (lambda d: d["members"].__setitem__(0, {"name": "../../etc/passwd", "size": 1}),
     "not a member name"),
    (lambda d: d.__setitem__("literal_bytes", d["literal_bytes"] + 1), "literal_bytes"),
    # A literal bomb: the ops claim 2 GiB of literals; refused before anything is inflated.
    (lambda d: (d["segments"].extend([{"size": 1024**3, "deflate": 6,
                                       "ops": [[-1, 0, 1024**3]]}] * 2),
                d.__setitem__("literal_bytes", d["literal_bytes"] + 2 * 1024**3)),
     "decompressed bytes"),
    (lambda d: d.__setitem__("base_sha256", "0" * 64), "the base here is"),
    (lambda d: d.__setitem__("target_size", d["target_size"] + 1), "rebuilds"),
])
def test_hostile_headers_are_refused(pair: tuple[Path, Path], tmp_path: Path,
                                     hostile: Any, message: str) -> None:
    base, target = pair
    raw = target.read_bytes()
    doc, literals = _doc(build_delta(base, target))
    hostile(doc)
    with pytest.raises(ProtocolError, match=message):
        _rebuild(_pack(doc, literals), base, hashlib.sha256(raw).hexdigest(), len(raw),
                 tmp_path, max_expanded=2 * 1024**3)
    assert list(tmp_path.iterdir()) == []


def test_oversize_header_and_garbage_are_refused(pair: tuple[Path, Path]) -> None:
    with pytest.raises(ProtocolError, match="over the"):
        decode_header(b"EKDELTA1" + (1 << 30).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="not a delta"):
        decode_header(b"PK\x03\x04" + b"\0" * 64)
    base, target = pair
    delta = build_delta(base, target)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_header(delta[:20])


def test_corrupt_or_long_literals_are_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, target = pair
    raw = target.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    doc, literals = _doc(build_delta(base, target))
    flipped = bytearray(literals)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises((ProtocolError, ArtifactError)):
        _rebuild(_pack(doc, bytes(flipped)), base, sha, len(raw), tmp_path)
    # One frame more than the header declares.
    longer = literals + zstandard.ZstdCompressor().compress(b"x" * 100)
    with pytest.raises(ProtocolError, match="longer"):
        _rebuild(_pack(doc, longer), base, sha, len(raw), tmp_path)


def test_a_delta_for_other_bytes_fails_the_hash(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Ops in bounds that build something else: the rebuilt sha256 is checked."""
    base, target = pair
    raw = target.read_bytes()
    doc, literals = _doc(build_delta(base, target))
    segment = next(s for s in doc["segments"] if s["ops"][0][0] > 0)
    length = segment["ops"][0][2]
    assert length <= doc["base_size"]
    segment["ops"][0] = [0, 0, length]  # other bytes of the base, same length
    with pytest.raises(ArtifactError, match="sha256|writes past"):
        _rebuild(_pack(doc, literals), base, hashlib.sha256(raw).hexdigest(), len(raw),
                 tmp_path)


def test_header_type_is_strict() -> None:
    header = DeltaHeader(base_sha256="a" * 64, base_size=1, target_sha256="b" * 64,
                         target_size=1, members=[BaseMember(name="model.onnx", size=1)],
                         segments=[DeltaSegment(size=1, ops=[(0, 0, 1)])], literal_bytes=0)
    data = encode_header(header)
    assert decode_header(data)[0] == header
    with pytest.raises(ProtocolError):
        decode_header(data.replace(b'"base_size":1', b'"base_size":"1"'))


def _tflite(change_last: bool) -> bytes:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(64, 256)).astype("f"), rng.normal(size=(256, 10)).astype("f")
    model = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(256),
                                 tf.keras.layers.Dense(10)])
    model.layers[0].set_weights([w1, np.zeros(256, "f")])
    model.layers[1].set_weights([w2 * (1.5 if change_last else 1.0),
                                 np.full(10, 0.1 if change_last else 0.0, "f")])
    data: bytes = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    return data


@pytest.mark.slow
def test_tflite_buffers_are_matched(tmp_path: Path) -> None:
    """A TFLite model with its last layer changed: the first layer's buffer (64 KiB) is
    found in both flatbuffers and copied, so the delta is a fraction of the package."""
    from edgekit.artifact import write_package
    from edgekit.host.ota._tensors import tflite_ranges
    from edgekit.manifest import Manifest, TensorSpec

    paths = []
    for version, changed in (("1.0.0", False), ("1.1.0", True)):
        model = _tflite(changed)
        assert 65536 in [end - start for start, end in tflite_ranges(model)]
        manifest = Manifest(
            name="tfl", version=version, created="2026-01-01T00:00:00+00:00",
            task="classification", source={"framework": "keras", "sha256": None},
            target={"format": "tflite", "model_file": "model.tflite", "runtime": "litert"},
            inputs=[TensorSpec("x", "float32", ["batch", 64])],
            outputs=[TensorSpec("y", "float32", ["batch", 10])], recipe={"quantize": "none"},
            tools={}, golden={"atol": 1e-4, "rtol": 1e-3, "samples": 0})
        path = tmp_path / f"{version}.edgepkg"
        write_package(path, manifest, {"model.tflite": model})
        paths.append(path)
    delta = build_delta(paths[0], paths[1])
    header, _ = decode_header(delta)
    copied = sum(op[2] for s in header.segments for op in s.ops if op[0] > 0)
    assert copied >= 65536
    assert len(delta) < paths[1].stat().st_size / 2
