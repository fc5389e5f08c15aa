"""userfaultfd for Python: register memory, read its faults, resolve them.

A typed binding of Linux's userfaultfd over the project's native layer
(native/uffd.c, through cffi, every call with the GIL released), usable on
its own, apart from migrations:

- :class:`Uffd`: one userfaultfd; :meth:`Uffd.create` checks the features
  against the kernel first; ``register``/``unregister``, ``copy``,
  ``zeropage``, ``wake``, ``writeprotect`` and ``move`` are one ioctl each.
- :class:`FaultReader`: the fault loop's step over a guest address space of
  :class:`Region` s: reads faults (non-cooperative events handled in C),
  answers those on pages a shared bitmap says are present, and installs
  batches of pages (:meth:`FaultReader.install`).
- :func:`scan_written`: PAGEMAP_SCAN, the pages a process wrote since they
  were last write-protected (asynchronous write-protect, Linux 6.7+).
- The kernel's numbers (``MODE_*``, ``FEATURE_*``), :func:`probe_features`
  and :func:`feature_names`.

Every kernel refusal is an OSError carrying the errno and naming the ioctl
and range. docs/uffd.md has a complete example.
"""
from migrate.uffd.faults import (
    EVENT_COUNTERS,
    FaultReader,
    FaultStats,
    InstallStats,
    install_stats,
)
from migrate.uffd.fd import Uffd
from migrate.uffd.features import (
    COPY_MODE_DONTWAKE,
    COPY_MODE_WP,
    EVENT_FEATURES,
    FEATURE_EVENT_FORK,
    FEATURE_EVENT_REMAP,
    FEATURE_EVENT_REMOVE,
    FEATURE_EVENT_UNMAP,
    FEATURE_EXACT_ADDRESS,
    FEATURE_MINOR_HUGETLBFS,
    FEATURE_MINOR_SHMEM,
    FEATURE_MISSING_HUGETLBFS,
    FEATURE_MISSING_SHMEM,
    FEATURE_MOVE,
    FEATURE_PAGEFAULT_FLAG_WP,
    FEATURE_POISON,
    FEATURE_SIGBUS,
    FEATURE_THREAD_ID,
    FEATURE_WP_ASYNC,
    FEATURE_WP_HUGETLBFS_SHMEM,
    FEATURE_WP_UNPOPULATED,
    MODE_MINOR,
    MODE_MISSING,
    MODE_WP,
    MOVE_MODE_ALLOW_SRC_HOLES,
    MOVE_MODE_DONTWAKE,
    PAGE_SIZE,
    WP_ASYNC_FEATURES,
    WRITEPROTECT_MODE_DONTWAKE,
    WRITEPROTECT_MODE_WP,
    ZEROPAGE_MODE_DONTWAKE,
    feature_names,
    probe_features,
)
from migrate.uffd.pagemap import scan_written
from migrate.uffd.region import Region

__all__ = [
    "COPY_MODE_DONTWAKE", "COPY_MODE_WP", "EVENT_COUNTERS", "EVENT_FEATURES", "FEATURE_EVENT_FORK",
    "FEATURE_EVENT_REMAP", "FEATURE_EVENT_REMOVE", "FEATURE_EVENT_UNMAP", "FEATURE_EXACT_ADDRESS",
    "FEATURE_MINOR_HUGETLBFS", "FEATURE_MINOR_SHMEM", "FEATURE_MISSING_HUGETLBFS", "FEATURE_MISSING_SHMEM",
    "FEATURE_MOVE", "FEATURE_PAGEFAULT_FLAG_WP", "FEATURE_POISON", "FEATURE_SIGBUS", "FEATURE_THREAD_ID",
    "FEATURE_WP_ASYNC", "FEATURE_WP_HUGETLBFS_SHMEM", "FEATURE_WP_UNPOPULATED", "MODE_MINOR", "MODE_MISSING",
    "MODE_WP", "MOVE_MODE_ALLOW_SRC_HOLES", "MOVE_MODE_DONTWAKE", "PAGE_SIZE", "WP_ASYNC_FEATURES",
    "WRITEPROTECT_MODE_DONTWAKE", "WRITEPROTECT_MODE_WP", "ZEROPAGE_MODE_DONTWAKE", "FaultReader", "FaultStats",
    "InstallStats", "Region", "Uffd", "feature_names", "install_stats", "probe_features", "scan_written",
]
