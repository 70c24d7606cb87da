"""An agent makes the decoders of what an update reads when it starts, so that the first
deploy does not make every device of a fleet build them at the same moment
(``device_agent.ota.updater.prepare_decoders``, called by ``Updater.start``).

Each check runs in a fresh interpreter: the decoder cache of this test process is filled
by whatever ran before."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.protocol import ota
from edgekit.protocol.ota.desired import seal_desired

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys
from pathlib import Path
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from edgekit.protocol import codec
from edgekit.protocol.ota import decode_chunk, parse_desired
from edgekit.protocol.signed import open_sealed
from device_agent.ota.updater import prepare_decoders

folder = Path(sys.argv[1])
if sys.argv[2] == "prepare":
    prepare_decoders()
made = len(codec._decoders)
key = load_pem_public_key((folder / "key.pem").read_bytes())
for name in ("desired", "shadow"):
    parse_desired(open_sealed((folder / name).read_bytes(), [key]).payload)
decode_chunk((folder / "chunk").read_bytes())
print(made, len(codec._decoders) - made)
"""


def _run(folder: Path, mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    made, built_later = out.stdout.split()
    return int(made), int(built_later)


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("payloads")
    key = Ed25519PrivateKey.generate()
    (folder / "key.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    data = b"model bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    common = dict(fleet="f", name="m", version="2.0.0", sha256=sha, size=len(data),
                  request_topic=ota.artifact_request_topic("f", sha))
    (folder / "desired").write_bytes(seal_desired(
        ota.make_desired(deployment="d1", **common), key))
    (folder / "shadow").write_bytes(seal_desired(
        ota.make_desired(deployment="d2", shadow=ota.make_shadow(requests=10), **common), key))
    request = ota.make_request("r1", sha, 0, len(data), "edgekit/v1/f/dev/reply/ota")
    (folder / "chunk").write_bytes(ota.encode_chunk(request, data, len(data)))
    return folder


def test_a_started_agent_builds_no_decoder_for_its_first_update(payloads: Path) -> None:
    made, built_later = _run(payloads, "prepare")
    assert made >= 3
    assert built_later == 0


def test_without_them_the_first_update_builds_its_decoders(payloads: Path) -> None:
    # The control: the same documents do build decoders in an agent that did not prepare.
    _, built_later = _run(payloads, "none")
    assert built_later >= 3
