"""Packages of variants: the converter writes several artifacts under one signed manifest,
and the agent measures the ones it can run here and serves the fastest eligible one.

Everything is real: the converter quantizes a digits classifier, onnxruntime runs each
variant, and changed packages are re-signed with a real key. The "slow" variant is the
real model with real extra compute whose result is multiplied by zero, so its outputs are
exactly the model's while every run costs tens of matrix products.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _agent_support import Models
from _digits import onnx_classifier, ridge_weights
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import helper, numpy_helper

from converters import ConvertOptions, convert, convert_variants
from device_agent import Agent, TrustPolicy, load_config, load_model
from edgekit.artifact import (
    golden_from_npz,
    golden_to_npz,
    open_package,
    sha256_bytes,
    verify_package,
)
from edgekit.data import Dataset
from edgekit.errors import ArtifactError, RuntimeBackendError, SignatureError
from edgekit.manifest import Manifest
from edgekit.protocol import StatusPayload, decode, encode
from edgekit.signing import generate_keypair, load_private_key, load_public_key, sign_bytes

VARIANTS = [("onnx", "none"), ("onnx", "int8"), ("onnx", "fp16")]


class Signer:
    """A release key and the trust policy that accepts it."""

    def __init__(self, root: Path) -> None:
        pair = generate_keypair(root / "release")
        self.key: Ed25519PrivateKey = load_private_key(pair.private_path)
        self.public_path = pair.public_path
        self.trust = TrustPolicy((load_public_key(pair.public_path),))


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return Signer(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def source(models: Models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """The digits classifier as an .onnx source file, and labelled evaluation data."""
    x, y = models.data
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    path = tmp_path_factory.mktemp("source") / "digits.onnx"
    path.write_bytes(onnx_classifier(w, b))
    return path, Dataset({"x": x[1200:1500]}, y[1200:1500], "digits 1200:1500")


@pytest.fixture(scope="module")
def package(source: tuple[Path, Dataset], signer: Signer,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, evald = source
    out = tmp_path_factory.mktemp("variants") / "digits.edgepkg"
    convert_variants(path, VARIANTS, ConvertOptions(name="digits", version="1.0.0",
                                                    latency_runs=5),
                     output=out, eval_data=evald, calibration=evald, sign_key=signer.key)
    return out


def rewrite(src: Path, dest: Path, key: Ed25519PrivateKey,
            edit: Callable[[dict[str, Any]], None] = lambda doc: None,
            members: dict[str, bytes] | None = None, drop: str | None = None) -> Path:
    """Copy a package with manifest edits, replaced members and variant ``drop`` left out,
    pinned and signed anew with ``key`` (what a release with that key could publish):
    written raw, so that a hostile manifest reaches the reader as it is."""
    pkg = open_package(src)
    data = {name: pkg.read_member(name) for name in pkg.manifest.files
            if drop is None or drop not in name}
    data.update(members or {})
    doc = json.loads(pkg.manifest_bytes)
    if drop is not None:
        doc["variants"] = [v for v in doc["variants"] if v["id"] != drop]
    doc["files"] = {n: {"sha256": sha256_bytes(b), "size": len(b)} for n, b in data.items()}
    edit(doc)
    raw = json.dumps(doc).encode()
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("manifest.json", raw)
        zf.writestr("signature.json", json.dumps(sign_bytes(key, raw)))
        for name, blob in data.items():
            zf.writestr(name, blob)
    return dest


def variant_doc(doc: dict[str, Any], vid: str) -> dict[str, Any]:
    return next(v for v in doc["variants"] if v["id"] == vid)


def slowed(model: bytes, matmuls: int = 24) -> bytes:
    """``model`` with real extra work on its input: a chain of 512x512 products whose sum,
    times zero, is added to the output. The outputs stay exactly the model's."""
    graph = onnx.load_from_string(model).graph
    out = graph.output[0].name
    rng = np.random.default_rng(0)
    graph.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((64, 512)) / 8).astype(np.float32), "sW0"),
        numpy_helper.from_array((rng.standard_normal((512, 512)) / 23).astype(np.float32), "sW"),
        numpy_helper.from_array(np.zeros((), np.float32), "szero"),
    ])
    for node in graph.node:
        node.output[:] = [f"{o}_fast" if o == out else o for o in node.output]
    nodes = [helper.make_node("MatMul", ["x", "sW0"], ["s0"])]
    for i in range(matmuls):
        nodes += [helper.make_node("MatMul", [f"s{i}", "sW"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"s{i + 1}"])]
    nodes += [helper.make_node("ReduceSum", [f"s{matmuls}"], ["ssum"], keepdims=1),
              helper.make_node("Mul", ["ssum", "szero"], ["snull"]),
              helper.make_node("Add", [f"{out}_fast", "snull"], [out])]
    graph.node.extend(nodes)
    result = onnx.load_from_string(model)
    result.graph.CopyFrom(graph)
    onnx.checker.check_model(result)
    return result.SerializeToString()


def test_the_package_pins_and_signs_every_variant(package: Path, signer: Signer) -> None:
    report = verify_package(package, [load_public_key(signer.public_path)])
    manifest = open_package(package).manifest
    doc = manifest.to_dict()
    assert report.signed and doc["schema_version"] == 2
    assert [v.id for v in manifest.variants] == ["onnx-none", "onnx-int8", "onnx-fp16"]
    assert manifest.max_accuracy_drop == pytest.approx(0.01)
    assert report.files_checked == 2 * len(VARIANTS)
    for v in manifest.variants:
        assert {v.model_file, v.golden_file} <= set(manifest.files)
        assert v.recipe["quantize"] == v.id.split("-")[1]
        assert v.metrics["parity"]["passed"] and "drop" in v.metrics["accuracy"]
        assert v.metrics["latency"]["artifact"]["p50_ms"] > 0
    # The top level reads as the default variant, for readers that take one artifact.
    assert manifest.model_file == manifest.variants[0].model_file
    assert manifest.golden == manifest.variants[0].golden
    # Quantization changes outputs: each variant carries its own golden outputs.
    pkg = open_package(package)
    none_out = golden_from_npz(pkg.read_member("golden-onnx-none.npz"))[1]["probs"]
    int8_out = golden_from_npz(pkg.read_member("golden-onnx-int8.npz"))[1]["probs"]
    assert not np.array_equal(none_out, int8_out)


def test_the_agent_serves_the_fastest_it_measured(package: Path, signer: Signer,
                                                  models: Models) -> None:
    model = load_model(package, signer.trust)
    choice = model.variant
    assert choice is not None
    here = [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]
    # One candidate per (variant, provider onnxruntime reports here): CUDA where present.
    assert {(c.variant, c.provider) for c in choice.candidates} == \
        {(f"onnx-{q}", p) for _, q in VARIANTS for p in here}
    assert all(c.eligible and c.p50_ms is not None for c in choice.candidates)
    fastest = min(choice.candidates, key=lambda c: c.p50_ms or 0.0)
    assert (choice.id, choice.provider, choice.p50_ms) == \
        (fastest.variant, fastest.provider, fastest.p50_ms)
    assert fastest.reason == "chosen" and choice.reason.startswith("fastest eligible")
    # The model serves the chosen variant: its manifest, its session, its golden outputs.
    assert model.manifest.recipe["quantize"] == choice.id.split("-")[1]
    assert model.run_golden() is not None and model.run_golden() <= 0  # type: ignore[operator]
    x, _ = models.data
    assert model.session.run({"x": x[:4]})["probs"].shape == (4, 10)


def test_a_variant_failing_parity_is_not_served(package: Path, signer: Signer,
                                                tmp_path: Path) -> None:
    pkg = open_package(package)
    golden_in, golden_out = golden_from_npz(pkg.read_member("golden-onnx-none.npz"))
    bad = golden_to_npz(golden_in, {k: v + 0.5 for k, v in golden_out.items()})

    def converter_says_fp16_failed(doc: dict[str, Any]) -> None:
        variant_doc(doc, "onnx-fp16")["metrics"]["parity"].update(
            passed=False, failures=["top-1 agreement 0.5 < 0.97"])

    tampered = rewrite(package, tmp_path / "t.edgepkg", signer.key, converter_says_fp16_failed,
                       {"golden-onnx-none.npz": bad})
    choice = load_model(tampered, signer.trust).variant
    assert choice is not None and choice.id == "onnx-int8"
    by_id = {c.variant: c for c in choice.candidates}
    assert not by_id["onnx-none"].eligible and by_id["onnx-none"].p50_ms is None
    assert "golden parity failed here" in by_id["onnx-none"].reason
    assert not by_id["onnx-fp16"].eligible
    assert "failed the converter's parity check (top-1 agreement" in by_id["onnx-fp16"].reason


def test_measurement_decides_and_the_budget_binds(package: Path, signer: Signer,
                                                  tmp_path: Path) -> None:
    """onnx-none made slow for real loses to int8; then the fast int8, over the accuracy
    budget by its evidence, is never served although it is the fastest."""
    pkg = open_package(package)
    slow = slowed(pkg.read_member("model-onnx-none.onnx"))

    def slow_package(dest: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
        return rewrite(package, dest, signer.key, edit, {"model-onnx-none.onnx": slow},
                       drop="onnx-fp16")

    first = load_model(slow_package(tmp_path / "slow.edgepkg", lambda doc: None), signer.trust)
    assert first.variant is not None and first.variant.id == "onnx-int8"
    times = {c.variant: c.p50_ms for c in first.variant.candidates}
    assert times["onnx-none"] > times["onnx-int8"]  # type: ignore[operator]

    def int8_over_budget(doc: dict[str, Any]) -> None:
        variant_doc(doc, "onnx-int8")["metrics"]["accuracy"]["drop"] = 0.05

    second = load_model(slow_package(tmp_path / "budget.edgepkg", int8_over_budget),
                        signer.trust)
    assert second.variant is not None and second.variant.id == "onnx-none"
    int8 = next(c for c in second.variant.candidates if c.variant == "onnx-int8")
    assert not int8.eligible and int8.p50_ms is not None
    assert "accuracy drop 5.00 points is over the package's budget of 1.00" in int8.reason
    assert int8.p50_ms < second.variant.p50_ms


def test_no_eligible_variant_refuses_the_package(package: Path, signer: Signer,
                                                 tmp_path: Path) -> None:
    def tight_budget(doc: dict[str, Any]) -> None:
        doc["max_accuracy_drop"] = 0.0
        for v in doc["variants"]:
            v["metrics"]["accuracy"]["drop"] = 0.02

    tampered = rewrite(package, tmp_path / "none.edgepkg", signer.key, tight_budget)
    with pytest.raises(RuntimeBackendError, match="none of the package's variants can serve"):
        load_model(tampered, signer.trust)


def test_single_artifact_packages_stay_as_they_were(source: tuple[Path, Dataset],
                                                    models: Models, tmp_path: Path) -> None:
    path, evald = source
    out = tmp_path / "one.edgepkg"
    convert(path, ConvertOptions(latency_runs=5), output=out, eval_data=evald)
    doc = json.loads(open_package(out).manifest_bytes)
    assert doc["schema_version"] == 1 and "variants" not in doc
    assert "max_accuracy_drop" not in doc and doc["golden"]["file"] == "golden.npz"
    for pkg in (out, models.signed_v1):
        model = load_model(pkg, TrustPolicy((load_public_key(models.public_key),),
                                            allow_unsigned=True))
        assert model.variant is None and model.run_golden() is not None


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: variant_doc(d, "onnx-int8")["target"].update(model_file="model-extra.onnx"),
     "variant onnx-int8's model file 'model-extra.onnx' is not pinned"),
    (lambda d: variant_doc(d, "onnx-int8")["target"].update(model_file="../evil.onnx"),
     "path traversal"),
    (lambda d: variant_doc(d, "onnx-fp16")["golden"].update(file="/etc/passwd"),
     "path traversal"),
    (lambda d: variant_doc(d, "onnx-fp16").update(id="onnx-int8"), "ids repeat"),
    (lambda d: variant_doc(d, "onnx-fp16").update(id="../x"), "not a valid variant id"),
    (lambda d: d.update(schema_version=1), "need schema_version 2"),
    (lambda d: d.update(variants=[]), "needs a non-empty list of variants"),
    (lambda d: d.update(max_accuracy_drop="lots"), "max_accuracy_drop"),
    (lambda d: d.update(schema_version=3), "newer than this edgekit understands"),
])
def test_hostile_manifests_are_refused(package: Path, signer: Signer, tmp_path: Path,
                                       edit: Callable[[dict[str, Any]], None],
                                       message: str) -> None:
    hostile = rewrite(package, tmp_path / "h.edgepkg", signer.key, edit)
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_model(hostile, signer.trust)


def test_a_variant_swapped_in_after_signing_is_refused(package: Path, signer: Signer,
                                                       tmp_path: Path) -> None:
    other = Signer(tmp_path)
    pkg = open_package(package)
    swapped = rewrite(package, tmp_path / "s.edgepkg", other.key,
                      members={"model-onnx-int8.onnx": pkg.read_member("model-onnx-none.onnx")})
    with pytest.raises(SignatureError):
        load_model(swapped, signer.trust)


@pytest.fixture
def served(package: Path, signer: Signer, tmp_path: Path) -> Iterator[Agent]:
    cfg = load_config(env={}, overrides={
        "model.dir": str(tmp_path / "models"), "model.package": str(package),
        "model.trusted_keys": [str(signer.public_path)], "http.listen": "127.0.0.1:0",
        "telemetry.interval_s": 0.0})
    agent = Agent(cfg)
    agent.start()
    yield agent
    agent.stop()


def test_health_status_and_console_name_the_variant(served: Agent, tmp_path: Path) -> None:
    import http.client

    from edgekit.host.console._data import device_view, fleet_view
    from edgekit.host.controller.ingest import status_fields
    from edgekit.host.db import Store
    from edgekit.protocol import DeviceState

    host, port = served.http_address.rsplit(":", 1)  # type: ignore[union-attr]
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    conn.close()
    model = served.model
    assert model is not None and model.variant is not None
    assert health["variant"]["id"] == model.variant.id
    assert {c["variant"] for c in health["variant"]["candidates"]} == \
        {f"onnx-{q}" for _, q in VARIANTS}
    status = decode(encode(served.status.build(1, DeviceState.ONLINE, None)), StatusPayload)
    assert status.variant == model.variant
    assert status.model is not None and status.model.sha256 == model.sha256
    old = {k: v for k, v in json.loads(encode(status)).items() if k != "variant"}
    assert decode(json.dumps(old).encode(), StatusPayload).variant is None
    # The controller stores the status as it came; the console's device table shows it.
    store = Store(f"sqlite:///{tmp_path / 'edgekit.db'}")
    store.upsert_device_status(status.fleet, status.device, **status_fields(status))
    assert [d["variant"] for d in fleet_view(store)["devices"]] == [model.variant.id]
    view = device_view(store, status.fleet, status.device)
    assert view is not None and view["device"]["variant"]["p50_ms"] == model.variant.p50_ms


def test_manifest_round_trip_keeps_variants(package: Path) -> None:
    manifest = open_package(package).manifest
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest
    chosen = manifest.for_variant(manifest.variant("onnx-int8"))
    assert chosen.model_file == "model-onnx-int8.onnx" and chosen.golden["file"] == \
        "golden-onnx-int8.npz"
    with pytest.raises(ArtifactError, match="no variant 'tflite-int8'"):
        manifest.variant("tflite-int8")


@pytest.mark.slow
def test_litert_and_onnxruntime_variants_compete(tmp_path: Path, signer: Signer) -> None:
    """A Keras model as onnx:none, tflite:none and tflite:int8: both runtimes measured on
    the same golden inputs, the fastest served, and it classifies the evaluation data."""
    from convert_cases import keras_digits_data, trained_keras_digits

    calib, evald, _ = keras_digits_data()
    out = tmp_path / "kd.edgepkg"
    convert_variants(trained_keras_digits(), [("onnx", "none"), ("tflite", "none"),
                                              ("tflite", "int8")],
                     ConvertOptions(name="kd", version="1.0.0", latency_runs=5), output=out,
                     calibration=calib, eval_data=evald, sign_key=signer.key)
    model = load_model(out, signer.trust)
    choice = model.variant
    assert choice is not None
    runtimes = {c.variant: c.runtime for c in choice.candidates}
    assert runtimes["tflite-none"] == runtimes["tflite-int8"] == "litert"
    assert runtimes["onnx-none"] == "onnxruntime"
    assert all(c.eligible for c in choice.candidates)
    fastest = min(choice.candidates, key=lambda c: c.p50_ms or 0.0)
    assert (choice.id, choice.runtime) == (fastest.variant, fastest.runtime)
    assert model.runtime == choice.runtime and model.ref.format == choice.id.split("-")[0]
    x = next(iter(evald.inputs.values()))[:64]
    served = next(iter(model.session.run({model.manifest.inputs[0].name: x}).values()))
    assert evald.labels is not None
    assert (served.argmax(1) == evald.labels[:64]).mean() >= 0.8


def test_convert_variants_cli(source: tuple[Path, Dataset], signer: Signer,
                              tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgekit.data import save_npz
    from edgekit.host.cli import cli

    path, evald = source
    eval_file = tmp_path / "eval.npz"
    save_npz(eval_file, evald.inputs, evald.labels)
    key = tmp_path / "release.key"
    key.write_bytes(signer.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    out = tmp_path / "cli.edgepkg"
    common = [str(path), "--eval", str(eval_file), "--name", "digits", "--version", "1.0.0",
              "-o", str(out)]
    runner = CliRunner()
    done = runner.invoke(cli, ["convert", *common, "--variants", "onnx:none, onnx:dynamic",
                               "--max-accuracy-drop", "2", "--sign-key", str(key), "--json"])
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    assert [v["id"] for v in doc["variants"]] == ["onnx-none", "onnx-dynamic"]
    assert doc["max_accuracy_drop"] == pytest.approx(0.02) and doc["signed"]
    assert load_model(out, signer.trust).variant is not None
    shown = runner.invoke(cli, ["inspect", str(out)])
    assert "variant onnx-dynamic: model-onnx-dynamic.onnx" in shown.output
    assert "accuracy budget of 2 points" in shown.output
    written = out.read_bytes()

    for variants, message in (("onnx:none", "needs 2 to 8 entries"),
                              ("onnx:none,onnx:int9", "'onnx:int9' is not TARGET:QUANTIZE"),
                              ("onnx:none,onnx:none", "names onnx:none twice")):
        bad = runner.invoke(cli, ["convert", *common, "--variants", variants])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    bad = runner.invoke(cli, ["convert", *common, "--variants", "onnx:none,tflite:none"])
    assert bad.exit_code != 0 and "variant tflite-none: onnx models cannot be converted" \
        in bad.output and "Traceback" not in bad.output
    assert out.read_bytes() == written  # a failed conversion leaves the package as it was


def test_a_cuda_provider_is_one_more_candidate(package: Path, signer: Signer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no GPU, so onnxruntime is made to *report* the CUDA provider (the one
    thing mocked); loading with it then fails for real, and the candidate is dropped with
    that reason while the CPU candidates serve."""
    from edgekit.runtimes.onnxrt import OnnxRuntimeBackend

    real_info = OnnxRuntimeBackend.info.__func__  # type: ignore[attr-defined]

    def with_cuda(cls: type[OnnxRuntimeBackend]) -> Any:
        info = real_info(cls)
        info.providers = ["CUDAExecutionProvider", *info.providers]
        return info

    monkeypatch.setattr(OnnxRuntimeBackend, "info", classmethod(with_cuda))
    choice = load_model(package, signer.trust).variant
    assert choice is not None and choice.provider == "CPUExecutionProvider"
    cuda = [c for c in choice.candidates if c.provider == "CUDAExecutionProvider"]
    assert {c.variant for c in cuda} == {f"onnx-{q}" for _, q in VARIANTS}
    assert all(not c.eligible and c.p50_ms is None and "does not run here" in c.reason
               for c in cuda)


def test_a_variant_without_golden_samples_is_not_served(package: Path, signer: Signer,
                                                        tmp_path: Path) -> None:
    """Another variant's golden samples must not stand in for its own."""
    def no_golden(doc: dict[str, Any]) -> None:
        variant_doc(doc, "onnx-none")["golden"].pop("file")

    choice = load_model(rewrite(package, tmp_path / "g.edgepkg", signer.key, no_golden),
                        signer.trust).variant
    assert choice is not None and choice.id != "onnx-none"
    none = next(c for c in choice.candidates if c.variant == "onnx-none")
    assert not none.eligible and "no golden samples" in none.reason
