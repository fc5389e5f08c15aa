"""The domain's names, defined once: modes, run phases, guest kinds, workloads, RAM contents, data planes.

Each is a StrEnum, so a member is its wire string ("hybrid" == Mode.HYBRID):
protobuf fields, JSON reports and journals keep carrying plain strings,
while the CLI's choices, the API's defaults and every check in the agents
and the orchestrator name the members here instead of repeating the text.
migrate.planes holds what is done with the data plane and fault path.
"""
from __future__ import annotations

import enum
from typing import TypeVar


class Mode(enum.StrEnum):
    """How a guest moves: at once (postcopy), after pre-copy rounds (hybrid), or after all of its memory (precopy)."""

    POSTCOPY = "postcopy"
    HYBRID = "hybrid"
    PRECOPY = "precopy"


class Phase(enum.StrEnum):
    """Where a run (an incoming migration, a snapshot) is: new -> prepared -> running -> complete or failed."""

    NEW = "new"
    PREPARED = "prepared"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


#: The phases a run never leaves.
FINISHED = frozenset({Phase.COMPLETE, Phase.FAILED})


class GuestKind(enum.StrEnum):
    """What runs a guest: the workload engine on shared RAM (synthetic) or a KVM virtual machine (kvm)."""

    SYNTHETIC = "synthetic"
    KVM = "kvm"


class Workload(enum.StrEnum):
    """What a guest does to its memory (migrate.guest.workloads runs them; native/workloads.c implements them)."""

    SEQ_READ = "seq-read"
    SEQ_WRITE = "seq-write"
    RANDOM_READ = "random-read"
    RANDOM_WRITE = "random-write"
    HOTSET = "hotset"
    ZIPF = "zipf"
    IDLE = "idle"
    BALLOON = "balloon"  # writes, and gives ranges back (MADV_REMOVE) and takes them again


#: Workloads that never write (a migration of one has nothing to re-send).
READ_ONLY = frozenset({Workload.SEQ_READ, Workload.RANDOM_READ, Workload.IDLE})


class DataPlane(enum.StrEnum):
    """How page data travels: the native plane (C threads, plain TCP) or gRPC (migrate.planes)."""

    NATIVE = "native"
    GRPC = "grpc"


class FaultPath(enum.StrEnum):
    """How a guest's faults are served: over gRPC, or over their own native connection (native plane only)."""

    GRPC = "grpc"
    NATIVE = "native"


class Content(enum.StrEnum):
    """A guest's initial RAM: partly compressible with some zero pages (realistic), incompressible (random),
    or all zero (zero: never-written pages are holes of the memfd, like a freshly booted VM's untouched RAM)."""

    REALISTIC = "realistic"
    RANDOM = "random"
    ZERO = "zero"


E = TypeVar("E", bound=enum.StrEnum)


def choices(enum_type: type[enum.StrEnum]) -> list[str]:
    """The values of `enum_type`, in order (for click.Choice and messages)."""
    return [member.value for member in enum_type]


def parse(enum_type: type[E], value: str, what: str) -> E:
    """The member of `enum_type` named `value`; ValueError naming `what` and the choices otherwise."""
    try:
        return enum_type(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value[:40]!r}; use one of {', '.join(choices(enum_type))}") from None
