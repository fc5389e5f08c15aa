"""The Python API: `Client` for one agent, `migrate()` and `resume()` for a migration.

Everything here talks gRPC to agents and never loads the native layer, so
a program that only drives agents runs where migrate._native is not built.
Answers are typed records (migrate.records), reports are migrate.report.Report,
and failures are migrate.errors classes (one per status: GuestNotFound,
BadRequest, AgentUnreachable, ...). See docs/api.md.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from migrate import errors, orchestrator, records
from migrate.client import CONNECT_TIMEOUT, AgentClient
from migrate.names import Content, GuestKind, Mode, Workload
from migrate.proto import migrate_pb2 as pb
from migrate.records import (
    AgentInfo,
    Capacity,
    DirtySet,
    GuestInfo,
    MigrationStatus,
    Outgoing,
    PrecopyRound,
    Prepared,
    SnapshotProgress,
    SourceStats,
    Spec,
    Started,
    Switchover,
)
from migrate.report import Report
from migrate.security import Credentials
from migrate.units import parse_size

R = TypeVar("R")
#: Seconds a call may take unless its method says otherwise.
DEFAULT_TIMEOUT = 60.0
#: Seconds for the calls that wait on a guest (launch, digest) or on the network (prepare, rounds).
SLOW_TIMEOUT = 600.0


@dataclass(frozen=True)
class TLS:
    """PEM files for TLS to agents: `ca` verifies them, `cert` and `key` identify this client."""

    ca: str = ""
    cert: str = ""
    key: str = ""


def credentials(token: str | None, tls: TLS | None) -> Credentials:
    """Credentials from explicit arguments; with neither given, this process's environment
    (MIGRATE_TOKEN, MIGRATE_TLS_CA, ...), as the CLI does. BadRequest if they cannot work."""
    if token is None and tls is None:
        creds = Credentials.from_env()
    else:
        files = tls or TLS()
        creds = Credentials(cert=files.cert, key=files.key, ca=files.ca, token=token or "")
    with errors.bad_request():
        creds.check()
    return creds


class Client:
    """One agent's Control service, with a typed method for each operation.

    `endpoint` is HOST:PORT. Construction waits up to `connect_timeout`
    seconds for the agent (AgentUnreachable otherwise). Use it as a context
    manager, or close() it.
    """

    def __init__(self, endpoint: str, *, token: str | None = None, tls: TLS | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.credentials = credentials(token, tls)
        self._agent = AgentClient(endpoint, connect_timeout=connect_timeout, credentials=self.credentials)

    def _call(self, method: str, request: Any, record: type[R], timeout: float = DEFAULT_TIMEOUT) -> R:
        return records.from_message(record, self._agent.call(method, request, timeout=timeout))

    # ------------------------------------------------------------ guests
    def hello(self) -> AgentInfo:
        """The agent's protocol version, roles ("source", "dest") and software."""
        return self._call("Hello", pb.HelloRequest(), AgentInfo)

    def launch(self, name: str, *, size: int | str, workload: str = Workload.RANDOM_WRITE, ops: int = 2_000_000,
               threads: int = 1, ops_per_sec: float = 0.0, content: str = Content.REALISTIC, backing: str = "",
               seed: int = 1, paused: bool = False, page_size: int = mmap.PAGESIZE,
               kind: str = GuestKind.SYNTHETIC) -> GuestInfo:
        """Start guest `name` on a source agent.

        `size` in bytes, or as text ("64M", "1G"); `workload` a
        migrate.Workload (or its name: "hotset", ...); `ops` operations,
        then it idles; `ops_per_sec` 0 runs unthrottled; `content`
        Content.REALISTIC, RANDOM (incompressible) or ZERO (holes until
        written); `backing` "file:NAME"
        keeps RAM in a new file in the agent's --backing-dir; `kind`
        GuestKind.KVM runs the guest image under KVM with `threads` vCPUs.
        """
        with errors.bad_request():
            nbytes = parse_size(size) if isinstance(size, str) else size
        spec = pb.GuestSpec(size=nbytes, workload=workload, seed=seed, ops=ops, threads=threads,
                            ops_per_sec=ops_per_sec, page_size=page_size, content=content, kind=kind)
        request = pb.LaunchGuestRequest(name=name, spec=spec, start_paused=paused, backing=backing)
        return self._call("LaunchGuest", request, GuestInfo, SLOW_TIMEOUT)

    def guests(self) -> list[GuestInfo]:
        """The guests this agent holds."""
        reply = self._agent.call("ListGuests", pb.ListGuestsRequest(), timeout=DEFAULT_TIMEOUT)
        return [records.from_message(GuestInfo, g) for g in reply.guests]

    def inspect(self, name: str) -> GuestInfo:
        """Guest `name`, with its progress samples."""
        return self._call("InspectGuest", pb.GuestRef(name=name), GuestInfo)

    def digest(self, name: str, *, timeout: float = SLOW_TIMEOUT) -> str:
        """A digest of guest `name`'s memory (on a destination: pulls every page still missing)."""
        return self._agent.call("GuestDigest", pb.GuestRef(name=name), timeout=timeout).digest

    def stop(self, name: str) -> GuestInfo:
        """Stop guest `name` and free its memory; returns it as it was (state "stopped")."""
        return self._call("StopGuest", pb.GuestRef(name=name), GuestInfo)

    def capacity(self) -> Capacity:
        """What a destination agent can still take."""
        return self._call("Capacity", pb.CapacityRequest(), Capacity)

    # --------------------------------------------------------- snapshots
    def snapshot(self, name: str, file: str) -> SnapshotProgress:
        """Start a live snapshot of guest `name` into `file` in the agent's --snapshot-dir."""
        return self._call("StartSnapshot", pb.SnapshotRequest(name=name, file=file), SnapshotProgress, SLOW_TIMEOUT)

    def snapshot_status(self, file: str) -> SnapshotProgress:
        """The progress of the snapshot into `file`."""
        return self._call("SnapshotStatus", pb.SnapshotRequest(file=file), SnapshotProgress)

    def load_snapshot(self, name: str, file: str) -> GuestInfo:
        """Serve snapshot `file` as image guest `name`, resumable on a destination."""
        return self._call("LoadSnapshot", pb.LoadSnapshotRequest(name=name, file=file), GuestInfo, SLOW_TIMEOUT)

    # ------------------------------------- migration steps (power users)
    # migrate() runs these in order; docs/protocol.md says what each does.
    def prepare_outgoing(self, name: str, *, track_writes: bool = False, data_plane: str = "") -> Outgoing:
        request = pb.PrepareOutgoingRequest(name=name, track_writes=track_writes, data_plane=data_plane)
        return self._call("PrepareOutgoing", request, Outgoing, SLOW_TIMEOUT)

    def scan_dirty(self, run_id: str) -> DirtySet:
        return self._call("ScanDirty", pb.RunRef(run_id=run_id), DirtySet)

    def switchover(self, run_id: str) -> Switchover:
        return self._call("Switchover", pb.RunRef(run_id=run_id), Switchover, SLOW_TIMEOUT)

    def abort_outgoing(self, run_id: str) -> GuestInfo:
        return self._call("AbortOutgoing", pb.RunRef(run_id=run_id), GuestInfo)

    def complete_outgoing(self, run_id: str) -> SourceStats:
        return self._call("CompleteOutgoing", pb.RunRef(run_id=run_id), SourceStats)

    def prepare_incoming(self, run_id: str, name: str, spec: Spec, *, source_endpoint: str, bulk_endpoint: str = "",
                         mode: str = Mode.POSTCOPY, recovery_timeout_s: float = 0.0, data_plane: str = "",
                         data_endpoint: str = "", data_key: bytes = b"", fault_path: str = "") -> Prepared:
        request = pb.PrepareIncomingRequest(
            run_id=run_id, name=name, spec=pb.GuestSpec(**vars(spec)), source_endpoint=source_endpoint,
            bulk_endpoint=bulk_endpoint, mode=mode, recovery_timeout_s=recovery_timeout_s, data_plane=data_plane,
            data_endpoint=data_endpoint, data_key=data_key, fault_path=fault_path)
        return self._call("PrepareIncoming", request, Prepared, SLOW_TIMEOUT)

    def precopy_round(self, run_id: str, *, discard: bytes = b"", pull: bool = True, max_bandwidth: int = 0,
                      deadline_s: float = 0.0, timeout: float = SLOW_TIMEOUT) -> PrecopyRound:
        request = pb.PrecopyRoundRequest(run_id=run_id, discard=discard, pull=pull, max_bandwidth=max_bandwidth,
                                         deadline_s=deadline_s)
        return self._call("PrecopyRound", request, PrecopyRound, timeout)

    def start_incoming(self, run_id: str, state_json: bytes, *, no_push: bool = False, max_bandwidth: int = 0,
                       discard: bytes = b"") -> Started:
        request = pb.StartIncomingRequest(run_id=run_id, state_json=state_json, no_push=no_push,
                                          max_bandwidth=max_bandwidth, discard=discard)
        return self._call("StartIncoming", request, Started, SLOW_TIMEOUT)

    def incoming_status(self, run_id: str) -> MigrationStatus:
        return self._call("IncomingStatus", pb.RunRef(run_id=run_id), MigrationStatus)

    def wait_incoming(self, run_id: str, wait_s: float = 1.0) -> MigrationStatus:
        """The run's status once it has completed or failed, or after `wait_s` (at most 1 s) if sooner."""
        return self._call("WaitIncoming", pb.WaitIncomingRequest(run_id=run_id, wait_s=wait_s), MigrationStatus)

    def abort_incoming(self, run_id: str) -> MigrationStatus:
        return self._call("AbortIncoming", pb.RunRef(run_id=run_id), MigrationStatus)

    def set_bandwidth(self, run_id: str, max_bandwidth: int) -> int:
        """Change a running run's bulk pace (bytes/s, 0: unlimited); returns the new pace."""
        request = pb.SetBandwidthRequest(run_id=run_id, max_bandwidth=max_bandwidth)
        return self._agent.call("SetBandwidth", request, timeout=DEFAULT_TIMEOUT).max_bandwidth

    def close(self) -> None:
        self._agent.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Agent = str | Client
StatusCallback = Callable[[MigrationStatus], None]


def migrate(guest: str, *, source: Agent, dest: Agent, mode: str = Mode.HYBRID, verify: bool = False,
            token: str | None = None, tls: TLS | None = None, on_status: StatusCallback | None = None,
            **options: Any) -> Report:
    """Migrate guest `guest` from agent `source` to agent `dest` (endpoints or Clients); return the report.

    `mode`: a migrate.Mode (or its name); `verify` compares the final
    memory with an unmigrated run (Report.verified). `options` are the
    fields of migrate.orchestrator.RunOptions: no_push, max_bandwidth
    (bytes/s), source_endpoint, timeout, precopy_rounds, precopy_seconds,
    max_downtime_ms, recovery_timeout, data_plane, fault_path. Credentials:
    `token`/`tls`, else the source Client's, else the environment.
    `on_status` sees the destination's progress on every poll.

    Raises BadRequest for options that cannot work, AgentUnreachable,
    FailedPrecondition (an agent of the wrong role), and RunFailed (with
    `next_step`, and the agent's error as its __cause__) for a migration
    that failed on the way: the guest then still runs on the source.
    """
    creds = _credentials(token, tls, source)
    opts = _options(creds, mode=mode, verify=verify, **options)
    doc = orchestrator.migrate(guest, _endpoint(source), _endpoint(dest), opts, on_status=_status_hook(on_status),
                               credentials=creds)
    return Report.from_dict(doc)


def resume(guest: str, *, source: Agent, dest: Agent, token: str | None = None, tls: TLS | None = None,
           on_status: StatusCallback | None = None, **options: Any) -> Report:
    """Finish a migration of `guest` whose driver died after the switchover (Report.mode == "resumed").

    One that had not switched over is aborted (FailedPrecondition): the
    guest runs on the source as before. Arguments as for migrate().
    """
    creds = _credentials(token, tls, source)
    opts = _options(creds, **options)
    doc = orchestrator.resume(guest, _endpoint(source), _endpoint(dest), opts, on_status=_status_hook(on_status),
                              credentials=creds)
    return Report.from_dict(doc)


def _options(creds: Credentials, **options: Any) -> orchestrator.RunOptions:
    """RunOptions from keyword arguments: TypeError for an unknown one, BadRequest for values that cannot work."""
    try:
        opts = orchestrator.RunOptions(**options)
    except TypeError as err:
        raise TypeError(f"unknown migration option: {err}") from None
    with errors.bad_request():
        opts.check(creds.tls)
    return opts


def _credentials(token: str | None, tls: TLS | None, source: Agent) -> Credentials:
    if token is None and tls is None and isinstance(source, Client):
        return source.credentials
    return credentials(token, tls)


def _endpoint(agent: Agent) -> str:
    return agent.endpoint if isinstance(agent, Client) else agent


def _status_hook(on_status: StatusCallback | None) -> Callable[[pb.MigrationStatus], None] | None:
    if on_status is None:
        return None
    callback = on_status
    return lambda status: callback(records.from_message(MigrationStatus, status))
