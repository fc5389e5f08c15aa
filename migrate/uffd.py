"""userfaultfd for post-copy: the fd, the fault-reading step, the installer.

The ioctls, the fault loop step (`mig_read_faults`) and the batch installer
(`mig_install`) are C (native/uffd.c), called through cffi with the GIL
released; this module holds the policy: which features to require, argument
checks, and errors that name the operation (every native failure becomes an
OSError with the errno and the ioctl and range that failed).

userfaultfd ioctls act on the memory of the process that created the fd, from
whichever process holds it: the guest runner creates and registers the fd,
the agent resolves its faults with a copy received over SCM_RIGHTS.
"""
from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from migrate.errors import os_error
from migrate._native import ffi, lib
from migrate.bitmap import SharedBitmap

PAGE_SIZE = mmap.PAGESIZE

MODE_MISSING: int = lib.UFFDIO_REGISTER_MODE_MISSING
MODE_WP: int = lib.UFFDIO_REGISTER_MODE_WP
MODE_MINOR: int = lib.UFFDIO_REGISTER_MODE_MINOR

COPY_MODE_DONTWAKE: int = lib.UFFDIO_COPY_MODE_DONTWAKE
COPY_MODE_WP: int = lib.UFFDIO_COPY_MODE_WP
MOVE_MODE_DONTWAKE: int = lib.UFFDIO_MOVE_MODE_DONTWAKE
MOVE_MODE_ALLOW_SRC_HOLES: int = lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES

FEATURE_PAGEFAULT_FLAG_WP: int = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
FEATURE_EVENT_FORK: int = lib.UFFD_FEATURE_EVENT_FORK
FEATURE_EVENT_REMAP: int = lib.UFFD_FEATURE_EVENT_REMAP
FEATURE_EVENT_REMOVE: int = lib.UFFD_FEATURE_EVENT_REMOVE
FEATURE_MISSING_HUGETLBFS: int = lib.UFFD_FEATURE_MISSING_HUGETLBFS
FEATURE_MISSING_SHMEM: int = lib.UFFD_FEATURE_MISSING_SHMEM
FEATURE_EVENT_UNMAP: int = lib.UFFD_FEATURE_EVENT_UNMAP
FEATURE_SIGBUS: int = lib.UFFD_FEATURE_SIGBUS
FEATURE_THREAD_ID: int = lib.UFFD_FEATURE_THREAD_ID
FEATURE_MINOR_HUGETLBFS: int = lib.UFFD_FEATURE_MINOR_HUGETLBFS
FEATURE_MINOR_SHMEM: int = lib.UFFD_FEATURE_MINOR_SHMEM
FEATURE_EXACT_ADDRESS: int = lib.UFFD_FEATURE_EXACT_ADDRESS
FEATURE_WP_HUGETLBFS_SHMEM: int = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
FEATURE_WP_UNPOPULATED: int = lib.UFFD_FEATURE_WP_UNPOPULATED
FEATURE_POISON: int = lib.UFFD_FEATURE_POISON
FEATURE_WP_ASYNC: int = lib.UFFD_FEATURE_WP_ASYNC
FEATURE_MOVE: int = lib.UFFD_FEATURE_MOVE

#: The non-cooperative events: the guest's madvise, munmap, mremap and fork, told to the handler.
EVENT_FEATURES = FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP | FEATURE_EVENT_REMAP | FEATURE_EVENT_FORK

_FEATURE_NAMES = {value: name[len("FEATURE_"):] for name, value in globals().items() if name.startswith("FEATURE_")}


def feature_names(mask: int) -> str:
    """'MISSING_SHMEM|WP_ASYNC' for a feature mask; unknown bits in hex."""
    names = [name for bit, name in sorted(_FEATURE_NAMES.items()) if mask & bit]
    unknown = mask & ~sum(_FEATURE_NAMES)
    if unknown:
        names.append(hex(unknown))
    return "|".join(names) or "none"


def probe_features() -> int:
    """The userfaultfd features this kernel supports (UFFD_FEATURE_* mask)."""
    features, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    r = lib.mig_uffd_probe(features, ioctls)
    if r < 0:
        raise os_error(-r, "userfaultfd probe (UFFDIO_API features=0)")
    return features[0]


@dataclass(frozen=True)
class Region:
    """Guest memory as mapped in the guest process: host virtual base and size
    in bytes, and the global index of its first page."""

    base: int
    size: int
    first_page: int


@dataclass
class InstallStats:
    """What one install did, in pages (ioctls: install ioctls issued), and
    when it was done (done_ns, time.monotonic_ns's clock): the moment the
    guest's faulting threads could run again, before this process got back
    to Python."""

    copied: int
    zeroed: int
    skipped: int
    eexist: int
    ioctls: int
    done_ns: int

    @property
    def installed(self) -> int:
        """Pages this install put in place (not counting pages found present)."""
        return self.copied + self.zeroed


@dataclass
class FaultStats:
    """Cumulative counts of a FaultReader: messages read, faults on pages
    already received (woken at once), events of a kind not known."""

    msgs: int
    woken: int
    other_events: int


class Uffd:
    """A userfaultfd. Owns the fd: close() (or the context manager) closes it.

    `page_size` is the page size of the memory it serves: a copy that meets a
    page already present skips that page and goes on (see mig_uffd_copy).
    """

    def __init__(self, fd: int, features: int = 0, page_size: int = PAGE_SIZE) -> None:
        """Wrap an fd whose UFFDIO_API its creator already did (e.g. one received by SCM_RIGHTS)."""
        self._fd = fd
        self.features = features
        self.page_size = page_size

    @classmethod
    def create(cls, features: int = 0, nonblock: bool = True, page_size: int = PAGE_SIZE) -> Uffd:
        """Open a userfaultfd for this process's memory with `features` enabled.

        Checks the features against the kernel first: UFFDIO_API can be
        tried only once per fd and its EINVAL would not say which is missing.
        """
        missing = features & ~probe_features()
        if missing:
            raise OSError(errno.EOPNOTSUPP,
                          f"UFFDIO_API: the kernel lacks userfaultfd features {feature_names(missing)}")
        fd = lib.mig_uffd_open(int(nonblock))
        if fd < 0:
            raise os_error(-fd, f"userfaultfd(nonblock={nonblock})")
        got, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        r = lib.mig_uffd_api(fd, features, got, ioctls)
        if r < 0:
            os.close(fd)
            raise os_error(-r, f"UFFDIO_API features={feature_names(features)}")
        return cls(fd, got[0], page_size)

    @property
    def fd(self) -> int:
        return self._fd

    def register(self, addr: int, length: int, mode: int = MODE_MISSING) -> int:
        """Register [addr, addr + length); returns the ioctls allowed on the range."""
        ioctls = ffi.new("uint64_t *")
        r = lib.mig_uffd_register(self._fd, addr, length, mode, ioctls)
        if r < 0:
            raise os_error(-r, f"UFFDIO_REGISTER start=0x{addr:x} len={length} mode={mode}")
        return ioctls[0]

    def unregister(self, addr: int, length: int) -> None:
        r = lib.mig_uffd_unregister(self._fd, addr, length)
        if r < 0:
            raise os_error(-r, f"UFFDIO_UNREGISTER start=0x{addr:x} len={length}")

    def copy(self, dst: int, buf: bytes | bytearray | memoryview, mode: int = 0) -> int:
        """Install `buf` at dst; returns the bytes newly copied (present pages are skipped)."""
        with ffi.from_buffer(buf) as src:
            r = lib.mig_uffd_copy(self._fd, dst, src, len(src), mode, self.page_size)
            if r < 0:
                raise os_error(-r, f"UFFDIO_COPY dst=0x{dst:x} len={len(src)}")
        return r

    def zeropage(self, addr: int, length: int, mode: int = 0) -> int:
        """Install zero pages; returns the bytes newly zeroed (pages already present are skipped)."""
        r = lib.mig_uffd_zeropage(self._fd, addr, length, mode, self.page_size)
        if r < 0:
            raise os_error(-r, f"UFFDIO_ZEROPAGE start=0x{addr:x} len={length}")
        return r

    def wake(self, addr: int, length: int) -> None:
        r = lib.mig_uffd_wake(self._fd, addr, length)
        if r < 0:
            raise os_error(-r, f"UFFDIO_WAKE start=0x{addr:x} len={length}")

    def writeprotect(self, addr: int, length: int, protect: bool) -> None:
        """Set or clear write protection; clearing it wakes threads blocked on it."""
        mode = lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        r = lib.mig_uffd_writeprotect(self._fd, addr, length, mode)
        if r < 0:
            raise os_error(-r, f"UFFDIO_WRITEPROTECT start=0x{addr:x} len={length} protect={protect}")

    def move(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """Move pages (anonymous private memory) from src to dst; returns the bytes moved."""
        r = lib.mig_uffd_move(self._fd, dst, src, length, mode)
        if r < 0:
            raise os_error(-r, f"UFFDIO_MOVE dst=0x{dst:x} src=0x{src:x} len={length}")
        return r

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Uffd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The non-cooperative event counters of a space (struct mig_event_stats), as reported.
EVENT_COUNTERS = ("remove", "removed_pages", "unmap", "unmapped_pages", "remap", "remapped_pages", "fork",
                  "zero_served", "deferred")


class FaultReader:
    """The fault loop step and the batch installer over one guest address space.

    The space (native/uffd.c, struct mig_space) holds the region table, which
    the guest's mremap and munmap change (UFFD_EVENT_REMAP, UNMAP), and the
    lock that keeps installs and event handling apart (see native/uffd.h):
    read() handles the events it reads, and every installer of the run goes
    through target(), so all of them see one table. read() reuses
    preallocated output arrays: one FaultReader per reading thread. install()
    allocates per call and may run from any thread sharing the bitmap.
    """

    def __init__(self, uffd: Uffd | int, regions: Sequence[Region], page_size: int = PAGE_SIZE,
                 max_faults: int = 256) -> None:
        """`uffd` (a Uffd or its fd) stays the caller's to close.

        max_faults bounds the distinct pages one read() returns.
        """
        if not regions:
            raise ValueError("no regions")
        for r in regions:
            if r.base % page_size or r.size % page_size or r.size <= 0 or r.first_page < 0:
                raise ValueError(f"{r} is not whole pages of {page_size} bytes")
        self._fd = uffd.fd if isinstance(uffd, Uffd) else uffd
        self.page_size = page_size
        self.regions = tuple(regions)
        self.npages = max(r.first_page + r.size // page_size for r in regions)
        table = ffi.new("struct mig_region[]", [(r.base, r.size, r.first_page) for r in regions])
        space = lib.mig_space_new(self._fd, table, len(regions), page_size)
        if space == ffi.NULL:
            raise MemoryError("no memory for a userfaultfd's address space")
        self._space = ffi.gc(space, lib.mig_space_free)
        self._max = max_faults
        self._pages = ffi.new("uint64_t[]", max_faults)
        self._waiters = ffi.new("uint32_t[]", max_faults)
        self._t_ns = ffi.new("uint64_t[]", max_faults)
        self._stats = ffi.new("struct mig_fault_stats *")

    @property
    def fd(self) -> int:
        return self._fd

    def close(self) -> None:
        """Free the space now (else when the reader is collected); no path may use it afterwards."""
        if self._space is not None:
            ffi.release(self._space)
            self._space = None

    @property
    def features(self) -> int:
        """The features the userfaultfd's creator enabled (0 if the kernel does not say)."""
        return int(lib.mig_space_features(self._space))

    def _bitmap_ptr(self, bitmap: SharedBitmap) -> object:
        """The bitmap's cffi pointer, once it is known to cover every page (C does not check)."""
        if bitmap.nbits < self.npages:
            raise ValueError(f"bitmap of {bitmap.nbits} bits for {self.npages} pages")
        return bitmap.ptr

    def read(self, bitmap: SharedBitmap, timeout_ms: int) -> list[tuple[int, int, int]]:
        """Wait up to timeout_ms for faults; return [(page, waiters, t_ns)] for missing pages.

        Faults on pages already set in `bitmap` are answered in C and not
        returned (woken, or given a zero page if the page was discarded
        since); events are handled in C. t_ns is CLOCK_MONOTONIC
        (time.monotonic_ns) when the fault was read. An empty list means a
        timeout (or a signal: call again).
        """
        n = lib.mig_read_faults(self._space, self._bitmap_ptr(bitmap), self._pages, self._waiters, self._t_ns,
                                self._max, timeout_ms, self._stats)
        if n < 0:
            if -n == errno.EINTR:  # let the caller's loop see the signal
                return []
            raise os_error(-n, f"reading faults from userfaultfd {self._fd}")
        pages, waiters, t_ns = self._pages, self._waiters, self._t_ns
        return [(pages[i], waiters[i], t_ns[i]) for i in range(n)]

    def target(self, bitmap: SharedBitmap) -> tuple:
        """(space, bitmap pointer): what native installers take. The space lives as long as this reader."""
        return self._space, self._bitmap_ptr(bitmap)

    @property
    def stats(self) -> FaultStats:
        s = self._stats
        return FaultStats(s.msgs, s.woken, s.other_events)

    def events(self) -> dict[str, int]:
        """The non-cooperative events handled so far, by kind (EVENT_COUNTERS)."""
        ev = ffi.new("struct mig_event_stats *")
        lib.mig_space_events(self._space, ev)
        return {name: int(getattr(ev, name)) for name in EVENT_COUNTERS}

    def current_regions(self) -> list[Region]:
        """The region table as events left it (REMAP moves pieces, UNMAP drops them)."""
        room = 3 * len(self.regions) + 64
        while True:
            out = ffi.new("struct mig_region[]", room)
            n = lib.mig_space_regions(self._space, out, room)
            if n <= room:
                return [Region(out[i].base, out[i].size, out[i].first_page) for i in range(n)]
            room = n

    def install(self, bitmap: SharedBitmap, first_page: int, count: int, zero_runs: Sequence[int],
                data: bytes | bytearray | memoryview) -> InstallStats:
        """Install pages [first_page, first_page + count) shaped as pages.pack_pages makes them.

        Pages already set in `bitmap` are left alone; every page present
        afterwards has its bit set. A page outside the regions raises
        OSError(EINVAL); a guest that is gone raises ProcessLookupError
        (ESRCH) or OSError(ENOSPC).
        """
        if len(zero_runs) % 2:
            raise ValueError("zero_runs must hold (start, length) pairs")
        if not 0 < count < 1 << 32 or first_page + count > bitmap.nbits:  # C trusts the range
            raise ValueError(f"pages [{first_page}, +{count}) outside the bitmap's {bitmap.nbits} pages")
        runs = ffi.new("uint32_t[]", zero_runs if isinstance(zero_runs, (list, tuple)) else list(zero_runs))
        st = ffi.new("struct mig_install_stats *")
        with ffi.from_buffer("uint8_t[]", data) as buf:
            r = lib.mig_install(*self.target(bitmap), first_page, count, runs, len(zero_runs) // 2, buf, len(buf), st)
            if r < 0:
                raise os_error(-r, f"mig_install first_page={first_page} count={count} "
                                   f"zero_runs={len(zero_runs) // 2} data_len={len(buf)}")
        return install_stats(st)


def install_stats(st: object) -> InstallStats:
    """An InstallStats from the native struct mig_install_stats."""
    return InstallStats(st.copied, st.zeroed, st.skipped, st.eexist, st.ioctls, st.done_ns)


def pagemap_scan_written(pagemap_fd: int, start: int, end: int, chunk: int = 1024) -> list[tuple[int, int]]:
    """Pages of [start, end) written since last write-protected, as (start, end) address ranges.

    PAGEMAP_SCAN on an open /proc/PID/pagemap with PM_SCAN_WP_MATCHING |
    PM_SCAN_CHECK_WPASYNC: the same call write-protects them again, so the
    next scan returns only pages written after this one. The range must be
    registered with MODE_WP on a uffd with FEATURE_WP_ASYNC (else EPERM).
    """
    out = ffi.new("uint64_t[]", 2 * chunk)
    walk_end = ffi.new("uint64_t *")
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        n = lib.mig_pagemap_scan_written(pagemap_fd, pos, end, out, chunk, walk_end)
        if n < 0:
            raise os_error(-n, f"PAGEMAP_SCAN start=0x{pos:x} end=0x{end:x}")
        for i in range(n):
            if ranges and ranges[-1][1] == out[2 * i]:
                ranges[-1] = (ranges[-1][0], out[2 * i + 1])
            else:
                ranges.append((out[2 * i], out[2 * i + 1]))
        pos = walk_end[0]
    return ranges
