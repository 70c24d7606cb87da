"""Site bundles for air-gapped devices: a package and the signed intent that names it.

``edgekit bundle`` builds the same desired document ``edgekit deploy`` would publish (signed
by the operator key, bound to the fleet and devices, with an expiry and an issue time), so a
device that installs the bundle applies exactly the checks it applies to a document from the
broker. The document also names the fleet's MQTT artifact topic, so it stays a valid
document should the site ever be connected. The layout is :mod:`edgekit.protocol.ota.bundle`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.fsutil import atomic_write
from edgekit.host.ota.deploy import desired_for_package
from edgekit.host.ota.store import ArtifactStore
from edgekit.protocol.ota.bundle import write_bundle
from edgekit.protocol.ota.desired import DesiredDocument, Probation, seal_desired

__all__ = ["BundleResult", "make_bundle"]


@dataclass(frozen=True)
class BundleResult:
    path: Path
    size: int
    document: DesiredDocument


def make_bundle(package: str | os.PathLike[str], fleet: str, key: Ed25519PrivateKey,
                output: str | os.PathLike[str], *, devices: list[str] | None = None,
                probation: Probation | None = None, ttl_s: float | None = None,
                allow_downgrade: bool = False, allow_rename: bool = False,
                allow_breaking: bool = False) -> BundleResult:
    """Write the bundle of ``package`` for ``fleet`` (or ``devices`` of it) to ``output``,
    atomically.

    Raises:
        ArtifactError: ``package`` is not an edgekit package.
        ProtocolError: an argument makes the document invalid (an expiry over 400 days).
        OutputWriteError: ``output`` cannot be written.
    """
    info = ArtifactStore().add(package)
    doc = desired_for_package(info, fleet, devices=devices, probation=probation, ttl_s=ttl_s,
                              allow_downgrade=allow_downgrade, allow_rename=allow_rename,
                              allow_breaking=allow_breaking)
    with atomic_write(output) as handle:
        size = write_bundle(handle, seal_desired(doc, key), info.path)
    return BundleResult(Path(output), size, doc)
