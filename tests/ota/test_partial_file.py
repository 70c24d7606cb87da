"""The partial file a download writes into: in-order bytes go to disk with O_DIRECT where the
file system takes it, past the page cache, and every way of writing gives the same bytes.

Real files in the test's folder; page-cache residency is read with mincore(2)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from pathlib import Path

import pytest

from device_agent.ota import partial as partial_mod
from device_agent.ota.errors import UpdateFailure
from device_agent.ota.partial import ALIGN, STAGE_BYTES, PartialFile

DATA = os.urandom(5 * STAGE_BYTES + 12345)
# Sizes that cross block and stage boundaries in every way: tiny, odd, a whole stage, more.
PIECES = [1, 4095, 1, 5000, STAGE_BYTES, 3, STAGE_BYTES + ALIGN + 7, 100_000, 2 * STAGE_BYTES]


def _direct_supported(folder: Path) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | flag, 0o600))
    except OSError:
        return False
    return True


def _write_in_pieces(partial: PartialFile, data: bytes, *, sync_every: int = 3) -> None:
    offset, i = 0, 0
    while offset < len(data):
        piece = data[offset:offset + PIECES[i % len(PIECES)]]
        partial.write_at(offset, piece)
        offset += len(piece)
        i += 1
        if i % sync_every == 0:
            partial.sync()
            # What a resumed download and a progress record rely on: the bytes are readable.
            assert partial.read_at(0, offset) == data[:offset]


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), by mincore(2)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), size) as mapped:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        resident = sum(v & 1 for v in vec)
        del address  # the buffer export must go before the map closes
    return resident, pages


@pytest.mark.parametrize("direct", [True, False])
def test_bytes_written_in_order_read_back_whole(tmp_path: Path, direct: bool) -> None:
    path = tmp_path / "a.part"
    partial = PartialFile(path, len(DATA), direct=direct)
    try:
        _write_in_pieces(partial, DATA)
        partial.sync()
    finally:
        partial.close()
    assert path.read_bytes() == DATA


def test_a_download_fills_no_page_cache_where_direct_io_is_taken(tmp_path: Path) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}'s file system takes no O_DIRECT: nothing to measure")
    direct_path, plain_path = tmp_path / "direct.part", tmp_path / "plain.part"
    for path, direct in ((direct_path, True), (plain_path, False)):
        partial = PartialFile(path, len(DATA), direct=direct)
        try:
            assert partial.direct is direct
            _write_in_pieces(partial, DATA, sync_every=1000)
            partial.sync()
        finally:
            partial.close()
    resident, pages = _resident_pages(direct_path)
    plain_resident, _ = _resident_pages(plain_path)
    # Plain writes leave the whole file cached (the control: mincore sees the cache); direct
    # ones at most the last partial block, written through the cache at sync.
    assert plain_resident == pages
    assert resident <= 1, (resident, pages)
    assert direct_path.read_bytes() == DATA


def test_truncate_and_a_reopened_file_go_on_from_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "r.part"
    partial = PartialFile(path, len(DATA))
    try:
        partial.write_at(0, DATA[:STAGE_BYTES + 10_000])
        partial.sync()
        cut = STAGE_BYTES + 6001  # inside a block: the block's head is read back
        partial.truncate(cut)
        partial.write_at(cut, DATA[cut:cut + 3 * STAGE_BYTES])
        partial.sync()
    finally:
        partial.close()
    # A restart: a new PartialFile on the file as it is, then the resumed download's cut.
    end = cut + 3 * STAGE_BYTES
    partial = PartialFile(path, len(DATA))
    try:
        partial.truncate(end)
        partial.write_at(end, DATA[end:])
        partial.sync()
    finally:
        partial.close()
    assert path.read_bytes() == DATA


def test_a_write_out_of_order_lands_where_it_was_asked(tmp_path: Path) -> None:
    path = tmp_path / "o.part"
    partial = PartialFile(path, len(DATA))
    try:
        partial.write_at(0, DATA[:10_000])
        partial.write_at(3 * STAGE_BYTES, DATA[3 * STAGE_BYTES:])  # past the end: plain
        partial.write_at(10_000, DATA[10_000:3 * STAGE_BYTES])  # the gap, out of order
        partial.sync()
    finally:
        partial.close()
    assert path.read_bytes() == DATA


def test_bytes_past_the_named_size_are_refused(tmp_path: Path) -> None:
    partial = PartialFile(tmp_path / "s.part", 10_000)
    try:
        partial.write_at(0, DATA[:9_000])
        with pytest.raises(UpdateFailure) as caught:
            partial.write_at(9_000, DATA[:1_001])
        assert caught.value.reason.value == "too_large"
        partial.sync()
    finally:
        partial.close()
    assert (tmp_path / "s.part").read_bytes() == DATA[:9_000]


def test_a_file_system_that_refuses_a_direct_write_gets_plain_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Mocked: a file system that opens with O_DIRECT and then refuses the write (EINVAL)
    # does not exist on this machine. The first direct write fails; every byte still lands.
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}'s file system takes no O_DIRECT")
    real_pwrite = os.pwrite
    partial = PartialFile(tmp_path / "e.part", len(DATA))
    direct_fd = partial._direct_fd
    refused = []

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fd == direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(partial_mod.os, "pwrite", pwrite)
    try:
        _write_in_pieces(partial, DATA)
        assert not partial.direct and refused == [0]
        partial.sync()
    finally:
        partial.close()
    monkeypatch.undo()
    assert (tmp_path / "e.part").read_bytes() == DATA


def test_a_full_disk_is_reported_not_swallowed(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Mocked: filling this machine's disk is not an option. ENOSPC from a direct write
    # reaches the download (which reports no_space), unlike EINVAL.
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}'s file system takes no O_DIRECT")
    partial = PartialFile(tmp_path / "f.part", len(DATA))
    direct_fd = partial._direct_fd
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fd == direct_fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(partial_mod.os, "pwrite", pwrite)
    try:
        with pytest.raises(OSError) as caught:
            partial.write_at(0, DATA[:2 * STAGE_BYTES])
        assert caught.value.errno == errno.ENOSPC
    finally:
        monkeypatch.undo()
        partial.close()
