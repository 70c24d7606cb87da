"""Rebuilding a package from a base package and a delta (:mod:`edgekit.protocol.ota.delta`).

This is the half a device runs, so it knows nothing of ONNX or TFLite: it copies byte ranges
of the base (the file, or one of its members decompressed), inserts literal bytes from the
delta's zstd stream, raw-deflates the segments that say so, and hashes what it writes. The
half that knows models and builds deltas is :mod:`edgekit.host.ota.delta`.

Memory stays bounded: members are decompressed into scratch files, ops are carried out in
blocks of at most 1 MiB, and the literal stream is read as a stream.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from edgekit.errors import ArtifactError, ProtocolError
from edgekit.protocol.ota.delta import LITERAL, DeltaHeader, check_header, read_header

__all__ = ["DEFAULT_MAX_EXPANDED", "ApplyStats", "apply_delta"]

DEFAULT_MAX_EXPANDED = 8 * 1024**3
_BLOCK = 1024 * 1024
_MAX_WINDOW = 1 << 27  # zstd window a delta may ask the decoder for (128 MiB)


@dataclass
class ApplyStats:
    copied: int = 0  # bytes taken from the base (before deflate)
    inserted: int = 0  # literal bytes taken from the delta
    written: int = 0  # bytes of the rebuilt file


def apply_delta(delta: BinaryIO, base: Path, write: Callable[[bytes], None], scratch: Path, *,
                target_sha256: str, target_size: int,
                checkpoint: Callable[[], None] | None = None,
                max_expanded: int = DEFAULT_MAX_EXPANDED) -> ApplyStats:
    """Rebuild the target of ``delta`` from the package at ``base``, handing its bytes to
    ``write`` in order; ``checkpoint`` is called after each segment.

    The delta must rebuild exactly ``target_sha256`` / ``target_size`` (the values a signed
    document names, never the delta's own word); ``base`` must be the file the delta names.
    ``scratch`` is an existing folder for decompressed members, emptied before returning.

    Raises:
        ProtocolError: the delta is malformed, out of bounds, for another target or base, or
            its literal stream is corrupt or of another length.
        ArtifactError: the base lacks a member the delta names, or the rebuilt bytes do not
            hash to ``target_sha256``.
    """
    header, literal_at = read_header(delta)
    check_header(header, max_expanded=max_expanded)
    if (header.target_sha256, header.target_size) != (target_sha256, target_size):
        raise ProtocolError(f"the delta rebuilds {header.target_sha256[:12]} ({header.target_size}"
                            f" bytes), not {target_sha256[:12]} ({target_size} bytes)")
    _check_base(base, header)
    sources = [base] + _extract_members(base, header, scratch)
    handles = [open(path, "rb") for path in sources]
    try:
        delta.seek(literal_at)
        decoder = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
        with decoder.stream_reader(delta, read_across_frames=False, closefd=False) as literals:
            stats = _run_segments(header, handles, literals, write, checkpoint)
            if literals.read(1):
                raise ProtocolError("the delta's literal stream is longer than its header says")
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"the delta's literal stream is corrupt: {exc}") from exc
    finally:
        for handle in handles:
            handle.close()
        for path in sources[1:]:
            path.unlink(missing_ok=True)
    if stats.written != target_size:
        raise ArtifactError(f"the delta rebuilt {stats.written} bytes, the target has"
                            f" {target_size}")
    return stats


def _check_base(base: Path, header: DeltaHeader) -> None:
    size = base.stat().st_size
    digest = hashlib.sha256()
    with open(base, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    if (digest.hexdigest(), size) != (header.base_sha256, header.base_size):
        raise ProtocolError(f"the delta is against {header.base_sha256[:12]}, the base here is"
                            f" {digest.hexdigest()[:12]}")


def _extract_members(base: Path, header: DeltaHeader, scratch: Path) -> list[Path]:
    """Decompress the members the delta copies from, each capped at its declared size and
    named by its index (a member name never becomes a file name)."""
    paths: list[Path] = []
    try:
        with zipfile.ZipFile(base) as zf:
            for i, member in enumerate(header.members):
                try:
                    info = zf.getinfo(member.name)
                except KeyError:
                    raise ArtifactError(f"the base package has no member {member.name}") from None
                if info.file_size != member.size:
                    raise ArtifactError(f"base member {member.name} is {info.file_size} bytes,"
                                        f" the delta says {member.size}")
                path = scratch / f"member-{i}"
                paths.append(path)
                with zf.open(info) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, _BLOCK)
                    if dst.tell() != member.size:
                        raise ArtifactError(f"base member {member.name} decompressed to"
                                            f" {dst.tell()} bytes, not {member.size}")
    except (zipfile.BadZipFile, zlib.error, OSError) as exc:
        for path in paths:
            path.unlink(missing_ok=True)
        raise ArtifactError(f"cannot read the base package {base.name}: {exc}") from exc
    except ArtifactError:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    return paths


class _Sink:
    """Hashes and counts the rebuilt bytes, and refuses any past the target's size."""

    def __init__(self, write: Callable[[bytes], None], header: DeltaHeader) -> None:
        self.write_out = write
        self.header = header
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.written + len(data) > self.header.target_size:
            raise ArtifactError(f"the delta writes past the target's {self.header.target_size}"
                                " bytes")
        self.digest.update(data)
        self.write_out(data)
        self.written += len(data)


def _run_segments(header: DeltaHeader, handles: Sequence[BinaryIO], literals: BinaryIO,
                  write: Callable[[bytes], None],
                  checkpoint: Callable[[], None] | None) -> ApplyStats:
    sink = _Sink(write, header)
    stats = ApplyStats()
    for segment in header.segments:
        compressor = None if segment.deflate is None else \
            zlib.compressobj(segment.deflate, zlib.DEFLATED, -15)
        for source, offset, length in segment.ops:
            for block in _op_blocks(source, offset, length, handles, literals):
                if source == LITERAL:
                    stats.inserted += len(block)
                else:
                    stats.copied += len(block)
                sink.write(block if compressor is None else compressor.compress(block))
        if compressor is not None:
            sink.write(compressor.flush())
        if checkpoint is not None:
            checkpoint()
    if sink.digest.hexdigest() != header.target_sha256:
        raise ArtifactError(f"the rebuilt file's sha256 is {sink.digest.hexdigest()[:16]}...,"
                            f" the target is {header.target_sha256[:16]}...")
    stats.written = sink.written
    return stats


def _op_blocks(source: int, offset: int, length: int, handles: Sequence[BinaryIO],
               literals: BinaryIO) -> Iterator[bytes]:
    """The bytes of one op, in blocks of at most 1 MiB."""
    while length > 0:
        want = min(length, _BLOCK)
        if source == LITERAL:
            block = _read_exact(literals, want)
        else:
            block = os.pread(handles[source].fileno(), want, offset)
            if len(block) != want:
                raise ArtifactError(f"source {source} ends before byte {offset + want}")
        offset += want
        length -= want
        yield block


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        block = stream.read(n)
        if not block:
            raise ProtocolError("the delta's literal stream ends early")
        parts.append(block)
        n -= len(block)
    return b"".join(parts)
