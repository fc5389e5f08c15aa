"""migrate: post-copy live migration of guest memory over gRPC.

The destination resolves a guest's userfaultfd page faults by fetching pages
from the source while a bulk stream pushes the rest; see docs/architecture.md.

As a library (docs/api.md)::

    import migrate
    with migrate.Client("127.0.0.1:7070") as source:
        source.launch("vm1", size="64M", workload=migrate.Workload.RANDOM_WRITE)
    report = migrate.migrate("vm1", source="127.0.0.1:7070", dest="127.0.0.1:7071")

The names below load on first use: `import migrate` alone loads nothing
else, and the client side never loads the native layer (migrate._native).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# gRPC's core writes its own log lines (handshake failures, a port in use) to
# stderr, around the one line the CLI prints for the same failure, and in
# every agent's log on each refused client. Silence it before anything
# imports grpc (every entry point imports this package first); our own
# messages say what failed. GRPC_VERBOSITY=DEBUG in the environment brings it back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
# gRPC's EventEngine client and listener hand every message of a stream
# between more threads than its older I/O manager: on the source agent's
# urgent stream (the gRPC fault path) 15-16 context switches per fault
# against 10-11, ~30 % of the agent's CPU per fault (and a context switch is
# dear on a virtual machine). Our processes use the older one; an
# environment that sets GRPC_EXPERIMENTS itself keeps its own choice.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
# An agent (`migrate source serve`, `migrate dest serve`) polls with "poll",
# not that I/O manager's default (epoll1). With epoll1 every thread that
# waits on any completion queue of the process polls every socket of the
# process: in a destination agent, the Control server's thread read about
# half of the urgent stream's replies itself and then woke the urgent path's
# poller to hand each over (performance.md, "Where a gRPC fault's time
# goes"). With "poll" a thread polls only the sockets of the calls on its own
# queue. Not in clients: there a channel with no call under way is polled by
# nobody, and after its agent restarted, its next call went out on the dead
# connection ("Stream removed") instead of a new one.
if sys.argv[1:3] in (["source", "serve"], ["dest", "serve"]):
    os.environ.setdefault("GRPC_POLL_STRATEGY", "poll")

#: Public name -> the module that defines it.
_EXPORTS = {
    "Client": "migrate.api", "TLS": "migrate.api", "migrate": "migrate.api", "resume": "migrate.api",
    "Report": "migrate.report",
    "AgentInfo": "migrate.records", "GuestInfo": "migrate.records", "Spec": "migrate.records",
    "Capacity": "migrate.records", "MigrationStatus": "migrate.records",
    "MigrateError": "migrate.errors", "AgentError": "migrate.errors", "AgentUnreachable": "migrate.errors",
    "BadRequest": "migrate.errors", "GuestNotFound": "migrate.errors", "AlreadyExists": "migrate.errors",
    "FailedPrecondition": "migrate.errors", "ResourceExhausted": "migrate.errors",
    "PermissionDenied": "migrate.errors", "Unauthenticated": "migrate.errors", "TimedOut": "migrate.errors",
    "KernelFeatureMissing": "migrate.errors", "RunFailed": "migrate.errors", "InternalError": "migrate.errors",
    "Mode": "migrate.names", "Phase": "migrate.names", "GuestKind": "migrate.names", "Workload": "migrate.names",
    "Content": "migrate.names", "DataPlane": "migrate.names", "FaultPath": "migrate.names",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # the same names for type checkers ("X as X": re-exported)
    from migrate.api import TLS as TLS
    from migrate.api import Client as Client
    from migrate.api import migrate as migrate
    from migrate.api import resume as resume
    from migrate.errors import AgentError as AgentError
    from migrate.errors import AgentUnreachable as AgentUnreachable
    from migrate.errors import AlreadyExists as AlreadyExists
    from migrate.errors import BadRequest as BadRequest
    from migrate.errors import FailedPrecondition as FailedPrecondition
    from migrate.errors import GuestNotFound as GuestNotFound
    from migrate.errors import InternalError as InternalError
    from migrate.errors import KernelFeatureMissing as KernelFeatureMissing
    from migrate.errors import MigrateError as MigrateError
    from migrate.errors import PermissionDenied as PermissionDenied
    from migrate.errors import ResourceExhausted as ResourceExhausted
    from migrate.errors import RunFailed as RunFailed
    from migrate.errors import TimedOut as TimedOut
    from migrate.errors import Unauthenticated as Unauthenticated
    from migrate.names import Content as Content
    from migrate.names import DataPlane as DataPlane
    from migrate.names import FaultPath as FaultPath
    from migrate.names import GuestKind as GuestKind
    from migrate.names import Mode as Mode
    from migrate.names import Phase as Phase
    from migrate.names import Workload as Workload
    from migrate.records import AgentInfo as AgentInfo
    from migrate.records import Capacity as Capacity
    from migrate.records import GuestInfo as GuestInfo
    from migrate.records import MigrationStatus as MigrationStatus
    from migrate.records import Spec as Spec
    from migrate.report import Report as Report

def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'migrate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
