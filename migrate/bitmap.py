"""The received-pages bitmap, shareable across processes.

The destination's urgent (fault) process and bulk process both install pages
and both consult the bitmap, so it lives in a memfd that one process creates
and the others attach to by fd (SCM_RIGHTS). The words are updated only with
atomic operations in C (native/bitmap.c); this class adds bounds checks and
the wire format.
"""
from __future__ import annotations

import os

from migrate._native import ffi, lib
from migrate.errors import os_error

_WORD_BYTES = 8


def _nbytes(nbits: int) -> int:
    """Bytes of whole uint64 words holding nbits bits."""
    return (nbits + 63) // 64 * _WORD_BYTES


class SharedBitmap:
    """A bitmap of `nbits` bits in shared memory; bit i is page i.

    `ptr` is the words as a cffi ``uint64_t *`` for native calls (valid as
    long as this object lives). Wire format (to_bytes/load_bytes): the uint64 words in
    little-endian order, i.e. byte i // 8 holds bit i at position i % 8,
    padded to whole words with zero bits.
    """

    def __init__(self, fd: int, nbits: int) -> None:
        """Map `nbits` bits of the memfd `fd` (taking ownership of fd); use create() or attach()."""
        if nbits < 0:
            raise ValueError(f"bitmap size {nbits} bits is negative")
        self._fd = fd
        self._nbits = nbits
        size = max(_nbytes(nbits), _WORD_BYTES)  # mmap refuses length 0
        have = os.fstat(fd).st_size
        if have < size:
            raise ValueError(f"bitmap memfd holds {have} bytes, {nbits} bits need {size}")
        # Mapped natively, not with mmap.mmap (which keeps a dup of the fd): the
        # mapping outlives close() and goes with this object (see close()).
        ptr = lib.mig_bitmap_map(fd, size)
        if ptr == ffi.NULL:
            raise os_error(ffi.errno, f"mapping a bitmap of {nbits} bits")
        self.ptr = ffi.gc(ptr, lambda p, n=size: lib.mig_bitmap_unmap(p, n), size)
        self._mm = ffi.buffer(self.ptr, size)

    @classmethod
    def create(cls, nbits: int) -> SharedBitmap:
        """A new all-clear bitmap in a fresh memfd."""
        fd = os.memfd_create("migrate-bitmap", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(_nbytes(nbits), _WORD_BYTES))
            return cls(fd, nbits)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, nbits: int) -> SharedBitmap:
        """Map a bitmap another process created; takes ownership of `fd` (e.g. one received by SCM_RIGHTS)."""
        try:
            return cls(fd, nbits)
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        """The memfd, to pass to another process."""
        return self._fd

    @property
    def nbits(self) -> int:
        return self._nbits

    def _check_range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self._nbits:
            raise IndexError(f"bits [{first}, {first + count}) outside a bitmap of {self._nbits} bits")

    def set_range(self, first: int, count: int = 1) -> None:
        self._check_range(first, count)
        lib.mig_bitmap_set(self.ptr, first, count)

    def clear_range(self, first: int, count: int = 1) -> None:
        self._check_range(first, count)
        lib.mig_bitmap_clear(self.ptr, first, count)

    def test(self, bit: int) -> bool:
        self._check_range(bit, 1)
        return bool(lib.mig_bitmap_test(self.ptr, bit))

    def count(self) -> int:
        """Number of set bits."""
        return lib.mig_bitmap_count(self.ptr, self._nbits)

    def next_clear(self, start: int = 0) -> int:
        """First clear bit at or after `start`, or nbits if there is none."""
        return lib.mig_bitmap_next_clear(self.ptr, self._nbits, max(start, 0))

    def next_set(self, start: int = 0) -> int:
        """First set bit at or after `start`, or nbits if there is none."""
        return lib.mig_bitmap_next_set(self.ptr, self._nbits, max(start, 0))

    def take(self, mask: SharedBitmap) -> int:
        """Clear the bits set in `mask`; returns how many of them were set here (atomically, word by word)."""
        return lib.mig_bitmap_take(self.ptr, mask.ptr, min(self._nbits, mask.nbits))

    def runs(self, most: int) -> list[tuple[int, int]]:
        """The first `most` runs of set bits, (first, count) in order."""
        out: list[tuple[int, int]] = []
        bit = self.next_set(0)
        while bit < self.nbits and len(out) < most:
            end = self.next_clear(bit)
            out.append((bit, end - bit))
            bit = self.next_set(end)
        return out

    def is_full(self) -> bool:
        return self.next_clear(0) == self._nbits

    def to_bytes(self) -> bytes:
        """A snapshot in the wire format (not atomic as a whole: each word is read once)."""
        return bytes(self._mm[: _nbytes(self._nbits)])

    def load_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Replace the contents with `data` in the wire format.

        Plain stores: call it while no other process writes the bitmap.
        """
        want = _nbytes(self._nbits)
        if len(data) != want:
            raise ValueError(f"bitmap of {self._nbits} bits takes {want} bytes, got {len(data)}")
        tail = self._nbits % 64
        if tail and int.from_bytes(data[-_WORD_BYTES:], "little") >> tail:
            raise ValueError(f"bits set beyond the bitmap's {self._nbits} bits")
        self._mm[:want] = data

    def close(self) -> None:
        """Close the memfd now; the mapping goes with the last reference to this object.

        Not unmapped here: a thread may still walk the bitmap after its run
        released it (a gRPC request iterator whose call just ended, a policy
        finishing its step), and reading unmapped memory would kill the whole
        agent. Other processes' mappings stay valid either way.
        """
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> SharedBitmap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def claim_runs(received: SharedBitmap, asked: object, start: int, stop: int, max_pages: int,
               max_runs: int) -> tuple[list[tuple[int, int]], int]:
    """Runs (first, count) of pages clear in `received` and in `asked` (a bitmap's `ptr`, or any uint64_t
    array as long), in [start, stop), at most max_pages in max_runs runs, set in `asked` as they are
    claimed (mig_bitmap_claim: one native call); and where to go on from."""
    runs = ffi.new("uint64_t[]", 2 * max_runs)
    nxt = ffi.new("uint64_t *")
    n = lib.mig_bitmap_claim(received.ptr, asked, start, stop, max_pages, max_runs, runs, nxt)
    return [(runs[2 * i], runs[2 * i + 1]) for i in range(n)], int(nxt[0])

