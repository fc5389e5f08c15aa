"""`migrate run`: drive one migration between two agents, in one of three modes.

* postcopy: switch at once; the destination faults pages in and the rest is pushed.
* hybrid: pre-copy rounds while the guest runs on the source, then post-copy.
* precopy: pre-copy rounds, then stop-and-copy of the last dirty set; the
  destination uses no userfaultfd (the classic baseline).

The orchestrator only talks Control RPCs; pages flow directly from the source
agent to the destination agent, on the native data plane or over gRPC
(migrate.planes; dirty-page bitmaps, one bit per page, pass through here
between the source's scans and the destination's discards).
Until the guest resumes on the destination every failure rolls back: the
guest keeps (or resumes) running on the source. When the source cannot
track writes, hybrid and precopy fall back to postcopy and the report says
why.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from migrate import abort, convergence, planes, policies, report
from migrate.client import AgentClient
from migrate.errors import AgentError, FailedPrecondition, RunFailed, TimedOut
from migrate.names import DataPlane, FaultPath, Mode, Phase, parse
from migrate.planes import PageRoute
from migrate.policies import workingset
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import DEFAULT_RECOVERY_TIMEOUT
from migrate.security import Credentials

_log = logging.getLogger(__name__)

#: Most seconds one wait for the run's end lasts (WaitIncoming): the
#: destination answers at once when the run completes or fails, else after
#: this long with its progress, which a drain shows every migrate.drain.TICK.
POLL_EVERY = 0.25
#: Hybrid: before pausing, discard stale pages on the destination (guest still
#: running) until a step finds at most this many to drop, or SETTLE_STEPS passed.
SETTLE_PAGES = 256
SETTLE_STEPS = 5


class DestinationFailed(AgentError):
    """The destination's run failed: the guest waits, paused, on the source."""


@dataclass
class RunOptions:
    no_push: bool = False
    max_bandwidth: int = 0          # bytes/s of page traffic, 0: unlimited
    source_endpoint: str = ""       # the source as the destination reaches it (default: --from)
    verify: bool = False            # compare the final digest with an unmigrated run
    timeout: float = 3600.0
    mode: str = Mode.HYBRID         # postcopy, hybrid or precopy (migrate.names.Mode)
    precopy_rounds: int = 10        # most pre-copy rounds
    precopy_seconds: float = 0.0    # most seconds of pre-copy, 0: no limit
    max_downtime_ms: float = 20.0   # switch once the dirty set fits this at the link's pace
    recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT  # seconds the destination reconnects to a lost source
    data_plane: str = ""            # native or grpc; "": native unless TLS is configured (planes.default_plane)
    fault_path: str = "grpc"        # grpc or native (needs the native data plane)
    policy: str = ""                # push and prefetch policy, NAME[:key=value,...] (migrate.policies); "": none
    record_ws: str = ""             # write the pages the guest faulted on to this working-set file

    def limits(self) -> convergence.Limits:
        return convergence.Limits(rounds=self.precopy_rounds, seconds=self.precopy_seconds,
                                  max_downtime_ms=self.max_downtime_ms,
                                  shrink=convergence.HYBRID_SHRINK if self.mode == "hybrid" else convergence.SHRINK)

    def plane(self, tls: bool) -> DataPlane:
        """The data plane to use, `tls` saying whether TLS protects the agents' links."""
        return planes.data_plane(self.data_plane) if self.data_plane else planes.default_plane(tls)

    def check(self, tls: bool = False) -> None:
        """ValueError with one clear line for options that cannot work."""
        planes.fault_path(self.fault_path, self.plane(tls))
        parse(Mode, self.mode, "mode")
        if self.precopy_rounds < 1:
            raise ValueError(f"precopy_rounds must be >= 1, got {self.precopy_rounds}")
        if self.precopy_seconds < 0 or self.max_downtime_ms < 0:
            raise ValueError("precopy_seconds and max_downtime_ms must be >= 0")
        if self.mode == Mode.PRECOPY and self.no_push:
            raise ValueError("precopy mode moves every page by copy: --no-push needs postcopy or hybrid")
        if self.policy:
            policies.parse(self.policy).build()  # a bad name, parameter or file fails here, before anything moves

    def policy_request(self, spec: pb.GuestSpec) -> tuple[str, bytes]:
        """(policy spec, working set) for PrepareIncoming: a ws=FILE is read here and travels as ranges."""
        if not self.policy:
            return "", b""
        parsed = policies.parse(self.policy)
        path = parsed.get("ws")
        if not path:
            return str(parsed), b""
        ws = workingset.load(path)
        ws.check_fits(spec.size // spec.page_size, spec.page_size)
        return str(parsed.without("ws")), workingset.pack(ws.ranges)


def union(a: bytes, b: bytes) -> bytes:
    """Two dirty bitmaps (wire format) as one; either may be empty."""
    if not a or not b:
        return a or b
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


class PrecopyLog:
    """The pre-copy rounds of one run, for the switch policy and the report."""

    def __init__(self) -> None:
        self.rounds: list[convergence.Round] = []
        self.settle: list[dict] = []
        self.final_copy: pb.PrecopyRoundReply | None = None
        self.switch_reason = ""
        self.fallback = ""
        self.switch_discarded = 0     # stale pages the destination dropped at switchover
        self.stamps: dict[str, float] = {}  # seconds each step took, from the orchestrator's seat
        self.round_wall: list[float] = []   # each round's seconds, its scan included

    def stamp(self, step: str, since: float) -> float:
        """Add the seconds since `since` to `step`; return now (monotonic)."""
        now = time.monotonic()
        self.stamps[step] = round(self.stamps.get(step, 0.0) + now - since, 4)
        return now

    @property
    def bytes_wire(self) -> int:
        return sum(r.bytes_wire for r in self.rounds) + (self.final_copy.bytes_wire if self.final_copy else 0)

    @property
    def pages(self) -> int:
        return sum(r.sent for r in self.rounds) + (self.final_copy.pages if self.final_copy else 0)

    def to_dict(self) -> dict:
        doc = {
            "rounds": [{"round": i + 1, "sent": r.sent, "discarded": r.discarded, "dirty": r.dirty,
                        "dirty_rate": round(r.dirty_rate, 1), "seconds": round(r.seconds, 4),
                        "wall_s": round(wall, 4), "bytes": r.bytes_wire}
                       for i, (r, wall) in enumerate(zip(self.rounds, self.round_wall))],
            "stamps": self.stamps,
            "settle": self.settle,
            "pages": self.pages,
            "bytes": self.bytes_wire,
            "switch_reason": self.switch_reason,
            "switch_discarded": self.switch_discarded,
        }
        if self.final_copy is not None:
            f = self.final_copy
            doc["final_copy"] = {"discarded": f.discarded, "sent": f.pages, "bytes": f.bytes_wire,
                                 "seconds": round(f.seconds, 4)}
        if self.fallback:
            doc["fallback"] = self.fallback
        return doc


def migrate(name: str, src: str, dst: str, opts: RunOptions,
            on_status: Callable[[pb.MigrationStatus], None] | None = None,
            before_switchover: Callable[[], None] | None = None, credentials: Credentials | None = None) -> dict:
    """Migrate guest `name` from agent `src` to agent `dst`; return the report.

    `credentials` (TLS, token) reach both agents; default: this process's environment.

    `before_switchover` runs once both sides are prepared and pre-copy is
    over, just before the guest pauses: experiments use it to switch at a
    precise moment (pages written meanwhile are caught by the final scan).
    """
    credentials = Credentials.from_env() if credentials is None else credentials
    opts.check(credentials.tls)
    plane = opts.plane(credentials.tls)
    with AgentClient(src, credentials=credentials) as source, AgentClient(dst, credentials=credentials) as dest:
        if "source" not in source.call("Hello", pb.HelloRequest()).roles:
            raise FailedPrecondition(f"agent at {src} is not a source agent")
        if "dest" not in dest.call("Hello", pb.HelloRequest()).roles:
            raise FailedPrecondition(f"agent at {dst} is not a destination agent")
        t_start_ns = time.time_ns()
        t0 = time.monotonic()
        mode = Mode(opts.mode)
        prep = source.call("PrepareOutgoing", pb.PrepareOutgoingRequest(name=name, track_writes=mode != Mode.POSTCOPY,
                                                                        data_plane=plane))
        run = pb.RunRef(run_id=prep.run_id)
        log = PrecopyLog()
        t = log.stamp("prepare_outgoing", t0)
        if mode != Mode.POSTCOPY and prep.tracking_error:
            log.fallback = f"{mode} needs write tracking; fell back to postcopy: {prep.tracking_error}"
            mode = Mode.POSTCOPY
        route = PageRoute.offered(opts.source_endpoint or src, prep, plane, FaultPath(opts.fault_path))
        try:
            policy, working_set = opts.policy_request(prep.spec)
            prepared = dest.call("PrepareIncoming", route.fill(pb.PrepareIncomingRequest(
                run_id=prep.run_id, name=name, spec=prep.spec, mode=mode,
                recovery_timeout_s=opts.recovery_timeout, policy=policy, working_set=working_set,
                record_ws=bool(opts.record_ws))), timeout=120)
            t = log.stamp("prepare_incoming", t)
            stale = _precopy(source, dest, run, opts, log) if mode != Mode.POSTCOPY else b""
            t = log.stamp("precopy", t)
            if before_switchover:
                before_switchover()
            t = time.monotonic()
            if mode == Mode.HYBRID:
                stale = _settle(source, dest, run, stale, log)
                t = log.stamp("settle", t)
            switch = source.call("Switchover", run)
            stale = union(stale, switch.dirty.bitmap)
            if mode == Mode.PRECOPY:  # stop-and-copy: the guest is paused meanwhile
                log.final_copy = dest.call("PrecopyRound", pb.PrecopyRoundRequest(
                    run_id=prep.run_id, discard=stale, pull=True, max_bandwidth=opts.max_bandwidth),
                    timeout=opts.timeout)
                stale = b""
        except BaseException as err:
            _roll_back(source, dest, run, err, name, src, dst)
            raise
        try:
            started = dest.call("StartIncoming", pb.StartIncomingRequest(
                run_id=prep.run_id, state_json=switch.state_json, no_push=opts.no_push,
                max_bandwidth=opts.max_bandwidth, discard=stale))
        except AgentError as err:
            _roll_back(source, dest, run, err, name, src, dst)
            raise
        log.switch_discarded = started.discarded
        t = log.stamp("switch", t)
        end = _finish_or_say(source, dest, name, run, prep.spec, opts, on_status, t0, src)
        log.stamps["postcopy"] = round(end.total_s - (t - t0), 4)  # until the destination said complete
        log.stamp("finish", t0 + end.total_s)  # release on the source, inspections, --verify
        if opts.record_ws:
            _save_working_set(opts.record_ws, prep.spec, end.status, stale)
    doc = report.build(
        name=name, spec=prep.spec, total_s=end.total_s, t_start_ns=t_start_ns, switch=switch,
        prepare_ms=prepared.prepare_ms, resume_ms=started.resume_ms, status=end.status,
        source_stats=end.source_stats, before=end.before, after=end.after, verified=end.verified, mode=mode,
        precopy=log.to_dict(), precopy_pages=log.pages, precopy_bytes=log.bytes_wire,
        downtime_parts=_downtime_parts(switch, started, log), tls=credentials.tls)
    doc.update(timeline=end.timeline.points, switchover_s=end.timeline.switchover_s())
    return doc


def _save_working_set(path: str, spec: pb.GuestSpec, status: pb.MigrationStatus, stale: bytes) -> None:
    """Write the working set: the pages faulted on (first-touch order), then those written at the end
    of pre-copy and discarded at the switch (hybrid), which the guest was using."""
    npages = spec.size // spec.page_size
    ranges = workingset.unpack(status.working_set, npages)
    faulted = {p for first, count in ranges for p in range(first, first + count)}
    written = int.from_bytes(stale, "little") if stale else 0
    extra = [p for p in range(npages) if written >> p & 1 and p not in faulted] if written else []
    workingset.save(path, npages, spec.page_size, ranges + workingset.ranges_of(extra))


def _roll_back(source: AgentClient, dest: AgentClient, run: pb.RunRef, err: BaseException,
               name: str, src: str, dst: str) -> None:
    """Undo a run that failed before the guest resumed on the destination: it runs on the source again.

    Raises RunFailed saying what to do next when `err` is an agent's
    failure (the caller re-raises anything else, e.g. an interrupt).
    """
    _best_effort(dest.call, "AbortIncoming", run)
    try:
        source.call("AbortOutgoing", run)
    except AgentError as undo:
        raise RunFailed(f"{err}; undoing it failed too: {undo}", f"`{abort.command(name, src, dst)}`") from err
    if isinstance(err, AgentError):
        raise RunFailed(str(err), f"nothing to undo: {name!r} runs on {src} as before; "
                                  f"`migrate run` it again once the cause is fixed") from err


def _finish_or_say(source: AgentClient, dest: AgentClient, name: str, run: pb.RunRef, spec: pb.GuestSpec,
                   opts: RunOptions, on_status: Callable[[pb.MigrationStatus], None] | None, t0: float,
                   src: str) -> _Ending:
    """_finish, its failures saying how to get out: after the switchover the guest waits on the source."""
    try:
        return _finish(source, dest, name, run, spec, opts, on_status, t0)
    except DestinationFailed as err:
        raise RunFailed(str(err), f"`{abort.command(name, src, dest.target)}` resumes the guest on {src}") from err
    except AgentError as err:
        raise RunFailed(str(err), f"`{abort.command(name, src, dest.target, resume=True)}` waits for the run "
                                  f"to finish; if it failed, `{abort.command(name, src, dest.target)}`") from err


@dataclass
class _Ending:
    """What the last steps of a migration tell the report."""

    timeline: report.Timeline
    status: pb.MigrationStatus
    total_s: float
    before: pb.GuestInfo
    source_stats: pb.SourceStats
    after: pb.GuestInfo
    verified: bool | None


def _finish(source: AgentClient, dest: AgentClient, name: str, run: pb.RunRef, spec: pb.GuestSpec,
            opts: RunOptions, on_status: Callable[[pb.MigrationStatus], None] | None, t0: float) -> _Ending:
    """Wait for the last page, release the guest on the source, and check it if asked."""
    timeline = report.Timeline(t0)
    status = _wait_complete(dest, name, run, opts, _both(timeline, on_status))
    total_s = time.monotonic() - t0
    before = source.call("InspectGuest", pb.GuestRef(name=name))
    src_stats = source.call("CompleteOutgoing", run)
    after = dest.call("InspectGuest", pb.GuestRef(name=name))
    verified = verify(source, dest, name, spec) if opts.verify else None
    return _Ending(timeline, status, total_s, before, src_stats, after, verified)


def resume(name: str, src: str, dst: str, opts: RunOptions,
           on_status: Callable[[pb.MigrationStatus], None] | None = None,
           credentials: Credentials | None = None) -> dict:
    """Finish a migration of `name` whose orchestrator died after the switchover.

    The destination carried on alone (its paths need no orchestrator);
    the source still holds the guest's memory, paused. Wait for the last
    page, release the guest on the source, and report what can still be
    known (the guest's own clocks give the downtime).
    """
    credentials = Credentials.from_env() if credentials is None else credentials
    with AgentClient(src, credentials=credentials) as source, AgentClient(dst, credentials=credentials) as dest:
        info = source.call("InspectGuest", pb.GuestRef(name=name))
        if not info.run_id:
            raise FailedPrecondition(f"guest {name!r} on {src} is not being migrated: nothing to resume")
        run = pb.RunRef(run_id=info.run_id)
        if info.state != "migrating-out":  # died before the switchover: undo it, the guest never left
            _best_effort(dest.call, "AbortIncoming", run)
            source.call("AbortOutgoing", run)
            raise FailedPrecondition(f"the migration of {name!r} had not switched over; it was aborted and the guest "
                             f"runs on {src} as before: start it again with `migrate run`")
        t_start_ns = _started_ns(dest, run)
        t0 = time.monotonic() - max(time.time_ns() - t_start_ns, 0) / 1e9  # the total counts from the first start
        end = _finish_or_say(source, dest, name, run, info.spec, opts, on_status, t0, src)
    doc = report.build(
        name=name, spec=info.spec, total_s=end.total_s, t_start_ns=t_start_ns,
        switch=pb.SwitchoverReply(last_op_ns=end.before.last_op_ns), prepare_ms=0.0, resume_ms=0.0,
        status=end.status, source_stats=end.source_stats, before=end.before, after=end.after,
        verified=end.verified, mode="resumed", tls=credentials.tls)
    doc.update(timeline=end.timeline.points, switchover_s=end.timeline.switchover_s(), resumed_run=run.run_id)
    return doc


def _started_ns(dest: AgentClient, run: pb.RunRef) -> int:
    """When the run began (the destination recorded it, in its journal too), or now if it cannot say."""
    try:
        detail = json.loads(dest.call("IncomingStatus", run).detail_json or "{}")
    except (AgentError, ValueError):
        return time.time_ns()
    return int(detail.get("started_ns") or time.time_ns())


def _both(first: Callable[[pb.MigrationStatus], None],
          then: Callable[[pb.MigrationStatus], None] | None) -> Callable[[pb.MigrationStatus], None]:
    def call(status: pb.MigrationStatus) -> None:
        first(status)
        if then:
            then(status)
    return call


def _precopy(source: AgentClient, dest: AgentClient, run: pb.RunRef, opts: RunOptions, log: PrecopyLog) -> bytes:
    """Pre-copy rounds until the switch policy says stop; returns the dirty set not yet discarded.

    Each round first discards the pages the previous scan found written
    (so they are pulled again), and the next scan starts only after the
    round returned: a page read by a round is always read before the scan
    that would report a later write to it.
    """
    t0 = last_scan = time.monotonic()
    stale = b""
    while True:
        left = opts.precopy_seconds - (time.monotonic() - t0) if opts.precopy_seconds else 0.0
        r = dest.call("PrecopyRound", pb.PrecopyRoundRequest(
            run_id=run.run_id, discard=stale, pull=True, max_bandwidth=opts.max_bandwidth,
            deadline_s=max(left, 1e-3) if opts.precopy_seconds else 0.0), timeout=opts.timeout)
        dirty = source.call("ScanDirty", run)
        now = time.monotonic()
        log.round_wall.append(now - last_scan)
        log.rounds.append(convergence.Round(sent=r.pages, discarded=r.discarded, seconds=r.seconds,
                                            bytes_wire=r.bytes_wire, dirty=dirty.pages,
                                            dirty_window_s=now - last_scan))
        last_scan, stale = now, dirty.bitmap
        reason = convergence.switch_reason(log.rounds, now - t0, opts.limits())
        if reason:
            log.switch_reason = reason
            return stale


def _settle(source: AgentClient, dest: AgentClient, run: pb.RunRef, stale: bytes, log: PrecopyLog) -> bytes:
    """Hybrid: drop stale pages on the destination while the guest still runs.

    Discarding costs no transfer, and re-dirtied pages that are holes
    already cost nothing, so repeating discard-and-scan shrinks what is left
    for the downtime to what the guest newly dirties in one short step;
    returns the dirty set still to discard.
    """
    for _ in range(SETTLE_STEPS):
        r = dest.call("PrecopyRound", pb.PrecopyRoundRequest(run_id=run.run_id, discard=stale, pull=False))
        dirty = source.call("ScanDirty", run)
        log.settle.append({"discarded": r.discarded, "discard_ms": round(r.discard_ms, 3), "dirty": dirty.pages})
        stale = dirty.bitmap
        if r.discarded <= SETTLE_PAGES:
            break
    return stale


def _downtime_parts(switch: pb.SwitchoverReply, started: pb.StartIncomingReply, log: PrecopyLog) -> dict:
    """Where the downtime went, in ms: each part as the agent doing it timed it.

    state_transfer is the hop from the source's reply to the destination's
    request (CLOCK_REALTIME of both agents) minus the stop-and-copy in between.
    """
    copy_ms = log.final_copy.seconds * 1000.0 + log.final_copy.discard_ms if log.final_copy else 0.0
    hop_ms = (started.received_ns - switch.sent_ns) / 1e6 if started.received_ns and switch.sent_ns else 0.0
    return {"pause": round(switch.pause_ms, 3), "final_scan": round(switch.dirty.scan_ms, 3),
            "state_transfer": round(max(hop_ms - copy_ms, 0.0), 3), "final_copy": round(copy_ms, 3),
            "discard": round(started.discard_ms, 3), "resume": round(started.resume_ms, 3)}


def _wait_complete(dest: AgentClient, name: str, run: pb.RunRef, opts: RunOptions,
                   on_status: Callable[[pb.MigrationStatus], None] | None) -> pb.MigrationStatus:
    """Wait on the destination until every page is in; raise AgentError on failure.

    Each WaitIncoming returns as the run ends, or after POLL_EVERY with the
    progress so far. With --no-push only faults bring pages: once the guest
    has finished its work, the destination is asked for a digest, which
    touches (and so pulls) every page still missing.
    """
    deadline = time.monotonic() + opts.timeout
    toucher: threading.Thread | None = None
    down_since = 0.0
    wait = pb.WaitIncomingRequest(run_id=run.run_id, wait_s=POLL_EVERY)
    while True:
        try:
            status = dest.call("WaitIncoming", wait)
            down_since = 0.0
        except AgentError as err:  # a destination agent restarting (--state-dir) comes back: wait for it
            if err.unreachable and not down_since:
                _log.warning("destination %s unreachable (%s): waiting up to %g s for it to come back",
                             dest.target, err, opts.recovery_timeout)
            down_since = down_since or time.monotonic()
            if not err.unreachable or time.monotonic() - down_since > opts.recovery_timeout:
                raise
            time.sleep(POLL_EVERY * 5)
            continue
        if on_status:
            on_status(status)
        if status.phase == Phase.COMPLETE:
            return status
        if status.phase == Phase.FAILED:
            raise DestinationFailed(f"migration failed on the destination: {status.error}")
        if time.monotonic() > deadline:
            raise TimedOut(f"migration did not complete within {opts.timeout:g} s")
        if opts.no_push and toucher is None and dest.call("InspectGuest", pb.GuestRef(name=name)).finished:
            touch = functools.partial(dest.call, timeout=opts.timeout)
            toucher = threading.Thread(target=_best_effort, args=(touch, "GuestDigest", pb.GuestRef(name=name)),
                                       daemon=True)
            toucher.start()


def verify(source: AgentClient, dest: AgentClient, name: str, spec: pb.GuestSpec) -> bool:
    """Finish the migrated guest and compare its memory with an unmigrated run (--verify; a caller
    may look at the destination first: the digest reads, and so allocates, all of its RAM)."""
    _wait_finished(dest, name)
    migrated = dest.call("GuestDigest", pb.GuestRef(name=name), timeout=600).digest
    ref_name = f"{name}-reference"
    ref_spec = pb.GuestSpec()
    ref_spec.CopyFrom(spec)
    ref_spec.ops_per_sec = 0  # the final memory does not depend on pace
    source.call("LaunchGuest", pb.LaunchGuestRequest(name=ref_name, spec=ref_spec), timeout=600)
    try:
        _wait_finished(source, ref_name)
        reference = source.call("GuestDigest", pb.GuestRef(name=ref_name), timeout=600).digest
    finally:
        _best_effort(source.call, "StopGuest", pb.GuestRef(name=ref_name))
    return migrated == reference


def _wait_finished(agent: AgentClient, name: str, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while not agent.call("InspectGuest", pb.GuestRef(name=name)).finished:
        if time.monotonic() > deadline:
            raise TimedOut(f"guest {name!r} on {agent.target} did not finish within {timeout:g} s")
        time.sleep(0.1)


def _best_effort(fn: Callable, *args: object) -> None:
    try:
        fn(*args)
    except AgentError:
        pass


def write_report(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(report.dumps(doc))
