"""Delta updates: bytes a device moves over the broker for a new model version, with our
model-aware delta against a generic binary delta and the full package, in one run.

Pairs (base -> target), all real converted packages:

- digits, last layer retrained: the demo's digits CNN, then only its last layer trained on
  drifted images (benchmarks/_digits_retrain.py);
- digits, full retrain: the same CNN trained again from another seed;
- MiniLM classifier, head retrained (not in ``--quick``): the bundled MiniLM encoder with a
  linear head over 4 classes, then only the head trained again.

For each pair: the full package, ``edgekit.host.ota.delta`` (our delta), and zstd's
``--patch-from`` (level 19, long-distance matching; the zstd command, else python-zstandard), as
bytes of the file and as bytes over a real mosquitto (the chunk replies and the requests a
device's download moves, frame headers included). "edgekit deploy" is what a device moves
after ``edgekit deploy``: the delta when it is offered (at most 90 % of the package), else the
package. Our delta is also applied to the base and checked against the target's sha256.

    .venv/bin/python benchmarks/delta_bench.py [--json out.json]
    .venv/bin/python benchmarks/delta_bench.py --quick   # digits pairs only
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import zstandard
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _digits_retrain import digits_packages  # noqa: E402
from ota_bench import start_mosquitto  # noqa: E402

from device_agent.ota.download import DownloadSettings, MqttDownload, PartialFile  # noqa: E402
from edgekit.delta import apply_delta  # noqa: E402
from edgekit.host.mqtt_client import HostClient  # noqa: E402
from edgekit.host.ota.delta import OFFER_RATIO, DeltaFile, build_delta  # noqa: E402
from edgekit.host.ota.server import ArtifactServer  # noqa: E402
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore  # noqa: E402
from edgekit.protocol.ota.topics import artifact_request_topic, ota_reply_topic  # noqa: E402

FLEET = "bench"
CHUNK = 256 * 1024


def patch_from(base: Path, target: Path, work: Path) -> tuple[bytes, str]:
    """zstd --patch-from at level 19 with long-distance matching: the zstd command when it is
    installed, else python-zstandard with the base as a raw-content dictionary (the same
    method). Returns the patch and which of the two made it."""
    window = max(27, (base.stat().st_size + target.stat().st_size).bit_length())
    binary = shutil.which("zstd")
    if binary is not None:
        out = work / "patch.zst"
        subprocess.run([binary, "-q", "-f", "-19", f"--long={window}", f"--patch-from={base}",
                        str(target), "-o", str(out)], check=True)
        return out.read_bytes(), "zstd CLI"
    params = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=window, enable_ldm=True, source_size=target.stat().st_size)
    dictionary = zstandard.ZstdCompressionDict(base.read_bytes(),
                                               dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(
        target.read_bytes()), "python-zstandard"


def unpatch(base: Path, patch: bytes, size: int, work: Path) -> bytes:
    """The target back from a --patch-from patch (to check the baseline is a real delta)."""
    binary = shutil.which("zstd")
    window = max(27, (base.stat().st_size + size).bit_length())
    if binary is not None:
        (work / "patch.zst").write_bytes(patch)
        subprocess.run([binary, "-q", "-f", "-d", f"--long={window}", f"--patch-from={base}",
                        str(work / "patch.zst"), "-o", str(work / "unpatched")], check=True)
        return (work / "unpatched").read_bytes()
    dictionary = zstandard.ZstdCompressionDict(base.read_bytes(),
                                               dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << window
                                      ).decompress(patch, max_output_size=size)


class BrokerMeter:
    """A device-side MQTT client that downloads artifacts in chunks through the broker and
    counts every payload byte it sends and receives."""

    def __init__(self, port: int) -> None:
        self.sent = self.received = 0
        self.download: MqttDownload | None = None
        self.reply_to = ota_reply_topic(FLEET, "meter")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="delta-meter")
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.reply_to, qos=1)
        ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += len(msg.payload)
        if self.download is not None:
            self.download.deliver(bytes(msg.payload))

    def fetch(self, info: ArtifactInfo, folder: Path) -> int:
        """Download ``info`` over the broker; the bytes moved (both directions)."""
        before = self.sent + self.received

        def publish(topic: str, payload: bytes) -> bool:
            self.sent += len(payload)
            return self.client.publish(topic, payload, qos=1).rc == 0

        self.download = MqttDownload(publish, lambda: True,
                                     artifact_request_topic(FLEET, info.sha256), self.reply_to,
                                     info.sha256, info.size,
                                     DownloadSettings(chunk_bytes=CHUNK, stall_timeout_s=60.0),
                                     threading.Event())
        partial = PartialFile(folder / f"{info.sha256}.part", info.size)
        try:
            self.download.run(partial, 0, lambda _offset: None)
        finally:
            partial.close()
        data = (folder / f"{info.sha256}.part").read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256, "download corrupted"
        self.download = None
        return self.sent + self.received - before

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def measure(name: str, base: Path, target: Path, server: ArtifactServer, meter: BrokerMeter,
            work: Path) -> dict[str, Any]:
    base_raw, target_raw = base.read_bytes(), target.read_bytes()
    t0 = time.perf_counter()
    ours = build_delta(base, target)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rebuilt = io.BytesIO()
    with tempfile.TemporaryDirectory() as scratch:
        apply_delta(io.BytesIO(ours), base, rebuilt.write, Path(scratch),
                    target_sha256=hashlib.sha256(target_raw).hexdigest(),
                    target_size=len(target_raw))
    apply_s = time.perf_counter() - t0
    assert rebuilt.getvalue() == target_raw, "our delta did not rebuild the target"
    generic, tool = patch_from(base, target, work)
    assert unpatch(base, generic, len(target_raw), work) == target_raw
    target_info = server.serve(target)
    row: dict[str, Any] = {"pair": name, "build_s": build_s, "apply_s": apply_s, "tool": tool,
                           "full package": {"file": len(target_raw),
                                            "broker": meter.fetch(target_info, work)}}
    for label, data in (("edgekit delta", ours), ("zstd --patch-from", generic)):
        path = work / f"{name.replace(' ', '-')}-{label.split()[-1]}.bin"
        path.write_bytes(data)
        blob = DeltaFile(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                         base_sha256=hashlib.sha256(base_raw).hexdigest(),
                         target_sha256=target_info.sha256, target_size=len(target_raw))
        info = server.serve_delta(blob, target_info)
        row[label] = {"file": len(data), "broker": meter.fetch(info, work)}
    return row


def minilm_packages(folder: Path) -> dict[str, Path]:
    """MiniLM + a linear head over 4 classes (labels: the sentence's subject), then the head
    alone trained again on other sentences."""
    import torch
    from _minilm import load_encoder, sentences, tokenize

    from converters import ConvertOptions, convert
    from edgekit.data import Dataset

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = load_encoder()
            self.head = torch.nn.Linear(384, 4)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(input_ids, attention_mask))

    model = Classifier().eval()

    def train_head(seed: int) -> None:
        texts = sentences(64, seed=seed)
        x = tokenize(texts)
        with torch.no_grad():
            emb = model.encoder(torch.from_numpy(x["input_ids"]),
                                torch.from_numpy(x["attention_mask"]))
        y = torch.tensor([hash(t.split()[1]) % 4 for t in texts])
        opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
        for _ in range(50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model.head(emb), y).backward()
            opt.step()

    calib = Dataset(tokenize(sentences(32, seed=1)), None, "MiniLM calibration")
    evald = Dataset(tokenize(sentences(16, seed=2)), None, "MiniLM evaluation")
    out = {}
    for key, seed, version in (("base", 3, "1.0.0"), ("head", 4, "1.1.0")):
        train_head(seed)
        path = folder / f"minilm-{key}.edgepkg"
        convert(model, ConvertOptions(name="minilm-cls", version=version, latency_runs=3,
                                      task="classification"),
                output=path, calibration=calib, eval_data=evald)
        out[key] = path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits pairs only")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="delta-bench-") as tmp:
        work = Path(tmp)
        digits = digits_packages(work)
        pairs = [("digits last layer", digits["base"], digits["last_layer"]),
                 ("digits full retrain", digits["base"], digits["full"])]
        if not args.quick:
            minilm = minilm_packages(work)
            pairs.append(("minilm head", minilm["base"], minilm["head"]))
        broker, port = start_mosquitto(work)
        client = HostClient(f"mqtt://127.0.0.1:{port}").connect()
        server = ArtifactServer(client, ArtifactStore(), fleets=[FLEET], share_group=None)
        meter = BrokerMeter(port)
        try:
            rows = [measure(name, base, target, server, meter, work)
                    for name, base, target in pairs]
        finally:
            meter.close()
            client.close()
            broker.terminate()
            broker.wait(10)
    print_table(rows)
    print("ours rebuilt every target exactly (sha256 checked), and so did the patch"
          f" ({rows[0]['tool']}); bytes over the broker count chunk replies and requests,"
          " headers included")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def print_table(rows: list[dict[str, Any]]) -> None:
    print("## delta updates: bytes over the broker (and file bytes), ratio to the full package")
    print(f"{'pair':<22}{'full package':>16}{'edgekit delta':>24}{'zstd --patch-from':>24}"
          f"{'edgekit deploy':>24}{'build s':>9}{'apply s':>9}")
    for row in rows:
        full = row["full package"]["broker"]
        cells = [f"{full:>16,}"]
        # What a device moves after `edgekit deploy`: the delta when it is offered (at most
        # OFFER_RATIO of the package), else the package.
        offered = row["edgekit delta"]["file"] <= OFFER_RATIO * row["full package"]["file"]
        row["edgekit deploy"] = {"broker": row["edgekit delta"]["broker"] if offered else full}
        for label in ("edgekit delta", "zstd --patch-from", "edgekit deploy"):
            moved = row[label]["broker"]
            cells.append(f"{moved:>13,} ({100 * moved / full:6.2f}%)")
        print(f"{row['pair']:<22}{''.join(cells)}{row['build_s']:>9.2f}{row['apply_s']:>9.2f}")
    print("file bytes: " + "; ".join(
        f"{r['pair']}: package {r['full package']['file']:,}, delta {r['edgekit delta']['file']:,},"
        f" patch-from {r['zstd --patch-from']['file']:,}" for r in rows))


if __name__ == "__main__":
    main()
