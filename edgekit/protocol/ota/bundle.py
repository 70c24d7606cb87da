"""The site bundle: a package and the signed intent that names it, in one file, for devices
that no broker reaches (air-gapped sites).

Layout (``edgekit bundle`` writes it, ``edgekit-agent install`` reads it)::

    b"EDGEKIT-BUNDLE/1\\n"                      magic, 17 bytes
    4 bytes big-endian N                        N at most 4096
    N bytes of header JSON                      {"schema": "edgekit.bundle/1",
                                                 "intent_bytes": I, "package_bytes": P}
    I bytes                                     the signed desired document
                                                (edgekit.signed/1 around edgekit.desired/2)
    P bytes                                     the .edgepkg file

The header is not signed: it only says where the two parts end, and the reader checks that
the parts fill the file exactly and stay under their caps. What the device trusts is the
intent, checked exactly like one that came over MQTT (signature, fleet and device, expiry,
replay, version floor), and the intent pins the package's sha256 and size. Nothing in the
bundle names a path: the reader returns byte ranges, and the device chooses where they go.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, ClassVar

import msgspec

from edgekit.errors import ProtocolError
from edgekit.protocol.codec import Document, decode, encode
from edgekit.protocol.ota.desired import MAX_ARTIFACT_BYTES
from edgekit.protocol.signed import SIGNED_MAX_BYTES

__all__ = ["BUNDLE_MAGIC", "BundleHeader", "BundleParts", "read_bundle", "write_bundle"]

BUNDLE_MAGIC = b"EDGEKIT-BUNDLE/1\n"
_LENGTH = struct.Struct(">I")
_MAX_HEADER = 4096
_COPY_BLOCK = 1024 * 1024


class BundleHeader(Document, tag="edgekit.bundle/1"):
    """Where the parts of a bundle end."""

    max_bytes: ClassVar[int] = _MAX_HEADER
    intent_bytes: Annotated[int, msgspec.Meta(ge=0)]
    package_bytes: Annotated[int, msgspec.Meta(ge=0)]


@dataclass(frozen=True)
class BundleParts:
    """A bundle whose layout checked out: the intent's bytes, and where the package lies."""

    path: Path
    intent: bytes
    package_offset: int
    package_size: int

    def package_blocks(self, block: int = _COPY_BLOCK) -> Iterator[bytes]:
        """The package's bytes, read in blocks (never more than ``package_size``).

        Raises:
            ProtocolError: the file got shorter since it was read.
        """
        with open(self.path, "rb") as handle:
            handle.seek(self.package_offset)
            left = self.package_size
            while left:
                data = handle.read(min(block, left))
                if not data:
                    raise ProtocolError(f"{self.path}: the bundle ends inside its package")
                left -= len(data)
                yield data


def write_bundle(out: IO[bytes], intent: bytes, package: Path) -> int:
    """Write a bundle of the signed ``intent`` and the ``package`` file to ``out``; return
    the bytes written.

    Raises:
        ProtocolError: the intent or the package is over its cap.
    """
    size = package.stat().st_size
    _check_sizes(len(intent), size)
    header = encode(BundleHeader(intent_bytes=len(intent), package_bytes=size))
    out.write(BUNDLE_MAGIC + _LENGTH.pack(len(header)) + header + intent)
    written = len(BUNDLE_MAGIC) + _LENGTH.size + len(header) + len(intent)
    with open(package, "rb") as src:
        while block := src.read(_COPY_BLOCK):
            out.write(block)
            written += len(block)
    return written


def read_bundle(path: str | os.PathLike[str], *, max_package_bytes: int = MAX_ARTIFACT_BYTES
                ) -> BundleParts:
    """Check a bundle's layout and read its intent (the package stays on disk).

    Raises:
        ProtocolError: not a bundle (magic), a header that is too large or does not parse,
            parts over their caps (``max_package_bytes`` for the package), or parts that do
            not fill the file exactly.
    """
    file = Path(path)
    with open(file, "rb") as handle:
        total = os.fstat(handle.fileno()).st_size
        head = handle.read(len(BUNDLE_MAGIC) + _LENGTH.size)
        if not head.startswith(BUNDLE_MAGIC):
            raise ProtocolError(f"{file} is not an edgekit bundle (no {BUNDLE_MAGIC[:-1]!r}"
                                " magic)", hint="make one with `edgekit bundle PKG --fleet F`")
        if len(head) < len(BUNDLE_MAGIC) + _LENGTH.size:
            raise ProtocolError(f"{file}: the bundle ends inside its header")
        (header_len,) = _LENGTH.unpack(head[len(BUNDLE_MAGIC):])
        if header_len > _MAX_HEADER:
            raise ProtocolError(f"{file}: bundle header of {header_len} bytes, over the"
                                f" {_MAX_HEADER}-byte limit")
        header = decode(handle.read(header_len), BundleHeader)
        _check_sizes(header.intent_bytes, header.package_bytes, max_package_bytes)
        offset = len(head) + header_len
        expected = offset + header.intent_bytes + header.package_bytes
        if expected != total:
            raise ProtocolError(f"{file} is {total} bytes, its header says {expected}:"
                                " truncated or altered", hint="copy the bundle again")
        intent = handle.read(header.intent_bytes)
    return BundleParts(file, intent, offset + header.intent_bytes, header.package_bytes)


def _check_sizes(intent: int, package: int, max_package: int = MAX_ARTIFACT_BYTES) -> None:
    if not 0 < intent <= SIGNED_MAX_BYTES:
        raise ProtocolError(f"bundle intent of {intent} bytes is outside 1..{SIGNED_MAX_BYTES}")
    if not 0 < package <= max_package:
        raise ProtocolError(f"bundle package of {package} bytes is outside 1..{max_package}",
                            hint="raise ota.max_artifact_bytes on the device if it is meant")
