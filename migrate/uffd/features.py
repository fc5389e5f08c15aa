"""The userfaultfd kernel interface's numbers: register and ioctl modes,
features, and what this kernel supports.

The values are the kernel's (<linux/userfaultfd.h>, or native/uffd.h's
fallbacks for features newer than the installed headers), read from the
compiled native layer.
"""
from __future__ import annotations

import mmap

from migrate._native import ffi, lib
from migrate.errors import os_error

PAGE_SIZE = mmap.PAGESIZE

MODE_MISSING: int = lib.UFFDIO_REGISTER_MODE_MISSING
MODE_WP: int = lib.UFFDIO_REGISTER_MODE_WP
MODE_MINOR: int = lib.UFFDIO_REGISTER_MODE_MINOR

COPY_MODE_DONTWAKE: int = lib.UFFDIO_COPY_MODE_DONTWAKE
COPY_MODE_WP: int = lib.UFFDIO_COPY_MODE_WP
ZEROPAGE_MODE_DONTWAKE: int = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
WRITEPROTECT_MODE_WP: int = lib.UFFDIO_WRITEPROTECT_MODE_WP
WRITEPROTECT_MODE_DONTWAKE: int = lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
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

#: What asynchronous write tracking takes (PAGEMAP_SCAN finds the pages written since they were protected).
WP_ASYNC_FEATURES = FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM

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
