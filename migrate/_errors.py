"""Turning the native layer's -errno returns into exceptions.

Native calls return >= 0 or -errno. Every raised error carries the errno
(so ``OSError(errno, ...)`` becomes the matching subclass:
ProcessLookupError for ESRCH, FileExistsError for EEXIST, ...) and names the
operation and its arguments, because "Invalid argument" alone says nothing
about which of a dozen ioctls on which range failed.
"""
import os


def os_error(err: int, what: str) -> OSError:
    """The OSError for errno `err` raised by operation `what` (e.g. "UFFDIO_COPY dst=0x7f.. len=4096")."""
    return OSError(err, f"{what}: {os.strerror(err)}")
