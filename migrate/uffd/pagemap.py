"""PAGEMAP_SCAN: the pages a process wrote since they were last write-protected.

The kernel records writes to memory registered with an asynchronous
write-protect userfaultfd (MODE_WP on a fd with FEATURE_WP_ASYNC) without
blocking the writer; one PAGEMAP_SCAN ioctl on /proc/PID/pagemap reads those
pages and protects them again (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC),
so the next scan finds only what was written after this one. The loop over
the kernel's chunks is C (mig_scan_dirty, native/uffd.c); the pages found
land in a bitmap, never in Python lists. Linux 6.7+.
"""
from __future__ import annotations

import errno

from migrate._native import lib
from migrate.bitmap import SharedBitmap
from migrate.errors import os_error

#: errnos that mean "this kernel or registration cannot scan", not a failed scan.
UNSUPPORTED = frozenset({errno.ENOTTY, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP})


def scan_written(pagemap_fd: int, base: int, size: int, page_size: int, bitmap: SharedBitmap,
                 first_page: int = 0, present_only: bool = False) -> int:
    """Set in `bitmap` the pages of [base, base + size) written since the last scan; returns how many.

    `pagemap_fd` is an open /proc/PID/pagemap (of this process or another:
    the scan acts on that process's memory). Page i of the range is bit
    first_page + i. OSError names the ioctl; its errno is in UNSUPPORTED when
    the kernel lacks PAGEMAP_SCAN or the range is not registered WP_ASYNC.
    `present_only`: the kernel counts a missing page (an empty PTE among
    mapped ones) as written; with it, only pages mapped are (for memory
    still being filled, see mig_scan_written_present).
    """
    if base % page_size or size % page_size or first_page + size // page_size > bitmap.nbits:
        raise ValueError(f"range 0x{base:x}+{size} is not whole pages of {page_size} inside the bitmap's "
                         f"{bitmap.nbits} pages from {first_page}")
    scan = lib.mig_scan_written_present if present_only else lib.mig_scan_dirty
    n = scan(pagemap_fd, base, size, page_size, bitmap.ptr, first_page)
    if n < 0:
        raise os_error(-n, f"PAGEMAP_SCAN (PM_SCAN_WP_MATCHING|PM_SCAN_CHECK_WPASYNC) 0x{base:x}+{size}")
    return int(n)
