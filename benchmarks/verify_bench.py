"""What a device spends checking a downloaded package before it stages it.

One signed package (a model member of random weights, so deflate cannot shrink it, and
golden samples), then, in this process, CPU seconds per call (median of ``--reps``):

- ``before``: the steps as the agent ran them until 2026-12-03, built from the same library
  calls: the file hashed for the document's sha256, every member hashed as a stream
  (``verify_package``), the model read and hashed again for the runtime, the file hashed
  again for the loaded model and again when the model folder takes it.
- ``after a download``: ``verify_package_file`` with the digest the download computed, then
  ``ModelStore.add`` with the model's digest (what an update does now).
- ``after a restart``: the same with no digest at hand (the file is hashed once).

Every row ends with a session of the model in the runtime (onnxruntime), which is the same in
all three. The ratio column is against ``before``, in the same run.

    .venv/bin/python benchmarks/verify_bench.py [--size-mb 20] [--reps 6]
    .venv/bin/python benchmarks/verify_bench.py --quick   # 2 MB, 2 repetitions
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ota_bench import build_package  # noqa: E402

from device_agent._model import TrustPolicy  # noqa: E402
from device_agent._store import ModelStore  # noqa: E402
from device_agent.ota.checks import verify_package_file  # noqa: E402
from edgekit.artifact import open_package, sha256_file, verify_package  # noqa: E402
from edgekit.host.ota.deploy import desired_for_package  # noqa: E402
from edgekit.host.ota.store import ArtifactStore  # noqa: E402
from edgekit.runtimes import RuntimeOptions, load_session  # noqa: E402
from edgekit.signing import generate_keypair, load_private_key, load_public_key  # noqa: E402


def _cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="2 MB, 2 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.reps = 2.0, 2
    work = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    try:
        keys = generate_keypair(work / "signing")
        pkg = build_package(work / "bench.edgepkg", "2.0.0", args.size_mb, 2,
                            load_private_key(keys.private_path))
        trust = TrustPolicy((load_public_key(keys.public_path),))
        doc = desired_for_package(ArtifactStore().add(pkg), "bench")
        sha = hashlib.sha256(pkg.read_bytes()).hexdigest()
        options = RuntimeOptions(threads=1)
        folders = iter(range(10**6))

        def staged() -> tuple[Path, ModelStore]:
            folder = work / f"models-{next(folders)}"
            store = ModelStore(folder)
            target = store.packages_dir / f"{sha}.staged"
            shutil.copy(pkg, target)
            return target, store

        def before() -> None:
            target, store = staged()
            assert sha256_file(target) == sha
            verify_package(target, list(trust.trusted_keys))
            opened = open_package(target)
            load_session(opened.manifest, opened.model_bytes(), options)
            sha256_file(target)  # the loaded model's digest
            store.add(target)  # hashes the file once more

        def after_download() -> None:
            target, store = staged()
            model = verify_package_file(target, doc, trust, options, 8, checked_sha256=sha)
            store.add(model.path, sha256=model.sha256)

        def after_restart() -> None:
            target, store = staged()
            model = verify_package_file(target, doc, trust, options, 8)
            store.add(model.path, sha256=model.sha256)

        rows = {"before": before, "after a download": after_download,
                "after a restart": after_restart}
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.reps):  # alternated, so drift hits every row alike
            for name, fn in rows.items():
                times[name].append(_cpu(fn))
        base = statistics.median(times["before"])
        print(f"package {pkg.stat().st_size / 1e6:.2f} MB, {args.reps} repetitions,"
              " CPU ms per call (median)")
        print(f"{'steps':<20} {'CPU ms':>8} {'/ before':>9}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<20} {median * 1000:8.1f} {median / base:9.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
