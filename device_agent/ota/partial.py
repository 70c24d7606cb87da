"""The file a download writes into.

Bytes that arrive in order go to disk with ``O_DIRECT`` where the operating system and the
file system take it (Linux; ext4, xfs, btrfs, f2fs): a download then does not fill the page
cache, so a model of hundreds of MB fetched on a device with 1 GB of memory does not push the
model in service and the rest of the device's working set out of memory, and the bytes are
not copied into page-cache pages the kernel has to find first (on a VM whose free memory is
handed back to its host, the dearest part of a fast download: see docs/ota.md).

Whole 4 KiB blocks go to disk from an aligned staging buffer, a MiB at a time; a last partial
block waits there and goes through the page cache when the file is synced (it is written
again, whole, once the block fills). A write out of order, a file system that refuses
``O_DIRECT`` (tmpfs before Linux 6.6, some network and FUSE file systems) or another system:
plain writes, the same bytes.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

from edgekit.protocol.ota import UpdateReason

from .errors import UpdateFailure

__all__ = ["PartialFile"]

log = logging.getLogger("device_agent.ota")

# O_DIRECT wants offsets, lengths and buffer addresses on the device's logical block size:
# 4096 covers devices of 512 and of 4096.
ALIGN = 4096
STAGE_BYTES = 1024 * 1024  # one direct write


def _open_direct(path: Path) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:  # EINVAL: this file system takes no O_DIRECT
        log.debug("no O_DIRECT for %s (%s): plain writes", path, exc)
        return None


class PartialFile:
    """The file a download writes into; never longer than ``size``.

    ``direct`` (the ``ota.direct_io`` setting): write in-order bytes with ``O_DIRECT`` where
    it is available. Reads and :meth:`sync` see every byte written, either way."""

    def __init__(self, path: Path, size: int, *, direct: bool = True) -> None:
        self.path = path
        self.size = size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._direct_fd = _open_direct(path) if direct else None
        # Page-aligned, as an anonymous map is; STAGE_BYTES of blocks and room for a tail.
        self._stage = mmap.mmap(-1, STAGE_BYTES + ALIGN) if self._direct_fd is not None \
            else None
        self._base = 0  # the file offset of the stage's first byte (a multiple of ALIGN)
        self._fill = 0  # bytes in the stage, not all on disk yet
        if self._stage is not None:
            self._seat(os.fstat(self._fd).st_size)

    @property
    def direct(self) -> bool:
        """In-order bytes go to disk with O_DIRECT."""
        return self._stage is not None

    def truncate(self, offset: int) -> None:
        """Cut the file at ``offset``; in-order writes go on from there."""
        self._flush()
        os.ftruncate(self._fd, offset)
        if self._stage is not None:
            self._seat(offset)

    def read_at(self, offset: int, length: int) -> bytes:
        self._flush()
        return os.pread(self._fd, length, offset)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Raises: UpdateFailure: the bytes would go past the size cap (too_large)."""
        if offset < 0 or offset + len(data) > self.size:
            raise UpdateFailure(UpdateReason.TOO_LARGE,
                                f"the server sent bytes up to {offset + len(data)}, past the"
                                f" {self.size} bytes the desired document names")
        if self._stage is not None and offset == self._base + self._fill:
            self._append(memoryview(data))
            return
        self._flush()
        _pwrite_all(self._fd, memoryview(data), offset)
        if self._stage is not None:
            self._seat(offset + len(data))

    def sync(self) -> None:
        """Every byte written so far is on disk (fsync)."""
        self._flush()
        os.fsync(self._fd)

    def close(self) -> None:
        try:
            self._flush()
        finally:
            os.close(self._fd)
            self._drop_direct()

    # ------------------------------------------------------------------ staging

    def _seat(self, end: int) -> None:
        """Start the stage at the block that holds ``end``, with that block's bytes before
        ``end`` read back from the file, so in-order writes go on from ``end``."""
        assert self._stage is not None
        self._base = end - end % ALIGN
        head = os.pread(self._fd, end - self._base, self._base) if end > self._base else b""
        self._stage[:len(head)] = head
        self._fill = len(head)

    def _append(self, view: memoryview) -> None:
        assert self._stage is not None
        room = len(self._stage)
        while view:
            n = min(room - self._fill, len(view))
            self._stage[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill >= STAGE_BYTES:
                self._write_blocks()
                if self._stage is None:  # O_DIRECT refused a write: the rest goes plain
                    _pwrite_all(self._fd, view, self._base)
                    return

    def _write_blocks(self) -> None:
        """Write the stage's whole blocks with O_DIRECT and keep the partial one."""
        assert self._stage is not None and self._direct_fd is not None
        whole = self._fill - self._fill % ALIGN
        if not whole:
            return
        try:
            written = _pwrite_all(self._direct_fd, memoryview(self._stage)[:whole], self._base)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise  # ENOSPC and the like are the download's to report
            # A block size above ALIGN, or a file system that took the open and not the write.
            log.info("O_DIRECT refused a write to %s (%s): plain writes from here", self.path,
                     exc)
            _pwrite_all(self._fd, memoryview(self._stage)[:self._fill], self._base)
            self._base, self._fill = self._base + self._fill, 0
            self._drop_direct()
            return
        rest = self._fill - written
        self._stage[:rest] = self._stage[written:self._fill]
        self._base += written
        self._fill = rest

    def _flush(self) -> None:
        """Whole blocks with O_DIRECT, the partial block through the page cache (it stays in
        the stage, to be written whole later)."""
        if self._stage is None or not self._fill:
            return
        self._write_blocks()
        if self._stage is not None and self._fill:
            _pwrite_all(self._fd, memoryview(self._stage)[:self._fill], self._base)

    def _drop_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        # The map is freed with its last reference, not closed here: a write that failed
        # may still hold a view of it in its traceback.
        self._stage = None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    total = len(view)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    return total
