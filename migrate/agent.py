"""The agent daemon: `migrate source serve` and `migrate dest serve`.

One gRPC server per agent carries the Control service (guests and the steps
of a migration) and, on a source, the urgent Pages.Fetch stream. Every RPC
validates its input and answers errors with a status code and one line of
text; nothing a client sends can crash the agent.
"""
from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from migrate import __version__, errors, names, planes, rpc, spawn, validate
from migrate.admission import SLOW_CALLS_PER_PEER, CallClass
from migrate.backing import BackingDir
from migrate.batches import add_pages_servicer
from migrate.dest.capacity import Ledger
from migrate.dest.incoming import IncomingRun
from migrate.dest.restore import RestoreOptions, UffdRestoreListener
from migrate.guest.process import GuestSpec
from migrate.guest.warm import DEFAULT_WARM_RUNNERS, WarmPool, host_modules
from migrate.guests import GuestTable, content_from_pb, spec_from_pb, spec_to_pb
from migrate.journal import Journal
from migrate.metrics import MetricsServer
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc
from migrate.source.outgoing import OutgoingRun, OutgoingRuns, UrgentPages
from migrate.source.snapshot import Snapshots

log = logging.getLogger(__name__)
R = TypeVar("R")

#: Completed incoming runs whose final status IncomingStatus still answers.
_KEEP_FINISHED = 64
#: Most characters of an error a log line or a status echoes: a client's
#: 100 KB name must not fill the log (names and ids are bounded at the API too).
_MAX_ECHO = 500

_CONTROL = "/migrate.v1.Control/"
#: Control calls that may wait on the network or a guest (a prepare towards a silent source waits out
#: its connect timeout; a digest waits for the guest's memory).
_SLOW_CONTROL = ("PrepareIncoming", "PrepareOutgoing", "StartIncoming", "PrecopyRound", "GuestDigest",
                 "LaunchGuest", "Switchover", "StartSnapshot", "LoadSnapshot")
#: Most seconds a WaitIncoming call waits for its run to end: a waiter holds a worker of its class that long.
MAX_WAIT_S = 1.0
#: What an agent serves at once, each class on workers of its own (migrate.admission): slow control
#: calls cannot starve quick ones (Hello, status, abort), and no stream holds a control worker.
#: Waits for a run's end have their own class: every run of a drain holds one all along.
CALLS = (
    CallClass("slow control calls", tuple(_CONTROL + m for m in _SLOW_CONTROL), per_peer=SLOW_CALLS_PER_PEER,
              total=16),
    CallClass("waits for a run's end", (_CONTROL + "WaitIncoming",), per_peer=32, total=64),
    CallClass("control calls", (_CONTROL,), per_peer=16, total=32),
    CallClass("page streams", ("/migrate.v1.Pages/",), per_peer=8, total=32),
)

def _rpc(method: Callable) -> Callable:
    """Answer a unary handler's failure with its status: a migrate.errors class with its own
    code (errors.STATUS), anything else INTERNAL, logged once with its traceback (a bug)."""

    @functools.wraps(method)
    def wrapper(self: ControlService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as err:  # noqa: BLE001 - every failure becomes a status
            code = errors.status_of(err)
            text = str(err)[:_MAX_ECHO]
            if code is None:
                log.exception("%s failed", method.__name__)
                code = grpc.StatusCode.INTERNAL
            else:  # the client's to act on: routine here
                log.info("%s: %s: %s", method.__name__, code.name, text)
            context.abort(code, text)

    return wrapper


def _request(parse: Callable[..., R], *args: Any) -> R:
    """`parse(*args)` on a client's request: its ValueError (migrate.names, migrate.planes: parsers
    shared with code that has no agent) is the client's BadRequest."""
    with errors.bad_request():
        return parse(*args)


class ControlService(pb_grpc.ControlServicer):
    """Guests and migrations on one agent."""

    def __init__(self, roles: tuple[str, ...], listen_host: str, level: int = 1, compress: str = "auto",
                 backing_dir: BackingDir | None = None, snapshot_dir: BackingDir | None = None,
                 max_incoming_ram: int = 0, allow_policy_modules: bool = False) -> None:
        self.roles = roles
        self.allow_policy_modules = allow_policy_modules  # import a client's --policy module:Class
        self.ledger = Ledger(max_incoming_ram)
        self.guests = GuestTable(backing_dir)
        self.snapshots = Snapshots(snapshot_dir or backing_dir)
        self.outgoing = OutgoingRuns()
        self.incoming: dict[str, IncomingRun] = {}
        self.journal: Journal | None = None
        self.warm: WarmPool | None = None  # pre-started runners for incoming runs (dest role, --warm-runners)
        self._listen_host = listen_host
        self._level = level
        self._compress = compress
        self.lock = threading.Lock()

    def _need(self, role: str) -> None:
        if role not in self.roles:
            raise errors.FailedPrecondition(f"this agent is not a {role} agent (roles: {', '.join(self.roles)})")

    # ------------------------------------------------------------ guests
    @_rpc
    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        return pb.HelloReply(proto_version=rpc.PROTO_VERSION, roles=list(self.roles), software=f"migrate {__version__}")

    @_rpc
    def LaunchGuest(self, request: pb.LaunchGuestRequest, context: grpc.ServicerContext) -> pb.GuestInfo:
        self._need("source")
        spec = spec_from_pb(request.spec)
        content = content_from_pb(request.spec)
        return self.guests.launch(request.name, spec, start_paused=request.start_paused, content=content,
                                  backing=request.backing).info()

    @_rpc
    def ListGuests(self, request: pb.ListGuestsRequest, context: grpc.ServicerContext) -> pb.ListGuestsReply:
        return pb.ListGuestsReply(guests=[g.info() for g in self.guests.all()])

    @_rpc
    def InspectGuest(self, request: pb.GuestRef, context: grpc.ServicerContext) -> pb.GuestInfo:
        return self.guests.get(request.name).info(with_progress=True)

    @_rpc
    def GuestDigest(self, request: pb.GuestRef, context: grpc.ServicerContext) -> pb.DigestReply:
        guest = self.guests.get(request.name)
        if guest.process is None:
            raise errors.FailedPrecondition(f"guest {request.name!r} is an image; it has no runner to ask")
        if guest.state == "migrating-in":  # its memory is not here yet, nor asked for before switchover
            raise errors.FailedPrecondition(f"guest {request.name!r} has not resumed here yet (run {guest.run_id})")
        return pb.DigestReply(digest=guest.process.digest(timeout=600))

    @_rpc
    def StopGuest(self, request: pb.GuestRef, context: grpc.ServicerContext) -> pb.GuestInfo:
        guest = self.guests.get(request.name)
        if guest.run_id:
            raise errors.FailedPrecondition(f"guest {request.name!r} is being migrated (run {guest.run_id}); "
                                            "abort that first")
        info = guest.info()
        self.guests.remove(request.name)
        info.state = "stopped"
        return info

    # ------------------------------------------------------- source side
    @_rpc
    def PrepareOutgoing(self, request: pb.PrepareOutgoingRequest,
                        context: grpc.ServicerContext) -> pb.PrepareOutgoingReply:
        self._need("source")
        guest = self.guests.get(request.name)
        with self.lock:
            if guest.run_id:
                raise errors.FailedPrecondition(f"guest {request.name!r} is already being migrated "
                                                f"(run {guest.run_id})")
            if guest.kind == "runner" and guest.state not in ("running", "paused"):
                raise errors.FailedPrecondition(f"guest {request.name!r} is {guest.state}; it cannot be migrated now")
            run = OutgoingRun(guest, self._listen_host, self._level, self._compress, track_writes=request.track_writes,
                              plane=_request(planes.data_plane, request.data_plane))
            if guest.kind == "runner":
                guest.run_id = run.run_id
        self.outgoing.add(run)
        reply = pb.PrepareOutgoingReply(run_id=run.run_id, spec=spec_to_pb(guest.spec, guest.content),
                                        page_count=guest.page_count, tracking_error=run.tracking_error)
        endpoint = f"{self._listen_host}:{run.pages.port}"
        if run.plane is names.DataPlane.NATIVE:
            reply.data_endpoint, reply.data_key = endpoint, run.pages.key
        else:
            reply.bulk_endpoint = endpoint
        return reply

    @_rpc
    def ScanDirty(self, request: pb.RunRef, context: grpc.ServicerContext) -> pb.DirtySet:
        return self._outgoing(request.run_id).scan_dirty()

    @_rpc
    def Switchover(self, request: pb.RunRef, context: grpc.ServicerContext) -> pb.SwitchoverReply:
        run = self._outgoing(request.run_id)
        if run.switched:
            raise errors.FailedPrecondition(f"run {run.run_id} has switched over already")
        reply = run.switchover()
        self._record_outgoing(run)
        return reply

    def _journaled(self, run: OutgoingRun) -> bool:
        """Does a restarted agent serve this run again (a switched-over file-backed guest, with --state-dir)?"""
        return self.journal is not None and run.guest.backing is not None and run.switched

    def _record_outgoing(self, run: OutgoingRun) -> None:
        """Journal a switched-over run of a file-backed guest: a restarted agent can still serve it.

        The record names the backing file and its directory; the file stays
        until the run completes (CompleteOutgoing), even if this agent dies.
        """
        if not self._journaled(run):
            return
        g = run.guest
        assert self.journal is not None and g.backing is not None  # what _journaled checked
        self.journal.save(run.run_id, {"side": "out", "run_id": run.run_id, "name": g.name, "spec": g.spec.to_dict(),
                                       "backing": g.backing.name, "backing_dir": g.backing.dir.path,
                                       "content": g.content, "data_plane": run.plane.value,
                                       "port": run.pages.port, "key": run.pages.key.hex()})

    @_rpc
    def AbortOutgoing(self, request: pb.RunRef, context: grpc.ServicerContext) -> pb.GuestInfo:
        run = self.outgoing.pop(validate.run_id(request.run_id))
        run.abort()
        if self.journal is not None:
            self.journal.drop(run.run_id)
        return run.guest.info()

    @_rpc
    def CompleteOutgoing(self, request: pb.RunRef, context: grpc.ServicerContext) -> pb.SourceStats:
        if not self._outgoing(request.run_id).switched:  # releasing it now would lose the guest
            raise errors.FailedPrecondition(f"run {request.run_id} has not switched over: abort it instead")
        run = self.outgoing.pop(validate.run_id(request.run_id))
        stats = run.complete()
        if self.journal is not None:
            self.journal.drop(run.run_id)
        if run.guest.kind == "runner":
            self.guests.release(run.guest.name)  # the guest lives on the destination now
        return stats

    @_rpc
    def StartSnapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotProgress:
        self._need("source")
        guest = self.guests.get(request.name)
        with self.lock:  # not while a migration of it is being prepared
            return self.snapshots.start(guest, request.file).progress()

    @_rpc
    def SnapshotStatus(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotProgress:
        return self.snapshots.get(request.file).progress()

    @_rpc
    def LoadSnapshot(self, request: pb.LoadSnapshotRequest, context: grpc.ServicerContext) -> pb.GuestInfo:
        self._need("source")
        return self.guests.add_image(request.name, self.snapshots.path(request.file), nofollow=True).info()

    # -------------------------------------------------- destination side
    @_rpc
    def PrepareIncoming(self, request: pb.PrepareIncomingRequest,
                        context: grpc.ServicerContext) -> pb.PrepareIncomingReply:
        self._need("dest")
        spec = spec_from_pb(request.spec)
        validate.run_id(request.run_id)
        validate.guest_name(request.name)
        plane = _request(planes.data_plane, request.data_plane)
        route = validate.page_route(planes.PageRoute(
            request.source_endpoint, request.bulk_endpoint, plane, request.data_endpoint, request.data_key,
            _request(planes.fault_path, request.fault_path, plane)))
        validate.seconds(request.recovery_timeout_s, "recovery_timeout_s")
        with self.lock:
            if request.run_id in self.incoming:
                raise errors.AlreadyExists(f"run {request.run_id} is already known here")
        if any(g.name == request.name for g in self.guests.all()):
            raise errors.AlreadyExists(f"a guest named {request.name!r} already exists on this agent")
        mode = _request(names.parse, names.Mode, request.mode or names.Mode.POSTCOPY, "migration mode")
        self.ledger.admit(request.name, spec.size, self._incoming_runs())
        try:
            ms = self._prepare_incoming(request, spec, mode, route)
        finally:
            self.ledger.settle(request.name)
        return pb.PrepareIncomingReply(prepare_ms=ms)

    def _prepare_incoming(self, request: pb.PrepareIncomingRequest, spec: GuestSpec, mode: str,
                          route: planes.PageRoute) -> float:
        run = IncomingRun(request.run_id, request.name, spec, route)
        run.set_policy(request.policy, request.working_set, request.record_ws, self.allow_policy_modules)
        if request.recovery_timeout_s > 0:
            run.recovery_timeout = request.recovery_timeout_s
        run.journal = self.journal
        run.warm = self.warm
        try:
            ms = run.prepare(mode)
            assert run.guest is not None  # prepare() made it
            self.guests.adopt(run.guest)
        except BaseException:
            run.close()
            if run.guest is not None:
                run.guest.close()
            raise
        with self.lock:
            self.incoming[run.run_id] = run
            self._forget_finished()
        return ms

    def _incoming_runs(self) -> list[IncomingRun]:
        with self.lock:
            return list(self.incoming.values())

    @_rpc
    def Capacity(self, request: pb.CapacityRequest, context: grpc.ServicerContext) -> pb.CapacityReply:
        self._need("dest")
        return self.ledger.report(self._incoming_runs())

    @_rpc
    def SetBandwidth(self, request: pb.SetBandwidthRequest, context: grpc.ServicerContext) -> pb.SetBandwidthReply:
        self._incoming(request.run_id).set_bandwidth(request.max_bandwidth)
        return pb.SetBandwidthReply(max_bandwidth=request.max_bandwidth)

    def _forget_finished(self) -> None:
        """Keep the statuses of the last _KEEP_FINISHED completed runs only (caller holds the lock)."""
        finished = [run_id for run_id, run in self.incoming.items() if run.phase == names.Phase.COMPLETE]
        for run_id in finished[:-_KEEP_FINISHED]:  # oldest first: dicts keep insertion order
            del self.incoming[run_id]

    def _outgoing(self, run_id: str) -> OutgoingRun:
        return self.outgoing.get(validate.run_id(run_id))

    def _incoming(self, run_id: str) -> IncomingRun:
        validate.run_id(run_id)
        with self.lock:
            run = self.incoming.get(run_id)
        if run is None:
            raise errors.GuestNotFound(f"no incoming migration {run_id!r} on this agent: it lost the run "
                           "(restarted without --state-dir?) or never had it")
        return run

    @_rpc
    def PrecopyRound(self, request: pb.PrecopyRoundRequest, context: grpc.ServicerContext) -> pb.PrecopyRoundReply:
        validate.seconds(request.deadline_s, "deadline_s")
        return self._incoming(request.run_id).precopy_round(request.discard, request.pull, request.max_bandwidth,
                                                            request.deadline_s)

    @_rpc
    def StartIncoming(self, request: pb.StartIncomingRequest, context: grpc.ServicerContext) -> pb.StartIncomingReply:
        received_ns = time.time_ns()
        validate.state_json(request.state_json)  # before anything changes: a bad state leaves the run as it was
        reply = self._incoming(request.run_id).start(request.state_json, request.no_push, request.max_bandwidth,
                                                    request.discard)
        reply.received_ns = received_ns
        return reply

    @_rpc
    def IncomingStatus(self, request: pb.RunRef, context: grpc.ServicerContext) -> pb.MigrationStatus:
        return self._incoming(request.run_id).status()

    @_rpc
    def WaitIncoming(self, request: pb.WaitIncomingRequest, context: grpc.ServicerContext) -> pb.MigrationStatus:
        if not 0 <= request.wait_s <= MAX_WAIT_S:  # NaN fails too
            raise errors.BadRequest(f"wait_s must be between 0 and {MAX_WAIT_S:g} s, got {request.wait_s!r}")
        return self._incoming(request.run_id).wait_end(request.wait_s)

    @_rpc
    def AbortIncoming(self, request: pb.RunRef, context: grpc.ServicerContext) -> pb.MigrationStatus:
        run = self._incoming(request.run_id)
        if run.phase == names.Phase.COMPLETE:  # its guest is the only copy now
            raise errors.FailedPrecondition(f"run {run.run_id} is complete: the guest lives here now "
                                            "(StopGuest stops it)")
        run.abort()
        status = run.status()
        with self.lock:
            self.incoming.pop(request.run_id, None)
        run.close()
        try:
            self.guests.remove(run.name)
        except errors.GuestNotFound:
            pass
        return status

    def rejoin_runs(self) -> None:
        """Take over the runs a dead predecessor journaled: serve outgoing ones, finish incoming ones."""
        if self.journal is None:  # no --state-dir: nothing was journaled
            return
        for record in self.journal.records():
            if record.get("side") == "out":
                self._serve_again(record)
                continue
            try:
                run = IncomingRun.rejoin(record, self.journal, self.allow_policy_modules)
            except (OSError, RuntimeError, ValueError, KeyError) as err:
                log.error("cannot resume incoming run %s: %s", record.get("run_id"), err)
                self.journal.drop(str(record.get("run_id")))
                continue
            assert run.guest is not None  # rejoin() made it
            self.guests.adopt(run.guest)
            with self.lock:
                self.incoming[run.run_id] = run
            log.info("resumed incoming run %s of guest %s", run.run_id, run.name)

    def _serve_again(self, record: dict) -> None:
        """Serve a switched-over file-backed guest's pages again: same run, same plane, port and key."""
        assert self.journal is not None  # rejoin_runs() reads records from it
        try:
            guest = self.guests.restore_switched(record)
        except (OSError, ValueError, KeyError) as err:
            log.error("cannot serve outgoing run %s again: %s", record.get("run_id"), err)
            self.journal.drop(str(record.get("run_id")))
            return
        try:
            run = OutgoingRun(guest, self._listen_host, self._level, self._compress, run_id=record["run_id"],
                              plane=planes.data_plane(record["data_plane"]), port=int(record["port"]),
                              key=bytes.fromhex(record["key"]) or None)
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            log.error("cannot serve outgoing run %s again: %s", record["run_id"], err)
            self.guests.remove(guest.name, keep_backing=True)  # journaled still: a later restart may serve it
            return
        run.switched = True
        run.pages.freeze()  # the guest runs on the destination: this copy of its memory no longer changes
        self.outgoing.add(run)
        log.info("serving outgoing run %s of guest %s again", run.run_id, guest.name)

    def shutdown(self) -> None:
        """Stop every run and guest this agent holds (on SIGTERM/SIGINT).

        An outgoing run that switched over is not undone: the guest runs on
        the destination, and resuming it here too would split it in two. Its
        page server stops; a file-backed guest's journal entry stays, so a
        restarted agent serves the remaining pages, so its file stays too.
        """
        keep = frozenset(run.guest.name for run in self.outgoing.all() if self._journaled(run))
        for run in self.outgoing.all():
            if run.switched:
                run.complete()
            else:
                run.abort()
        with self.lock:
            runs = list(self.incoming.values())
            self.incoming.clear()
        for incoming in runs:
            incoming.abort("agent shutting down")
            incoming.close()
        self.guests.close_all(keep_backing=keep)
        if self.warm is not None:  # last: the runners it started die with its thread
            self.warm.close()


def serve(listen: str, roles: tuple[str, ...], *, images: dict[str, str] | None = None,
          uffd_restore: RestoreOptions | None = None, state_dir: str = "",
          backing_dir: str = "", snapshot_dir: str = "", on_ready: Callable[[int], None] | None = None,
          level: int = 1, compress: str = "auto", max_incoming_ram: int = 0, metrics: str = "",
          allow_policy_modules: bool = False, log_requests: bool = False,
          warm_runners: int = DEFAULT_WARM_RUNNERS) -> None:
    """Run an agent until SIGTERM or SIGINT; raises rpc.AgentError if it cannot listen.

    `uffd_restore` says how to restore external processes that connect
    with a Firecracker-style handshake (socket, source agent, image, plane,
    policy, working-set file to record). `allow_policy_modules` lets a
    client's `--policy module:Class` be imported here.
    `state_dir` journals incoming runs; the runs a previous agent left there
    are taken over and finished. `backing_dir` is where guests' RAM files
    may be created (none without it); `snapshot_dir` where snapshots are
    written and loaded from (default: `backing_dir`). `max_incoming_ram`
    caps the RAM promised to incoming runs at once (0: only the host's
    memory limits it). `metrics` (HOST:PORT) serves Prometheus metrics there.
    `log_requests` logs every call (method, peer, duration, status).
    `warm_runners`: a destination keeps that many guest runners started
    ahead, per guest kind the host runs (migrate.guest.warm; 0: none).

    SIGTERM and SIGINT drain it: no new calls, the ones in flight get a
    second to finish, then every run and guest stops, and serve() returns.
    """
    spawn.tune_allocator()
    host = validate.split_endpoint(listen, "listen address", listen=True)[0]
    control = ControlService(roles, host, level, compress, BackingDir(backing_dir) if backing_dir else None,
                             BackingDir(snapshot_dir) if snapshot_dir else None, max_incoming_ram,
                             allow_policy_modules)
    if "dest" in roles and warm_runners:
        control.warm = WarmPool(warm_runners, host_modules())
    if state_dir:
        control.journal = Journal(state_dir)
        control.rejoin_runs()
    for name, path in (images or {}).items():
        control.guests.add_image(name, path)
    server = rpc.server(CALLS, log_requests=log_requests)
    pb_grpc.add_ControlServicer_to_server(control, server)
    if "source" in roles:
        add_pages_servicer(UrgentPages(control.outgoing), server)
    port = rpc.bind(server, listen)
    exporter = MetricsServer(metrics, control) if metrics else None  # a daemon thread: nothing to undo on failure
    listener = None
    if uffd_restore:
        listener = UffdRestoreListener(control.incoming, control.lock, uffd_restore)
    server.start()
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    if on_ready:
        on_ready(port)
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        if exporter:
            exporter.close()
        if listener:
            listener.close()
        server.stop(grace=1.0)
        control.shutdown()

