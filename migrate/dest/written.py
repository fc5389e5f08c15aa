"""Which pages the guest wrote on the destination: a policy's signal that pages it brought are used.

Without it the fault path sees a prefetched page used only when the guest
faults on it while it travels, or faults right past it; a page the guest
uses and leaves is never seen, and under scattered accesses nothing is. So,
while a policy asks for it (`Policy.watches_use`) or the run records its
working set, the run's installs write-protect the pages they fill
(FaultReader.protect_installs) on the userfaultfd the runner registered
MISSING|WP with asynchronous write-protect (migrate.guest.runner, told so
by --watch-writes: such a range costs a walk of its page tables to unregister): the
guest's first write to such a page only clears the protection, the kernel
never stops it, and one PAGEMAP_SCAN on the runner's /proc/PID/pagemap reads
the written pages and protects them again (migrate.uffd.scan_written, as the
source's dirty tracking does). A read leaves no trace: this is writes only.
A page mapped without the protection (installed before it was on, written
into the memfd by pre-copy, given as a zero page after a discard) reads as
written at its first scan, once: it was mapped because the guest touched it.
"""
from __future__ import annotations

import logging
import os

from migrate.bitmap import SharedBitmap
from migrate.uffd import WP_ASYNC_FEATURES, FaultReader, scan_written

log = logging.getLogger(__name__)


class WrittenPages:
    """Pages of a runner's RAM written since the last scan, found by PAGEMAP_SCAN."""

    def __init__(self, reader: FaultReader, pid: int, page_count: int) -> None:
        self._reader = reader
        self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._fresh = SharedBitmap.create(page_count)
        self.total = 0     # pages found written, over all scans
        self.failed = ""   # why scanning stopped (the kernel or the runner refused), "" while it works

    @classmethod
    def open(cls, reader: FaultReader, pid: int, page_count: int) -> WrittenPages | None:
        """Protect the installs from now on and scan; None where the runner's userfaultfd cannot
        (an fd without asynchronous write-protect: an older kernel, a restore client's own fd)."""
        if reader.features & WP_ASYNC_FEATURES != WP_ASYNC_FEATURES:
            return None
        try:
            out = cls(reader, pid, page_count)
        except OSError as err:
            log.info("no written-page scan of runner %d: %s", pid, err.strerror)
            return None
        reader.protect_installs(True)
        return out

    def scan(self) -> SharedBitmap:
        """The pages written since the last scan (a bitmap this object reuses: read it before the next scan)."""
        self._fresh.clear_range(0, self._fresh.nbits)
        if self.failed:
            return self._fresh
        try:
            for r in self._reader.current_regions():
                self.total += scan_written(self._pagemap, r.base, r.size, r.page_size, self._fresh, r.first_page,
                                           present_only=True)
        except OSError as err:  # the runner went away, or this kernel cannot: the run goes on without it
            self.failed = str(err)
            self._reader.protect_installs(False)
            log.info("written-page scan stopped: %s", err)
        return self._fresh

    def close(self) -> None:
        """Stop protecting installs (pages installed protected stay so until written or released)."""
        self._reader.protect_installs(False)
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
        self._fresh.close()
