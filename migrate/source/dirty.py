"""Write tracking on the source: which guest pages changed since the last look.

The guest runner registers its own RAM with an asynchronous write-protect
userfaultfd (UFFD_FEATURE_WP_ASYNC, see `migrate.guest.runner`), so a write
to a protected page is never blocked: the kernel only records it. This agent
then reads and re-protects the written pages in one PAGEMAP_SCAN ioctl on
/proc/PID/pagemap, which acts on the runner's memory from our process. No
fd crosses over: the runner keeps its uffd (the registration lives as long as
it does), we keep the pagemap fd. The runner's control socket serializes
"track" against everything else it does.

A discard is no write: a page sent, then discarded (MADV_REMOVE, a balloon
inflating) while still protected keeps only a write-protect marker, and
PAGEMAP_SCAN reports nothing, though the page now reads zeros and the
destination holds what was sent. So the runner's discard path sets the
page's bits in a second shared bitmap (`removed`, whose memfd goes to the
runner with "track"), after the range is gone, and each scan moves them into
the dirty set: the destination punches the page and fetches it again, as
zeros. (A page written, then discarded, is reported anyway: its zapped PTE
counts as written.)

Scans accumulate into a private bitmap until `take()` hands them out, so a
probe scan never loses a page.
"""
from __future__ import annotations

import os
import time

from migrate._native import lib
from migrate.bitmap import SharedBitmap
from migrate.uffd.pagemap import UNSUPPORTED, scan_written


class TrackingUnavailable(RuntimeError):
    """This kernel or process cannot track writes; pre-copy is impossible."""


class DirtyTracker:
    """Dirty pages of a runner whose RAM [base, base + size) is registered WP_ASYNC."""

    def __init__(self, pid: int, base: int, size: int, page_size: int, removed: SharedBitmap | None = None) -> None:
        """`removed`: the bitmap the runner sets for its guest's discards (owned from now on)."""
        self.base = base
        self.size = size
        self.page_size = page_size
        self.page_count = size // page_size
        try:
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise TrackingUnavailable(f"cannot open /proc/{pid}/pagemap: {err.strerror}") from None
        self._removed = removed
        self._dirty = SharedBitmap.create(self.page_count)
        try:
            self.scan()  # probes PAGEMAP_SCAN; what it finds stays pending
        except TrackingUnavailable:
            self.close()
            raise

    def scan(self) -> tuple[int, float]:
        """Add the pages written or discarded since the previous scan; (pages found, ms taken)."""
        t0 = time.perf_counter()
        try:
            n = scan_written(self._pagemap, self.base, self.size, self.page_size, self._dirty)
        except OSError as err:
            if err.errno in UNSUPPORTED:
                raise TrackingUnavailable(f"{err} (needs Linux 6.7+ and a WP_ASYNC registration)") from None
            raise
        if self._removed is not None:
            n += lib.mig_take_removed(self._removed.ptr, self._dirty.ptr, self.page_count)
        return int(n), (time.perf_counter() - t0) * 1000.0

    def take(self) -> tuple[bytes, int]:
        """The pending dirty set (SharedBitmap wire format) and its page count; then none is pending."""
        data = self._dirty.to_bytes()
        count = self._dirty.count()
        self._dirty.clear_range(0, self.page_count)
        return data, count

    def close(self) -> None:
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
        self._dirty.close()
        if self._removed is not None:
            self._removed.close()
