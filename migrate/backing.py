"""Guest RAM kept in files, in the one directory an agent is given (`--backing-dir`).

A file outlives its agent, so a source agent restarted mid-post-copy can
serve the rest of a guest's pages from it (docs/architecture.md, "When the
source agent dies"). An agent may run as root, and any local process can
call it when it has no token, so a client never names a path: only a plain
file name (NAME), created in the agent's directory, relative to the
directory's file descriptor, exclusively (never an existing file, never
through a symlink), and removed when its guest is stopped or migrated away.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from migrate import errors

#: A backing file name: 1-64 letters, digits, '.', '-' or '_', not starting with '.'
#: (no hidden files, no '.' or '..', no slashes: the file is always directly in the directory).
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 letters, digits, '.', '-' or '_', not starting with '.'"


def file_name(backing: str) -> str:
    """NAME of a backing "file:NAME", or ValueError with one line saying what is allowed."""
    kind, sep, name = backing.partition(":")
    if kind != "file" or not sep:
        raise errors.BadRequest(f"bad backing {backing[:80]!r}: use file:NAME")
    if not _NAME.fullmatch(name):
        raise errors.BadRequest(f"bad backing file name {name[:80]!r}: a plain file name in the agent's --backing-dir, "
                         f"{NAME_RULE}")
    return name


class BackingDir:
    """The directory backing files live in, held open: every file is opened relative to it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise errors.BadRequest(f"cannot use backing directory {self.path}: {err.strerror}") from None

    def create(self, backing: str, size: int) -> tuple[BackingFile, int]:
        """A new file for "file:NAME", sized to `size`, and an fd on it.

        FileExistsError if NAME exists in any form (a file, a symlink, a
        directory): an agent never writes into a file it did not create.
        """
        name = file_name(backing)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.fd)
        except FileExistsError:
            raise errors.AlreadyExists(f"backing file {name} already exists in {self.path}: "
                                       "choose another name (an agent never reuses a file)") from None
        except OSError as err:
            cls = errors.PermissionDenied if isinstance(err, PermissionError) else errors.FailedPrecondition
            raise cls(f"cannot create backing file {name} in {self.path}: {err.strerror}") from None
        made = BackingFile(self, name)
        try:
            os.ftruncate(fd, size)
        except OSError as err:
            os.close(fd)
            made.remove()
            raise errors.ResourceExhausted(f"cannot size backing file {name} to {size} bytes: {err.strerror}") from None
        return made, fd

    def reopen(self, name: str, size: int) -> tuple[BackingFile, int]:
        """The existing file NAME (a restarted agent's guest), which must be a regular file of `size` bytes."""
        file_name(f"file:{name}")
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as err:
            raise errors.BadRequest(f"cannot open backing file {name} in {self.path}: {err.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            os.close(fd)
            raise errors.BadRequest(f"backing file {name} in {self.path} is not a regular file of {size} bytes")
        return BackingFile(self, name), fd


@dataclass(frozen=True)
class BackingFile:
    """One guest's RAM file: NAME in `dir`."""

    dir: BackingDir
    name: str

    @property
    def spec(self) -> str:
        """As a client names it: "file:NAME"."""
        return f"file:{self.name}"

    def remove(self) -> None:
        try:
            os.unlink(self.name, dir_fd=self.dir.fd)
        except FileNotFoundError:
            pass
