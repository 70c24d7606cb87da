"""The delta file: how a device that holds package A rebuilds package B from A and a few
new bytes.

A delta travels like a package (chunks over MQTT, HTTP Range), named by its own sha256, and
is one binary file::

    +-----------+----------------+----------------------+--------------------------------+
    | "EKDELTA1"| 4 bytes, big   | header: UTF-8 JSON,  | literals: one zstd frame, the  |
    |           | endian: header | DeltaHeader          | new bytes the ops insert, in   |
    |           | length         |                      | the order the ops take them    |
    +-----------+----------------+----------------------+--------------------------------+

The header names the base (sha256, size) and the target (sha256, size), the base's zip
members the ops may copy from (decompressed), and the target as a list of segments written
one after the other. Each segment's bytes come from its ops: ``(source, offset, length)``
copies ``length`` bytes at ``offset`` of a source (0: the base file as it is, ``i > 0``:
decompressed base member ``members[i - 1]``), ``(-1, 0, length)`` takes the next ``length``
literal bytes. A segment with ``deflate`` set is raw-deflated at that zlib level before it is
written (a zip member; the builder checked that this gives the package's exact bytes).

The header is untrusted input like every byte from the network: :func:`decode_header`
checks its size before parsing, and :func:`check_header` bounds every op against its source
and every segment against the target, caps the decompressed literal and member bytes, and
allows member names only from a small alphabet (they name zip members, never files). The
rebuilt file's sha256 must equal the signed desired document's before anything else uses it.
"""

from __future__ import annotations

import re
import struct
from typing import Annotated, BinaryIO, ClassVar

import msgspec

from edgekit.errors import ProtocolError
from edgekit.protocol.codec import Document, decode, encode
from edgekit.protocol.ota.desired import MAX_ARTIFACT_BYTES

__all__ = [
    "DELTA_MAGIC",
    "LITERAL",
    "MAX_DELTA_HEADER_BYTES",
    "MAX_MEMBER_BYTES",
    "MAX_OPS",
    "BaseMember",
    "DeltaHeader",
    "DeltaSegment",
    "check_header",
    "decode_header",
    "encode_header",
    "read_header",
]

DELTA_MAGIC = b"EKDELTA1"
LITERAL = -1  # an op's source: the next bytes of the literal stream
MAX_DELTA_HEADER_BYTES = 16 * 1024 * 1024
MAX_MEMBER_BYTES = 2 * 1024**3  # as the package reader's limit on one member
MAX_OPS = 1_000_000
MAX_MEMBERS = 64
_LEN = struct.Struct(">I")
_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = r"^[0-9a-f]{64}$"

Sha256 = Annotated[str, msgspec.Meta(pattern=_SHA256)]
Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_ARTIFACT_BYTES)]


class BaseMember(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A member of the base package that ops copy from, decompressed."""

    name: str
    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_MEMBER_BYTES)]


class DeltaSegment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Bytes of the target, in order; ``size`` is what the ops produce (before deflate)."""

    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_MEMBER_BYTES)]
    ops: list[tuple[int, int, int]]
    deflate: Annotated[int, msgspec.Meta(ge=-1, le=9)] | None = None


class DeltaHeader(Document, tag="edgekit.delta/1"):
    """What a delta rebuilds, from what, and how (see the module docstring)."""

    max_bytes: ClassVar[int] = MAX_DELTA_HEADER_BYTES
    base_sha256: Sha256
    base_size: Size
    target_sha256: Sha256
    target_size: Size
    members: list[BaseMember]
    segments: list[DeltaSegment]
    literal_bytes: Size  # decompressed size of the literal stream


def encode_header(header: DeltaHeader) -> bytes:
    """The magic, the header's length and its JSON: what precedes the literal stream."""
    body = encode(header)
    return DELTA_MAGIC + _LEN.pack(len(body)) + body


def decode_header(prefix: bytes) -> tuple[DeltaHeader, int]:
    """Parse and check the header at the start of a delta file; returns it and the offset of
    the literal stream.

    Raises:
        ProtocolError: no magic, a header over :data:`MAX_DELTA_HEADER_BYTES` or truncated,
            not of the schema, or failing :func:`check_header`.
    """
    if len(prefix) < len(DELTA_MAGIC) + _LEN.size or not prefix.startswith(DELTA_MAGIC):
        raise ProtocolError("not a delta file (its first bytes are not EKDELTA1)")
    (length,) = _LEN.unpack_from(prefix, len(DELTA_MAGIC))
    start = len(DELTA_MAGIC) + _LEN.size
    if length > MAX_DELTA_HEADER_BYTES:
        raise ProtocolError(f"delta header of {length} bytes is over the"
                            f" {MAX_DELTA_HEADER_BYTES}-byte limit")
    if start + length > len(prefix):
        raise ProtocolError(f"delta header of {length} bytes is truncated")
    header = decode(prefix[start:start + length], DeltaHeader)
    check_header(header)
    return header, start + length


def read_header(handle: BinaryIO) -> tuple[DeltaHeader, int]:
    """:func:`decode_header` on an open binary file, reading no more than the header.

    Raises:
        ProtocolError: as :func:`decode_header`.
    """
    head = handle.read(len(DELTA_MAGIC) + _LEN.size)
    if len(head) < len(DELTA_MAGIC) + _LEN.size or not head.startswith(DELTA_MAGIC):
        raise ProtocolError("not a delta file (its first bytes are not EKDELTA1)")
    (length,) = _LEN.unpack_from(head, len(DELTA_MAGIC))
    if length > MAX_DELTA_HEADER_BYTES:
        raise ProtocolError(f"delta header of {length} bytes is over the"
                            f" {MAX_DELTA_HEADER_BYTES}-byte limit")
    return decode_header(head + handle.read(length))


def check_header(header: DeltaHeader, *, max_expanded: int = 8 * 1024**3) -> None:
    """Bound everything a header asks of the applier.

    Every copy op stays inside its source (the base file's size, or the member's declared
    size, which the applier enforces when it decompresses the member); the segments written
    as they are add up to at most the target's size; the decompressed bytes (literals plus
    deflate segments) stay under ``max_expanded``; the literal ops use exactly
    ``literal_bytes``.

    Raises:
        ProtocolError: an op or a size out of bounds; the message names the segment and op.
    """
    if len(header.members) > MAX_MEMBERS:
        raise ProtocolError(f"delta.members: {len(header.members)} is over {MAX_MEMBERS}")
    for i, member in enumerate(header.members):
        if not _MEMBER_NAME.fullmatch(member.name):
            raise ProtocolError(f"delta.members[{i}].name: {member.name[:80]!r} is not a"
                                " member name")
    limits = [header.base_size] + [m.size for m in header.members]
    ops_total = sum(len(s.ops) for s in header.segments)
    if ops_total > MAX_OPS:
        raise ProtocolError(f"delta: {ops_total} ops, over the limit of {MAX_OPS}")
    raw = expanded = literals = 0
    for s_index, segment in enumerate(header.segments):
        produced = 0
        for o_index, (source, offset, length) in enumerate(segment.ops):
            where = f"delta.segments[{s_index}].ops[{o_index}]"
            if length < 1 or offset < 0:
                raise ProtocolError(f"{where}: length {length} at offset {offset}")
            if source == LITERAL:
                if offset != 0:
                    raise ProtocolError(f"{where}: a literal op takes the next bytes; its"
                                        f" offset must be 0, not {offset}")
                literals += length
            elif 0 <= source < len(limits):
                if offset + length > limits[source]:
                    raise ProtocolError(f"{where}: bytes {offset}..{offset + length} are past"
                                        f" the end of source {source} ({limits[source]} bytes)")
            else:
                raise ProtocolError(f"{where}: source {source} does not exist")
            produced += length
        if produced != segment.size:
            raise ProtocolError(f"delta.segments[{s_index}]: ops give {produced} bytes, the"
                                f" segment says {segment.size}")
        if segment.deflate is None:
            raw += segment.size
        else:
            expanded += segment.size
    if raw > header.target_size:
        raise ProtocolError(f"delta: {raw} bytes written as they are, past the target's"
                            f" {header.target_size}")
    if literals != header.literal_bytes:
        raise ProtocolError(f"delta.literal_bytes: {header.literal_bytes}, the ops take"
                            f" {literals}")
    if expanded + literals > max_expanded:
        raise ProtocolError(f"delta: {expanded + literals} decompressed bytes, over the"
                            f" limit of {max_expanded}")
