"""migrate: post-copy live migration of guest memory over gRPC.

The destination resolves a guest's userfaultfd page faults by fetching pages
from the source while a bulk stream pushes the rest; see docs/architecture.md.

As a library (docs/api.md)::

    import migrate
    with migrate.Client("127.0.0.1:7070") as source:
        source.launch("vm1", size="64M", workload="random-write")
    report = migrate.migrate("vm1", source="127.0.0.1:7070", dest="127.0.0.1:7071")

The names below load on first use: `import migrate` alone loads nothing
else, and the client side never loads the native layer (migrate._native).
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# gRPC's core writes its own log lines (handshake failures, a port in use) to
# stderr, around the one line the CLI prints for the same failure, and in
# every agent's log on each refused client. Silence it before anything
# imports grpc (every entry point imports this package first); our own
# messages say what failed. GRPC_VERBOSITY=DEBUG in the environment brings it back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

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
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from migrate.api import TLS, Client, migrate, resume
    from migrate.errors import (AgentError, AgentUnreachable, AlreadyExists, BadRequest, FailedPrecondition,
                                GuestNotFound, InternalError, KernelFeatureMissing, MigrateError, PermissionDenied,
                                ResourceExhausted, RunFailed, TimedOut, Unauthenticated)
    from migrate.records import AgentInfo, Capacity, GuestInfo, MigrationStatus, Spec
    from migrate.report import Report


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'migrate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
