"""Building deltas between two packages, model-aware (the format: :mod:`edgekit.protocol.ota.delta`).

The target package is walked member by member in file order. The bytes between members (zip
headers, central directory) are literals. A deflated member whose bytes this host's zlib
reproduces from its content becomes a deflate segment built from the content: a member
identical to one of the base's is one copy, a model file is matched tensor by tensor (ONNX
initializers, TFLite buffers; :mod:`._tensors`) against the base's model, so unchanged
tensors are copies and changed ones literals; any other member is literal. The literals are
compressed with zstd in one stream.

Every delta built here is applied once with :func:`edgekit.delta.apply_delta` before it is
returned, so the host never offers one that does not rebuild the target exactly.

    size = delta_bytes("digits-1.0.0.edgepkg", "digits-1.1.0.edgepkg")
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from edgekit.artifact import sha256_file
from edgekit.delta import apply_delta
from edgekit.errors import ArtifactError, EdgekitError
from edgekit.host.mqtt_client import HostClient
from edgekit.host.ota._tensors import tensor_ranges
from edgekit.host.ota.store import ArtifactInfo, ArtifactStore
from edgekit.protocol.ota import DeltaSource
from edgekit.protocol.ota.delta import (
    LITERAL,
    BaseMember,
    DeltaHeader,
    DeltaSegment,
    encode_header,
)

__all__ = ["DEFAULT_LEVEL", "OFFER_RATIO", "DeltaFile", "build_delta", "delta_bytes", "deltas_for",
           "offer_deltas", "write_delta"]

DEFAULT_LEVEL = 19
OFFER_RATIO = 0.9  # a delta over 90 % of the package is not worth the device's rebuild
_MIN_COPY = 64  # shorter matches cost more as an op than as literal bytes
_DEFLATE_LEVELS = (-1, 9, 1, 2, 3, 4, 5, 7, 8, 0)  # zipfile's default first


@dataclass(frozen=True)
class DeltaFile:
    """A delta written to disk: from ``base_sha256`` to ``target_sha256``."""

    path: Path
    sha256: str
    size: int
    base_sha256: str
    target_sha256: str
    target_size: int


def delta_bytes(base: str | os.PathLike[str], target: str | os.PathLike[str], *,
                level: int = DEFAULT_LEVEL) -> int:
    """The size of the delta that rebuilds ``target`` from ``base`` (both .edgepkg files).

    Raises:
        ArtifactError: either file is not a readable zip package.
    """
    return len(build_delta(base, target, level=level))


def write_delta(base: str | os.PathLike[str], target: str | os.PathLike[str],
                folder: str | os.PathLike[str], *, level: int = DEFAULT_LEVEL) -> DeltaFile:
    """Build the delta from ``base`` to ``target`` into ``folder`` (named by the two hashes).

    Raises:
        ArtifactError: either file is not a readable zip package.
        EdgekitError: the delta could not be written.
    """
    data = build_delta(base, target, level=level)
    base_sha, target_sha = sha256_file(base), sha256_file(target)
    out = Path(folder) / f"{base_sha[:16]}-{target_sha[:16]}.ekdelta"
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EdgekitError(f"cannot write the delta {out}: {exc.strerror}",
                           hint="check the folder's permissions and free space") from exc
    return DeltaFile(path=out, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                     base_sha256=base_sha, target_sha256=target_sha,
                     target_size=Path(target).stat().st_size)


def build_delta(base: str | os.PathLike[str], target: str | os.PathLike[str], *,
                level: int = DEFAULT_LEVEL) -> bytes:
    """The delta file that rebuilds ``target`` from ``base``, checked by applying it.

    Raises:
        ArtifactError: either file is not a readable zip package, or the delta does not
            rebuild the target (a bug; nothing is offered then).
    """
    base_path, target_path = Path(base), Path(target)
    target_raw = target_path.read_bytes()
    try:
        with zipfile.ZipFile(base_path) as base_zip, \
                zipfile.ZipFile(io.BytesIO(target_raw)) as target_zip:
            plan = _Plan(base_zip)
            _walk_target(target_zip, target_raw, plan)
    except (zipfile.BadZipFile, zlib.error, OSError, struct.error) as exc:
        raise ArtifactError(f"cannot read {base_path.name} or {target_path.name} as"
                            f" packages: {exc}") from exc
    header = DeltaHeader(base_sha256=sha256_file(base_path), base_size=base_path.stat().st_size,
                         target_sha256=hashlib.sha256(target_raw).hexdigest(),
                         target_size=len(target_raw), members=plan.members,
                         segments=plan.segments, literal_bytes=plan.literal_size)
    literals = zstandard.ZstdCompressor(level=level).compress(b"".join(plan.literals))
    data = encode_header(header) + literals
    _self_check(data, base_path, header)
    return data


@dataclass
class _Plan:
    """The segments being built, the base members they copy from, and the literals."""

    base_zip: zipfile.ZipFile
    members: list[BaseMember] = field(default_factory=list)
    segments: list[DeltaSegment] = field(default_factory=list)
    literals: list[bytes] = field(default_factory=list)
    literal_size: int = 0
    _ops: list[tuple[int, int, int]] = field(default_factory=list)
    _content: dict[str, bytes] = field(default_factory=dict)

    def literal(self, data: bytes) -> None:
        if not data:
            return
        self.literals.append(data)
        self.literal_size += len(data)
        self._add((LITERAL, 0, len(data)))

    def copy(self, source: int, offset: int, length: int) -> None:
        self._add((source, offset, length))

    def _add(self, op: tuple[int, int, int]) -> None:
        if self._ops:
            last = self._ops[-1]
            # Adjacent literals, or contiguous ranges of one source, become one op.
            if last[0] == op[0] and (op[0] == LITERAL or last[1] + last[2] == op[1]):
                self._ops[-1] = (last[0], last[1], last[2] + op[2])
                return
        self._ops.append(op)

    def end_segment(self, deflate: int | None = None) -> None:
        size = sum(op[2] for op in self._ops)
        if size or deflate is not None:
            self.segments.append(DeltaSegment(size=size, ops=self._ops, deflate=deflate))
        self._ops = []

    def base_content(self, name: str) -> bytes:
        if name not in self._content:
            self._content[name] = self.base_zip.read(name)
        return self._content[name]

    def source_of(self, name: str) -> int:
        """The op source number of a base member (added to the header on first use)."""
        for i, member in enumerate(self.members):
            if member.name == name:
                return i + 1
        self.members.append(BaseMember(name=name, size=self.base_zip.getinfo(name).file_size))
        return len(self.members)


def _walk_target(target_zip: zipfile.ZipFile, raw: bytes, plan: _Plan) -> None:
    position = 0
    for info in sorted(target_zip.infolist(), key=lambda i: i.header_offset):
        name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
        data_start = info.header_offset + 30 + name_len + extra_len
        data_end = data_start + info.compress_size
        plan.literal(raw[position:data_start])
        content = target_zip.read(info)
        deflate = _deflate_level(content, raw[data_start:data_end]) \
            if info.compress_type == zipfile.ZIP_DEFLATED else None
        if deflate is None and info.compress_type != zipfile.ZIP_STORED:
            plan.literal(raw[data_start:data_end])
        else:
            if deflate is not None:
                plan.end_segment()
            _member_ops(info.filename, content, plan)
            if deflate is not None:
                plan.end_segment(deflate)
        position = data_end
    plan.literal(raw[position:])
    plan.end_segment()


def _deflate_level(content: bytes, compressed: bytes) -> int | None:
    """The zlib level that turns ``content`` into exactly ``compressed`` here, if any."""
    for level in _DEFLATE_LEVELS:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
        if compressor.compress(content) + compressor.flush() == compressed:
            return level
    return None


def _member_ops(name: str, content: bytes, plan: _Plan) -> None:
    """Ops for one member's content: a whole identical base member, else tensor matches
    against the base's model file of the same kind, else literal."""
    digest = hashlib.sha256(content).digest()
    base_names = [i.filename for i in plan.base_zip.infolist() if not i.is_dir()]
    for base_name in base_names:
        if plan.base_zip.getinfo(base_name).file_size == len(content) and \
                hashlib.sha256(plan.base_content(base_name)).digest() == digest:
            plan.copy(plan.source_of(base_name), 0, len(content))
            return
    suffix = Path(name).suffix
    model = next((b for b in base_names if suffix in (".onnx", ".tflite")
                  and Path(b).suffix == suffix), None)
    if model is None:
        plan.literal(content)
        return
    base = plan.base_content(model)
    known: dict[bytes, int] = {}
    for start, end in tensor_ranges(model, base):
        if end - start >= _MIN_COPY:
            known.setdefault(hashlib.sha256(base[start:end]).digest(), start)
    position = 0
    for start, end in sorted(tensor_ranges(name, content)):
        if end - start < _MIN_COPY or start < position:
            continue
        chunk = content[start:end]
        at = known.get(hashlib.sha256(chunk).digest())
        if at is None or base[at:at + len(chunk)] != chunk:
            continue
        plan.literal(content[position:start])
        plan.copy(plan.source_of(model), at, len(chunk))
        position = end
    plan.literal(content[position:])


def _self_check(data: bytes, base: Path, header: DeltaHeader) -> None:
    with tempfile.TemporaryDirectory(prefix="edgekit-delta-") as scratch:
        try:
            apply_delta(io.BytesIO(data), base, lambda _block: None, Path(scratch),
                        target_sha256=header.target_sha256, target_size=header.target_size)
        except EdgekitError as exc:
            raise ArtifactError(f"the delta does not rebuild the target: {exc.message}",
                                hint="send the full package") from exc


def deltas_for(target: str | os.PathLike[str], candidates: Iterable[str | os.PathLike[str]],
               bases: Iterable[str], folder: str | os.PathLike[str], *,
               level: int = DEFAULT_LEVEL) -> list[DeltaFile]:
    """Deltas to ``target`` from each package of ``candidates`` whose sha256 is in ``bases``
    (the packages the fleet's devices serve), kept only when one helps: at most
    :data:`OFFER_RATIO` of the target's size. A candidate that is not a readable package is
    skipped.

    Raises:
        EdgekitError: a delta could not be written into ``folder``.
    """
    wanted = set(bases) - {sha256_file(target)}
    limit = OFFER_RATIO * Path(target).stat().st_size
    out: list[DeltaFile] = []
    seen: set[str] = set()
    for candidate in candidates:
        try:
            digest = sha256_file(candidate)
        except OSError:
            continue
        if digest not in wanted or digest in seen:
            continue
        seen.add(digest)
        try:
            delta = write_delta(candidate, target, folder, level=level)
        except ArtifactError:
            continue
        if delta.size <= limit:
            out.append(delta)
        else:
            delta.path.unlink(missing_ok=True)
    return out


def offer_deltas(client: HostClient, fleet: str, targets: list[str] | None,
                 info: ArtifactInfo, store: ArtifactStore, candidates: list[Path],
                 folder: Path, url_for: Callable[[str], str] | None = None, *,
                 note: Callable[[str], None] | None = None) -> list[DeltaSource]:
    """What ``edgekit deploy`` offers ahead: a delta from each package the targets' retained
    statuses say they serve (found among ``candidates`` and the packages next to the
    target), registered in ``store`` and listed for the desired document.

    Raises:
        EdgekitError: the broker did not answer, or a delta could not be written.
    """
    from edgekit.host.ota.deploy import delta_source
    from edgekit.host.ota.preflight import read_fleet

    views = read_fleet(client, fleet)
    bases = {v.model_sha256 for device, v in views.items()
             if v.model_sha256 and (targets is None or device in targets)}
    found = candidates + sorted(info.path.parent.glob("*.edgepkg"))
    entries: list[DeltaSource] = []
    for delta in deltas_for(info.path, found, bases, folder):
        store.add_delta(delta.path, delta.sha256, delta.size, info)
        entries.append(delta_source(delta, fleet, url=url_for(delta.sha256) if url_for else None))
        if note is not None:
            note(f"offering a {delta.size}-byte delta from {delta.base_sha256[:12]}"
                 f" ({100 * delta.size / info.size:.1f}% of the package)")
    return entries
