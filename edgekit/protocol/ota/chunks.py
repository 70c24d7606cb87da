"""Chunk requests and chunk replies: how an artifact travels over MQTT.

A device publishes a :class:`ChunkRequest` (JSON) to the artifact's request topic
(:func:`edgekit.protocol.ota.topics.artifact_request_topic`), naming the bytes it wants and the topic
to answer on. A server answers with one binary payload::

    +----------------+----------------------------+-----------------------+
    | 4 bytes, big   | header: UTF-8 JSON,        | the chunk's raw bytes |
    | endian: header | ChunkHeader                | (``length`` of them)  |
    | length         |                            |                       |
    +----------------+----------------------------+-----------------------+

The header repeats the request id, sha256 and offset, gives the artifact's ``total`` size
and the sha256 of the bytes that follow, so a device checks every chunk on its own before it
writes it. An error reply has an ``error`` and no bytes. Requests carry their reply topic,
so the exchange works on MQTT 3.1.1 and MQTT 5 brokers alike. :class:`ChunkRequest` and
:class:`ChunkHeader` are :class:`~edgekit.protocol.codec.Document` Structs: the same classes
encode on one end and decode, strictly and size-capped, on the other.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from edgekit.errors import ProtocolError
from edgekit.protocol.codec import Document, decode, encode
from edgekit.protocol.ota.desired import MAX_ARTIFACT_BYTES, SHA256_PATTERN

__all__ = [
    "CHUNK_REQUEST_SCHEMA",
    "CHUNK_SCHEMA",
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "Chunk",
    "ChunkErrorCode",
    "ChunkErrorInfo",
    "ChunkHeader",
    "ChunkRequest",
    "decode_chunk",
    "encode_chunk",
    "encode_chunk_error",
    "encode_request",
    "make_request",
    "parse_request",
    "peek_request_id",
]

CHUNK_REQUEST_SCHEMA = "edgekit.chunk-request/1"
CHUNK_SCHEMA = "edgekit.chunk/1"
# One MiB, the servers' default cap: a chunk costs a request, a round trip and a few MQTT
# packets on both ends whatever its size, so on a fast link fewer, larger chunks go faster.
# Thin links ask for small ones (docs/ota.md, *Thin links*).
DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
_MAX_HEADER_BYTES = 64 * 1024
_MAX_REQUEST_BYTES = 4 * 1024  # a request is a few hundred bytes of JSON
_MAX_ERROR_MESSAGE = 500
_LEN = struct.Struct(">I")


class ChunkErrorCode(StrEnum):
    NOT_FOUND = "not_found"  # this server does not hold the artifact
    BAD_REQUEST = "bad_request"  # the request is not valid JSON or misses a field
    OUT_OF_RANGE = "out_of_range"  # offset at or past the end of the artifact
    INTERNAL = "internal"  # the server could not read the artifact


_Sha256 = Annotated[str, Meta(pattern=SHA256_PATTERN)]
_RequestId = Annotated[str, Meta(min_length=1, max_length=64)]
_Offset = Annotated[int, Meta(ge=0, le=MAX_ARTIFACT_BYTES)]


# msgspec lets a frozen Struct subclass the (unfrozen) Document base; mypy applies the
# dataclass rule that forbids it, hence the ignores on these class lines.
class ChunkRequest(Document, tag=CHUNK_REQUEST_SCHEMA, frozen=True):  # type: ignore[misc]
    """A device's request for ``length`` bytes at ``offset``; :func:`parse_request` also
    checks that ``reply_to`` is a topic one can publish to."""

    max_bytes: ClassVar[int] = _MAX_REQUEST_BYTES
    request_id: _RequestId
    sha256: _Sha256
    offset: _Offset
    # at most this many bytes; servers may send fewer (their cap, the file's end)
    length: Annotated[int, Meta(ge=1, le=MAX_CHUNK_BYTES)]
    reply_to: Annotated[str, Meta(min_length=1, max_length=1024)]


class ChunkErrorInfo(msgspec.Struct, kw_only=True, frozen=True):
    code: Annotated[str, Meta(min_length=1, max_length=64)]  # a ChunkErrorCode value
    message: Annotated[str, Meta(max_length=_MAX_ERROR_MESSAGE)] = ""


class ChunkHeader(Document, tag=CHUNK_SCHEMA, frozen=True):  # type: ignore[misc]
    """The JSON header of a chunk reply; ``error`` is left out of the header when None."""

    max_bytes: ClassVar[int] = _MAX_HEADER_BYTES
    request_id: _RequestId
    sha256: _Sha256  # of the whole artifact
    offset: _Offset
    length: Annotated[int, Meta(ge=0, le=MAX_CHUNK_BYTES)]  # bytes that follow the header
    total: _Offset  # size of the whole artifact (0 in an error reply)
    chunk_sha256: _Sha256  # of the bytes that follow
    error: ChunkErrorInfo | None = None


@dataclass(frozen=True)
class Chunk:
    """A decoded reply; its bytes match its ``chunk_sha256`` unless it was decoded with
    ``check=False`` (then :meth:`matches` tells)."""

    header: ChunkHeader
    data: bytes | memoryview  # a view into the reply it was decoded from: no copy

    def matches(self) -> bool:
        """Whether the bytes are the ones the header's ``chunk_sha256`` names."""
        return hashlib.sha256(self.data).hexdigest() == self.header.chunk_sha256

    @property
    def error(self) -> ChunkErrorInfo | None:
        return self.header.error

    def check_answers(self, request: ChunkRequest) -> None:
        """Check that this reply answers ``request`` (and is not a stray or late one).

        Raises:
            ProtocolError: another request id, artifact or offset, or more bytes than asked.
        """
        h = self.header
        if h.request_id != request.request_id:
            raise ProtocolError(f"chunk reply for request {h.request_id!r}, expected"
                                f" {request.request_id!r}")
        if h.sha256 != request.sha256 or h.offset != request.offset:
            raise ProtocolError(
                f"chunk reply for {h.sha256[:12]}@{h.offset}, the request asked for"
                f" {request.sha256[:12]}@{request.offset}")
        if h.length > request.length:
            raise ProtocolError(f"chunk reply holds {h.length} bytes, the request asked for"
                                f" at most {request.length}")


def make_request(request_id: str, sha256: str, offset: int, length: int,
                 reply_to: str) -> ChunkRequest:
    """Build a request and check it as a server would.

    Raises:
        ProtocolError: a field is out of range.
    """
    return parse_request(encode_request(ChunkRequest(
        request_id=request_id, sha256=sha256, offset=offset, length=length,
        reply_to=reply_to)))


def encode_request(request: ChunkRequest) -> bytes:
    return encode(request)


def parse_request(data: bytes | str) -> ChunkRequest:
    """Decode and check a chunk request.

    Raises:
        ProtocolError: over 4 KiB, not JSON, another schema, or a field missing, of the
            wrong type or out of range; the message names the key (``chunk_request.length``).
    """
    request = decode(data, ChunkRequest, where="chunk_request")
    reply_to = request.reply_to
    if any(c in reply_to for c in "+#\0") or reply_to.startswith("$"):
        raise ProtocolError(f"chunk_request.reply_to: {reply_to!r} is not a topic one can"
                            " publish to")
    return request


def encode_chunk(request: ChunkRequest, data: bytes, total: int,
                 chunk_sha256: str | None = None) -> bytes:
    """A reply carrying ``data``, the bytes at ``request.offset`` (``chunk_sha256``: their
    hash when the caller has it already)."""
    header = ChunkHeader(request_id=request.request_id, sha256=request.sha256,
                         offset=request.offset, length=len(data), total=total,
                         chunk_sha256=chunk_sha256 or hashlib.sha256(data).hexdigest())
    return _frame(header, data)


def encode_chunk_error(request_id: str, sha256: str, offset: int, code: ChunkErrorCode,
                       message: str) -> bytes:
    """A reply that says why a request cannot be answered."""
    header = ChunkHeader(request_id=request_id, sha256=sha256, offset=offset, length=0,
                         total=0, chunk_sha256=hashlib.sha256(b"").hexdigest(),
                         error=ChunkErrorInfo(code=code.value,
                                              message=message[:_MAX_ERROR_MESSAGE]))
    return _frame(header, b"")


def decode_chunk(payload: bytes | bytearray, *, check: bool = True) -> Chunk:
    """Decode a reply and check its bytes against its ``chunk_sha256``. A reader that hashes
    the whole artifact as it arrives may pass ``check=False`` and check a chunk only when
    the whole does not match (one pass of sha256 over the bytes instead of two).

    Raises:
        ProtocolError: the frame is truncated, the header is not valid JSON or misses a field,
            the byte count differs from ``length``, or (with ``check``) the bytes do not
            match ``chunk_sha256``.
    """
    if len(payload) < _LEN.size:
        raise ProtocolError(f"chunk reply of {len(payload)} bytes is too short for its frame")
    (header_len,) = _LEN.unpack_from(payload)
    if header_len > _MAX_HEADER_BYTES or _LEN.size + header_len > len(payload):
        raise ProtocolError(f"chunk reply header length {header_len} does not fit the"
                            f" {len(payload)}-byte payload")
    header = decode(payload[_LEN.size:_LEN.size + header_len], ChunkHeader, where="chunk")
    data = memoryview(payload)[_LEN.size + header_len:]
    if len(data) != header.length:
        raise ProtocolError(f"chunk reply carries {len(data)} bytes, its header says"
                            f" {header.length} (truncated)")
    chunk = Chunk(header, data)
    if check and not chunk.matches():
        raise ProtocolError(f"chunk at offset {header.offset} does not match its sha256"
                            " (corrupted in transit)")
    return chunk


def peek_request_id(payload: bytes | bytearray) -> str | None:
    """The request id of a reply that :func:`decode_chunk` refused (to ask for it again at
    once instead of waiting for the request to time out), or None if even that is unreadable.
    The id is only a hint: nothing else of such a reply is trusted."""
    try:
        (header_len,) = _LEN.unpack_from(payload)
        if header_len > _MAX_HEADER_BYTES:
            return None
        doc = json.loads(payload[_LEN.size:_LEN.size + header_len])
    except (struct.error, ValueError, UnicodeDecodeError):
        return None
    rid = doc.get("request_id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) else None


def _frame(header: ChunkHeader, data: bytes) -> bytes:
    head = encode(header)
    return b"".join((_LEN.pack(len(head)), head, data))  # one copy of the chunk, not two
