"""The agent's LiteRT backend: with ai_edge_litert here, and with ``tflite-runtime`` 2.14 and
numpy<2 in a separate small venv (what a Raspberry Pi OS user without ai-edge-litert has).

tflite-runtime 2.14 cannot load a model under numpy 2, so the venv pins numpy<2. It is made
once in a cache folder (``EDGEKIT_TEST_CACHE``, default ~/.cache/edgekit-tests) and reused;
this checkout's sources reach it through PYTHONPATH, so a venv made by another checkout
still runs this one's code.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _agent_support import Models
from _digits import LABELS, ridge_weights

from device_agent import Agent, load_config
from edgekit.artifact import golden_to_npz, write_package
from edgekit.manifest import Manifest, TensorSpec

REPO = Path(__file__).resolve().parents[2]
# The agent's own requirements (pyproject's ``agent`` extra) with numpy 1 and tflite-runtime.
VENV_REQUIREMENTS = ["numpy<2", "tflite-runtime==2.14.0", "cryptography", "click", "psutil",
                     "paho-mqtt>=2", "msgspec>=0.18", "zstandard>=0.22"]


@pytest.fixture(scope="module")
def tflite_package(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits classifier as .tflite: a tf.function saved as SavedModel, then converted with
    TFLiteConverter.from_saved_model (as the converter's Keras path does)."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    root = tmp_path_factory.mktemp("tflite")
    x, y = models.data
    w, b = ridge_weights(x[:1200], y[:1200], 1.0)
    module = tf.Module()
    module.w = tf.Variable(w)
    module.b = tf.Variable(b)

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="x")])
    def serve(inp: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probs": tf.nn.softmax(tf.matmul(inp, module.w) + module.b, axis=1)}

    module.serve = serve
    tf.saved_model.save(module, str(root / "saved"), signatures={"serving_default": serve})
    tflite = tf.lite.TFLiteConverter.from_saved_model(str(root / "saved")).convert()
    interp = Interpreter(model_content=tflite)
    runner = interp.get_signature_runner("serving_default")
    golden_x = x[1200:1208]
    golden_y = runner(x=golden_x)["probs"]
    manifest = Manifest(
        name="digits-tflite", version="1.0.0",
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        task="classification", source={"framework": "tensorflow"},
        target={"format": "tflite", "model_file": "model.tflite", "runtime": "litert"},
        inputs=[TensorSpec("x", "float32", ["batch", 64])],
        outputs=[TensorSpec("probs", "float32", ["batch", 10])],
        recipe={"quantize": "none"}, tools={"tensorflow": tf.__version__},
        golden={"count": 8, "atol": 1e-5, "rtol": 1e-4, "file": "golden.npz"}, labels=LABELS,
    )
    path = root / "digits.edgepkg"
    write_package(path, manifest, {"model.tflite": tflite,
                                   "golden.npz": golden_to_npz({"x": golden_x},
                                                               {"probs": golden_y})})
    np.save(root / "expected.npy", runner(x=x[:20])["probs"])
    np.save(root / "inputs.npy", x[:20])
    return path


def test_litert_backend_with_ai_edge_litert(tflite_package: Path, tmp_path: Path) -> None:
    agent = Agent(load_config(env={}, overrides={
        "model.dir": str(tmp_path / "m"), "model.package": str(tflite_package),
        "model.allow_unsigned": True, "telemetry.interval_s": 0.0}))
    try:
        assert agent.model is not None and agent.model.runtime == "litert"
        x = np.load(tflite_package.parent / "inputs.npy")
        expected = np.load(tflite_package.parent / "expected.npy")
        np.testing.assert_allclose(agent.predict({"x": x}).outputs["probs"], expected, atol=1e-6)
        np.testing.assert_allclose(agent.predict({"x": x[:1]}).outputs["probs"], expected[:1],
                                   atol=1e-6)  # resized back to one row
    finally:
        agent.stop()


def _venv(cache: Path) -> Path:
    # Named by its requirements, so checkouts that list different ones keep their own.
    tag = hashlib.sha256(json.dumps(VENV_REQUIREMENTS).encode()).hexdigest()[:12]
    venv = cache / f"tflite-runtime-venv-{tag}"
    marker = venv / "edgekit-ready.json"
    python = venv / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "tflite-runtime-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs never build it at once
        if marker.exists() and json.loads(marker.read_text()) == VENV_REQUIREMENTS \
                and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        result = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                                 "--only-binary=:all:", *VENV_REQUIREMENTS],
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"could not build the tflite-runtime venv:\n{result.stderr}"
        marker.write_text(json.dumps(VENV_REQUIREMENTS))
    return python


_SCRIPT = r"""
import json, sys
import numpy as np
from edgekit.runtimes import availability
from device_agent import Agent, load_config

info = {i.key: i for i in availability()}
agent = Agent(load_config(env={}, overrides={
    "model.dir": sys.argv[2], "model.package": sys.argv[1], "model.allow_unsigned": True,
    "telemetry.interval_s": 0.0}))
x = np.load(sys.argv[3])
prediction = agent.predict({"x": x})
agent.stop()
print(json.dumps({
    "numpy": np.__version__,
    "litert": [info["litert"].available, info["litert"].detail],
    "onnxruntime": info["onnxruntime"].available,
    "runtime": prediction.model.runtime,
    "probs": prediction.outputs["probs"].tolist(),
}))
"""


def test_litert_backend_on_tflite_runtime_with_numpy_1(tflite_package: Path,
                                                       tmp_path: Path) -> None:
    cache = Path(os.environ.get("EDGEKIT_TEST_CACHE", Path.home() / ".cache" / "edgekit-tests"))
    python = _venv(cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "EDGEKIT_"))}
    env["PYTHONPATH"] = str(REPO)  # this checkout's edgekit and device_agent
    result = subprocess.run(
        [str(python), "-c", _SCRIPT, str(tflite_package), str(tmp_path / "m"),
         str(tflite_package.parent / "inputs.npy")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["numpy"].startswith("1.")
    assert out["litert"] == [True, "interpreter from tflite_runtime"]
    assert out["onnxruntime"] is False  # not installed there: dropped with a note
    assert out["runtime"] == "litert"
    expected = np.load(tflite_package.parent / "expected.npy")
    np.testing.assert_allclose(np.array(out["probs"]), expected, atol=1e-5)
