"""One userfaultfd: open it, register ranges, resolve faults by hand.

Each method is one ioctl (native/uffd.c, the GIL released) and raises
OSError naming the ioctl and the range when the kernel refuses. A
userfaultfd acts on the memory of the process that created it, from
whichever process holds the fd (it may be passed over SCM_RIGHTS, see
migrate.handshake).
"""
from __future__ import annotations

import errno
import os
from typing import Self

from migrate._native import ffi, lib
from migrate.errors import os_error
from migrate.uffd.features import (
    MODE_MISSING,
    PAGE_SIZE,
    WRITEPROTECT_MODE_WP,
    feature_names,
    probe_features,
)

Buffer = bytes | bytearray | memoryview


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

    def copy(self, dst: int, buf: Buffer, mode: int = 0) -> int:
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
        mode = WRITEPROTECT_MODE_WP if protect else 0
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
