"""The fault loop step and the batch installer over one guest address space.

The step (`mig_read_faults`) and the installer (`mig_install`) are C
(native/uffd.c), called with the GIL released; this module holds the
argument checks and errors that name the operation.
"""
from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from migrate._native import ffi, lib
from migrate.bitmap import SharedBitmap
from migrate.errors import os_error
from migrate.uffd.fd import Buffer, Uffd
from migrate.uffd.features import PAGE_SIZE
from migrate.uffd.region import Region


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
    lazy: int = 0  # of the zeroed, pages only marked received: holes that read as zeros (FaultReader.lazy_zero)

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
            if r.page_size != page_size or r.base % page_size or r.size % page_size or r.size <= 0 \
                    or r.offset % page_size or r.offset < 0:
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

    def lazy_zero(self) -> None:
        """Leave zero pages as holes from now on: installs only mark them received, and a fault
        on one is answered with a zero page then. Only for memory whose holes read as zeros
        (a fresh memfd mapped shared, anonymous memory), and which is unregistered at the end."""
        lib.mig_space_lazy_zero(self._space, 1)

    @property
    def features(self) -> int:
        """The features the userfaultfd's creator enabled (0 if the kernel does not say)."""
        return int(lib.mig_space_features(self._space))

    def protect_installs(self, on: bool) -> None:
        """With `on`, installs write-protect the pages they fill, so a scan sees which ones the guest writes.

        Only on a fd created with WP_ASYNC_FEATURES over a range registered
        MISSING|WP (the guest runner's, where the kernel has them): else the
        installs would fail. See mig_space_set_install_wp.
        """
        if self._space is not None:
            lib.mig_space_set_install_wp(self._space, 1 if on else 0)

    def _bitmap_ptr(self, bitmap: SharedBitmap) -> object:
        """The bitmap's cffi pointer, once it is known to cover every page (C does not check)."""
        if bitmap.nbits < self.npages:
            raise ValueError(f"bitmap of {bitmap.nbits} bits for {self.npages} pages")
        return bitmap.ptr

    def read(self, bitmap: SharedBitmap, timeout_ms: int, wake_fd: int = -1) -> list[tuple[int, int, int]]:
        """Wait up to timeout_ms for faults, or for the eventfd `wake_fd` (-1: none) to be
        signalled (it is read empty here); return [(page, waiters, t_ns)] for missing pages.

        Faults on pages already set in `bitmap` are answered in C and not
        returned (woken, or given a zero page if the page was discarded
        since); events are handled in C. t_ns is CLOCK_MONOTONIC
        (time.monotonic_ns) when the fault was read. An empty list means a
        timeout (or a signal: call again).
        """
        n = lib.mig_read_faults(self._space, self._bitmap_ptr(bitmap), self._pages, self._waiters, self._t_ns,
                                self._max, timeout_ms, wake_fd, self._stats)
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
                return [Region(out[i].base, out[i].size, out[i].first_page * self.page_size, self.page_size)
                        for i in range(n)]
            room = n

    def install(self, bitmap: SharedBitmap, first_page: int, count: int, zero_runs: Sequence[int],
                data: Buffer) -> InstallStats:
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


def install_stats(st: Any) -> InstallStats:
    """An InstallStats from the native struct mig_install_stats."""
    return InstallStats(st.copied, st.zeroed, st.skipped, st.eexist, st.ioctls, st.done_ns, st.lazy)
