"""Manifest validation and the .npz data-file contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _pkgutil import make_manifest

from edgekit.data import load_npz, save_npz
from edgekit.errors import ArtifactError, DataError
from edgekit.manifest import Manifest, TensorSpec, compare_versions


def test_manifest_round_trip() -> None:
    m = make_manifest()
    again = Manifest.from_dict(m.to_dict())
    assert again.to_dict() == m.to_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("name"), r"manifest\.name: missing"),
        (lambda d: d.update(version="one"), "not a dotted number"),
        (lambda d: d.update(task="dance"), "unknown task"),
        (lambda d: d["inputs"][0].update(dtype="complex"), r"inputs\[0\]\.dtype"),
        (lambda d: d.update(schema_version=99), "newer than this edgekit"),
        (lambda d: d["target"].update(format="caffe"), "unknown format"),
    ],
)
def test_manifest_errors_name_the_key(mutate, message: str) -> None:
    doc = make_manifest().to_dict()
    mutate(doc)
    with pytest.raises(ArtifactError, match=message):
        Manifest.from_dict(doc)


def test_versions_compare_numerically() -> None:
    assert compare_versions("1.10.0", "1.9.9") == 1
    assert compare_versions("2", "2.0.0") == 0
    assert compare_versions("2026.1129.1", "2026.1129.10") == -1


SPECS = [TensorSpec("image", "float32", ["batch", 1, 8, 8])]


def test_npz_single_input_alias_and_cast(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    save_npz(p, {"x": np.zeros((5, 1, 8, 8), np.float64)}, np.arange(5))
    ds = load_npz(p, SPECS, require_labels=True)
    assert ds.inputs["image"].dtype == np.float32 and len(ds) == 5
    assert list(ds.labels) == [0, 1, 2, 3, 4]


def test_npz_wrong_shape_names_input_expected_and_found(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    save_npz(p, {"image": np.zeros((5, 8, 8), np.float32)})
    with pytest.raises(DataError) as err:
        load_npz(p, SPECS)
    text = str(err.value)
    assert "'image'" in text and "[batch, 1, 8, 8]" in text and "[5, 8, 8]" in text


def test_npz_collects_every_problem(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "float32", ["batch", 2]), TensorSpec("b", "int64", ["batch", 3])]
    p = tmp_path / "d.npz"
    save_npz(p, {"a": np.zeros((4, 5), np.float32), "c": np.zeros(4)})
    with pytest.raises(DataError) as err:
        load_npz(p, specs)
    text = str(err.value)
    assert "'a'" in text and "'b' is missing" in text and "unknown key 'c'" in text


def test_npz_labels_required_and_counts(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    save_npz(p, {"image": np.zeros((5, 1, 8, 8), np.float32)})
    with pytest.raises(DataError, match="no labels"):
        load_npz(p, SPECS, require_labels=True)
    save_npz(p, {"image": np.zeros((5, 1, 8, 8), np.float32)}, np.arange(4))
    with pytest.raises(DataError, match="5 samples but 4 labels"):
        load_npz(p, SPECS)


def test_npz_corrupt_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(p)
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "none.npz")


def test_npz_dtype_mismatch(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    save_npz(p, {"ids": np.array([["a", "b"]])})
    with pytest.raises(DataError, match="expected dtype int64"):
        load_npz(p, [TensorSpec("ids", "int64", ["batch", 2])])
