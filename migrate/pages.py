"""Packing pages for the wire: zero pages as runs, the rest concatenated.

The source packs every batch it sends (native/pages.c scans and copies
GIL-free); the destination installs the same shape with
``FaultReader.install`` without expanding it. ``expand_pages`` is the
inverse, for checks and for writing pages into plain memory.
"""
from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from typing import NamedTuple

from migrate._native import ffi, lib
from migrate.errors import os_error

Buffer = bytes | bytearray | memoryview | mmap.mmap


class _Scratch(threading.local):
    """Per-thread output buffers for pack_pages and encode_batch, grown on demand and reused."""

    def __init__(self) -> None:
        self.capacity = 0  # pages
        self.data = ffi.new("uint8_t[]", 0)
        self.runs = ffi.new("uint32_t[]", 0)
        self.nruns = ffi.new("uint32_t *")
        self.digest = ffi.new("uint64_t *")
        self.end = ffi.new("uint64_t *")

    def ensure(self, count: int, page_size: int, extra: int = 0) -> None:
        """Room for `count` pages (MIG_BATCH_ROOM) and `extra` bytes more."""
        room = count * (page_size + lib.MIG_BATCH_ROOM_PER_PAGE) + lib.MIG_BATCH_ROOM_FIXED + extra
        if room > len(self.data):
            self.data = ffi.new("uint8_t[]", room)
        if count > self.capacity:
            # Zero and non-zero runs alternate: at most ceil(count / 2) zero runs.
            self.runs = ffi.new("uint32_t[]", 2 * ((count + 1) // 2))
            self.capacity = count


_scratch = _Scratch()


class Packed(NamedTuple):
    zero_runs: list[int]
    data: memoryview
    checksum: int  # checksum(data)


def _check_range(mem_len: int, first_page: int, count: int, page_size: int) -> None:
    if page_size <= 0 or page_size % 64:
        raise ValueError(f"page size {page_size} is not a positive multiple of 64")
    if first_page < 0 or count < 0:
        raise ValueError(f"bad page range first_page={first_page} count={count}")
    if (first_page + count) * page_size > mem_len:
        raise ValueError(f"pages [{first_page}, {first_page + count}) end beyond memory of {mem_len} bytes")


def pack_pages(mem: Buffer, first_page: int, count: int, page_size: int) -> Packed:
    """Split pages [first_page, first_page + count) of `mem` into zero runs and data.

    Returns (zero_runs, data, checksum): zero_runs are flat (start, length)
    pairs relative to first_page, sorted; data is the non-zero pages
    concatenated in order, checksum its digest. `data` is a view into a
    per-thread buffer that the next pack_pages call in the same thread
    overwrites: consume or copy it before then.
    """
    s = _scratch
    with ffi.from_buffer("uint8_t[]", mem) as src:
        _check_range(len(src), first_page, count, page_size)
        s.ensure(count, page_size)
        n = lib.mig_pack_pages(src + first_page * page_size, count, page_size, s.runs, len(s.runs) // 2,
                               s.nruns, s.data, s.digest)
    if n < 0:
        raise os_error(-n, f"mig_pack_pages first_page={first_page} count={count}")
    return Packed(ffi.unpack(s.runs, 2 * s.nruns[0]), memoryview(ffi.buffer(s.data, n)), int(s.digest[0]))


def varint(n: int) -> bytes:
    """`n` as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_batch(mem: Buffer, first_page: int, count: int, page_size: int, req_id: int) -> bytes:
    """Pages [first_page, first_page + count) of `mem` as a serialized raw PageBatch.

    One native call does it all (on the source's urgent path every call
    that releases the GIL costs a wait to get it back); the pages are copied
    into place once, then once more into the bytes returned.
    """
    s = _scratch
    with ffi.from_buffer("uint8_t[]", mem) as src:
        _check_range(len(src), first_page, count, page_size)
        s.ensure(count, page_size)
        start = lib.mig_encode_batch(src + first_page * page_size, count, page_size, req_id, first_page, s.runs,
                                     len(s.runs) // 2, s.data, len(s.data), s.end)
    if start < 0:
        raise os_error(-start, f"mig_encode_batch first_page={first_page} count={count}")
    return ffi.buffer(s.data + start, s.end[0] - start)[:]


def encode_runs(mem: Buffer, runs: Sequence[tuple[int, int]], page_size: int, req_id: int, field_key: int) -> bytes:
    """Raw PageBatch messages, one per run of `mem`'s pages, each as the length-delimited field `field_key` of
    an enclosing message: one native call for many short batches (a scattered set's)."""
    s = _scratch
    pages = sum(count for _, count in runs)
    flat = ffi.new("uint64_t[]", [v for run in runs for v in run])
    with ffi.from_buffer("uint8_t[]", mem) as src:
        s.ensure(pages, page_size, len(runs) * (lib.MIG_BATCH_ROOM_FIXED + lib.MIG_FIELD_ROOM))
        n = lib.mig_encode_runs(src, len(src) // page_size, flat, len(runs), page_size, req_id, field_key, s.runs,
                                len(s.runs) // 2, s.data, len(s.data))
    if n < 0:
        raise os_error(-n, f"mig_encode_runs of {len(runs)} runs, {pages} pages")
    return ffi.buffer(s.data, n)[:]


def checksum(data: Buffer) -> int:
    """64-bit digest of packed page data (native, several GB/s): a batch's integrity check."""
    with ffi.from_buffer("uint8_t[]", data) as buf:
        return int(lib.mig_digest(buf, len(buf)))


def expand_pages(count: int, page_size: int, zero_runs: Sequence[int], data: Buffer) -> bytes:
    """The `count` pages that pack_pages described as (zero_runs, data)."""
    if len(zero_runs) % 2:
        raise ValueError("zero_runs must hold (start, length) pairs")
    out = bytearray(count * page_size)
    view = memoryview(data).cast("B")
    pos = 0  # next data byte
    page = 0  # next page to fill
    for start, length in [*zip(zero_runs[::2], zero_runs[1::2]), (count, 0)]:
        if start < page or start + length > count:
            raise ValueError(f"bad zero run ({start}, {length}) in {count} pages")
        nbytes = (start - page) * page_size
        if pos + nbytes > len(view):
            raise ValueError(f"{len(view)} data bytes, fewer than the non-zero pages need")
        out[page * page_size:start * page_size] = view[pos:pos + nbytes]
        pos += nbytes
        page = start + length
    if pos != len(view):
        raise ValueError(f"{len(view)} data bytes for {pos // page_size} non-zero pages")
    return bytes(out)
