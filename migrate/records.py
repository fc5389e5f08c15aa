"""What agents answer, as small typed records (migrate.api returns these, never protobuf).

Each record mirrors one message of proto/migrate.proto field for field
(tests/test_api.py checks that they stay in step); `from_message` fills
one from its message. Repeated fields become tuples, so records are
immutable values a program can keep, compare and hash.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class AgentInfo:
    """An agent's answer to Hello (HelloReply)."""

    proto_version: int
    roles: tuple[str, ...]
    software: str


@dataclass(frozen=True)
class Spec:
    """A guest's shape and workload (GuestSpec); sizes in bytes."""

    size: int
    workload: str
    seed: int
    ops: int
    threads: int
    ops_per_sec: float
    page_size: int
    content: str
    kind: str


@dataclass(frozen=True)
class ProgressPoint:
    """One of the guest's own progress samples: CLOCK_REALTIME ns and operations done."""

    t_ns: int
    ops: int


@dataclass(frozen=True)
class GuestInfo:
    """A guest on an agent (GuestInfo); `progress` is filled by Client.inspect only."""

    name: str
    spec: Spec
    state: str
    pid: int
    page_count: int
    page_size: int
    ops_done: int
    finished: bool
    kind: str
    run_id: str
    progress: tuple[ProgressPoint, ...]
    first_op_ns: int
    last_op_ns: int
    vcpu_blocked_ms: tuple[float, ...]
    guest_digest: str


@dataclass(frozen=True)
class Capacity:
    """What a destination agent can still take (CapacityReply); bytes."""

    available: int
    promised: int
    outstanding: int
    limit: int
    headroom: int
    free: int
    guests: tuple[str, ...]


@dataclass(frozen=True)
class Outgoing:
    """A prepared outgoing run on the source (PrepareOutgoingReply)."""

    run_id: str
    bulk_endpoint: str
    spec: Spec
    page_count: int
    tracking_error: str
    data_endpoint: str
    data_key: bytes


@dataclass(frozen=True)
class DirtySet:
    """Pages written since the previous scan (DirtySet): a bitmap, one bit per page."""

    bitmap: bytes
    pages: int
    scan_ms: float


@dataclass(frozen=True)
class Switchover:
    """The source paused the guest (SwitchoverReply); `state_json` goes to start_incoming."""

    state_json: bytes
    last_op_ns: int
    pause_ms: float
    dirty: DirtySet
    sent_ns: int


@dataclass(frozen=True)
class SourceStats:
    """What the source sent for a run (SourceStats)."""

    urgent_requests: int
    urgent_pages: int
    urgent_bytes: int
    bulk_pages: int
    bulk_bytes: int
    bulk_compressed_batches: int


@dataclass(frozen=True)
class Prepared:
    """A prepared incoming run on the destination (PrepareIncomingReply)."""

    prepare_ms: float


@dataclass(frozen=True)
class Started:
    """The guest resumed on the destination (StartIncomingReply)."""

    resume_ms: float
    discard_ms: float
    discarded: int
    received_ns: int


@dataclass(frozen=True)
class PrecopyRound:
    """One pre-copy round on the destination (PrecopyRoundReply)."""

    discarded: int
    discard_ms: float
    pages: int
    zero: int
    bytes_wire: int
    seconds: float
    missing: int


@dataclass(frozen=True)
class MigrationStatus:
    """An incoming run's progress on the destination (MigrationStatus)."""

    run_id: str
    phase: str
    error: str
    pages_total: int
    pages_received: int
    pages_pushed: int
    pages_faulted: int
    pages_zero: int
    faults: int
    bytes_wire: int
    bytes_pages: int
    elapsed_s: float
    detail_json: str
    data_plane: str
    fault_path: str
    pages_recovered: int
    pages_before_resume: int
    pages_prefetched: int
    prefetch_hits: int
    policy: str
    working_set: bytes


@dataclass(frozen=True)
class SnapshotProgress:
    """A live snapshot's progress (SnapshotProgress)."""

    guest: str
    file: str
    phase: str
    error: str
    pages_total: int
    pages_saved: int
    pages_streamed: int
    pages_faulted: int
    wp_faults: int
    waited: int
    blocked_ms: float
    max_blocked_ms: float
    bytes_written: int
    elapsed_s: float
    downtime_ms: float
    ops_at_snapshot: int
    ops_now: int
    ops_per_s_before: float


def from_message(cls: type[R], msg: Any) -> R:
    """A `cls` record holding the fields of protobuf message `msg` (nested records and tuples too)."""
    values = {}
    for name, hint in typing.get_type_hints(cls).items():
        value = getattr(msg, name)
        if _is_record(hint):
            value = from_message(hint, value)
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            value = tuple(from_message(item, v) if _is_record(item) else v for v in value)
        values[name] = value
    return cls(**values)


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)
