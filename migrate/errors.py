"""The errors `migrate` raises, and the gRPC status each travels as.

One hierarchy: every error of the library is a MigrateError. Those an
agent reports (or that talking to one causes) are AgentErrors, and each
kind of refusal has its own class, so a program can tell a missing guest
from a full host without reading messages::

    MigrateError
    └── AgentError                   a failure reported by an agent, or talking to one
        ├── AgentUnreachable         UNAVAILABLE: no answer (worth retrying)
        ├── BadRequest               INVALID_ARGUMENT: the request cannot work as given
        ├── GuestNotFound            NOT_FOUND: no such guest (or run) on that agent
        ├── AlreadyExists            ALREADY_EXISTS: the name (or run, or file) is taken
        ├── FailedPrecondition       FAILED_PRECONDITION: not in this state, role or version
        ├── ResourceExhausted        RESOURCE_EXHAUSTED: no room (memory, call slots)
        ├── PermissionDenied         PERMISSION_DENIED
        ├── Unauthenticated          UNAUTHENTICATED: missing or wrong token
        ├── TimedOut                 DEADLINE_EXCEEDED
        ├── KernelFeatureMissing     UNIMPLEMENTED: the agent's kernel lacks what it needs
        ├── RunFailed                ABORTED: a migration failed; `next_step` says what to do
        └── InternalError            INTERNAL: a bug (the agent logged its traceback)

STATUS is the one table of class -> status code: an agent answers an error
of a class with its code (migrate.agent), and a client turns a status back
into the class (from_status). The native layer's failures are OSErrors
carrying their errno (os_error); an agent answers the errnos that mean "the
kernel cannot" (ENOSYS, EOPNOTSUPP) as KernelFeatureMissing.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

    STATUS: dict[type[AgentError], grpc.StatusCode]  # provided by __getattr__ below, built on first use


class MigrateError(Exception):
    """Base of every error the library raises."""


class AgentError(MigrateError):
    """A failure talking to an agent, or one it reported, phrased for a user (one line).

    `unreachable` tells a transport failure (worth retrying) from a refusal.
    """

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class AgentUnreachable(AgentError, ConnectionError):
    """The agent did not answer: not running, wrong address, or the network is down.

    A ConnectionError too, as a socket's failure to connect is."""

    def __init__(self, message: str) -> None:
        super().__init__(message, unreachable=True)


class BadRequest(AgentError, ValueError):
    """The request cannot work as given (a bad size, name, mode, workload...).

    A ValueError too: the checks that raise it (migrate.validate, ...) serve
    the CLI's option parsing and the agent's request checks alike."""


@contextlib.contextmanager
def bad_request() -> Iterator[None]:
    """Turn a ValueError raised inside into BadRequest (same message).

    For checks shared with code that has no agent and raises plain ValueError
    (GuestSpec.validate, migrate.names.parse, RunOptions.check, parse_size...):
    on a client's input their refusal is the client's bad request."""
    try:
        yield
    except ValueError as err:
        raise BadRequest(str(err)) from None


class GuestNotFound(AgentError):
    """No guest (or migration run) of that name on the agent."""


class AlreadyExists(AgentError):
    """A guest, run or file of that name already exists there."""


class FailedPrecondition(AgentError):
    """Not now, or not here: the guest is being migrated, the agent has another role,
    the client speaks another protocol version..."""


class ResourceExhausted(AgentError):
    """The agent has no room: memory for an incoming guest, or call slots."""


class PermissionDenied(AgentError):
    """The agent may not do it (file permissions, ...)."""


class Unauthenticated(AgentError):
    """The agent refused the caller's credentials (missing or wrong bearer token)."""


class TimedOut(AgentError):
    """The agent did not answer within the call's deadline."""


class KernelFeatureMissing(AgentError):
    """The agent's kernel lacks a feature the operation needs (a userfaultfd feature, ...)."""


class RunFailed(AgentError):
    """A migration that failed, with what to do next: one line naming the command."""

    def __init__(self, message: str, next_step: str = "") -> None:
        super().__init__(message)
        self.next_step = next_step


class InternalError(AgentError):
    """A bug on the agent's side: its log holds the traceback."""


#: The status code each error travels as (by name), and the class a client raises for it.
_STATUS_NAMES: dict[type[AgentError], str] = {
    AgentUnreachable: "UNAVAILABLE",
    BadRequest: "INVALID_ARGUMENT",
    GuestNotFound: "NOT_FOUND",
    AlreadyExists: "ALREADY_EXISTS",
    FailedPrecondition: "FAILED_PRECONDITION",
    ResourceExhausted: "RESOURCE_EXHAUSTED",
    PermissionDenied: "PERMISSION_DENIED",
    Unauthenticated: "UNAUTHENTICATED",
    TimedOut: "DEADLINE_EXCEEDED",
    KernelFeatureMissing: "UNIMPLEMENTED",
    RunFailed: "ABORTED",
    InternalError: "INTERNAL",
}


@functools.cache
def _tables() -> tuple[dict[type[AgentError], grpc.StatusCode], dict[grpc.StatusCode, type[AgentError]]]:
    """(STATUS, its inverse), built on first use: grpc loads only where a status is wanted. The native
    layer raises os_error from here, and a guest runner importing it must not pay for grpc (~0.1 s of
    CPU each, and a drain starts several at once)."""
    import grpc

    status = {cls: grpc.StatusCode[name] for cls, name in _STATUS_NAMES.items()}
    return status, {code: cls for cls, code in status.items()}


def __getattr__(name: str) -> object:
    """STATUS: the class -> grpc.StatusCode table, the one an agent answers with (built on first use)."""
    if name == "STATUS":
        return _tables()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: errnos of the native layer that mean the kernel cannot do it (not that the call was wrong).
_KERNEL_LACKS = (errno.ENOSYS, errno.EOPNOTSUPP)


def status_of(err: BaseException) -> grpc.StatusCode | None:
    """The status an agent answers `err` with, if `err` is one of ours; None for anything else."""
    status = _tables()[0]
    if isinstance(err, OSError) and err.errno in _KERNEL_LACKS:
        return status[KernelFeatureMissing]
    for cls in type(err).__mro__:
        if cls in status:
            return status[cls]
    return None


def from_status(code: grpc.StatusCode | None, message: str) -> AgentError:
    """The error a client raises for an agent's status `code` and its one-line `message`."""
    cls = _tables()[1].get(code) if code is not None else None
    return cls(message) if cls is not None else AgentError(message)


def os_error(err: int, what: str) -> OSError:
    """The OSError for errno `err` raised by native operation `what` (e.g. "UFFDIO_COPY dst=0x7f.. len=4096").

    Native calls return >= 0 or -errno. The error carries the errno (so
    ``OSError(errno, ...)`` becomes the matching subclass: ProcessLookupError
    for ESRCH, FileExistsError for EEXIST, ...) and names the operation and
    its arguments, because "Invalid argument" alone says nothing about which
    of a dozen ioctls on which range failed.
    """
    return OSError(err, f"{what}: {os.strerror(err)}")
