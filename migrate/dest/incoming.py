"""Destination side of a migration: one incoming run.

PrepareIncoming creates empty guest RAM, starts a guest runner in restore
mode (it registers its RAM with userfaultfd and hands us the fd), creates the
received bitmap, and starts the urgent path and the bulk path; both
connect to the source. On the gRPC data plane they are threads of this
agent (dest/faults.py, dest/bulk.py); on the native plane C threads
(dest/dataplane.py), the urgent path staying on gRPC unless the run asks
for the native fault path (migrate.planes). In
hybrid and precopy modes, PrecopyRound calls then fill RAM while the guest
still runs on the source (migrate.dest.precopy); in precopy mode the runner
has no userfaultfd and neither path starts: every page arrives by pre-copy.
StartIncoming first discards the pages the source reports stale, then
resumes the guest with its execution state and lets the bulk path go. A
watcher notices when every page has arrived, stops both paths, unregisters
the userfaultfd and marks the run complete. The received bitmap is owned
here; the two paths only set bits in it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

from migrate import errors
from migrate.bitmap import SharedBitmap
from migrate.dest.bulk import PLAN_RUNS, BulkLoop
from migrate.dest.dataplane import NativeBulk, NativeFaultLoop, NativePrecopy
from migrate.dest.faults import FaultLoop
from migrate.dest.paths import Memory, note_events
from migrate.dest.precopy import PrecopyPuller, discard, punch_left, unmark
from migrate.dest.written import WrittenPages
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guest.warm import WarmPool
from migrate.guests import HostedGuest, create_memfd
from migrate.journal import Journal, resident_ranges
from migrate.names import FINISHED, DataPlane, FaultPath, Mode, Phase
from migrate.planes import PageRoute
from migrate.policies import Policy, PolicySpec, parse, workingset
from migrate.policies.base import RunInfo
from migrate.policies.runner import PolicyRunner
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import DEFAULT_RECOVERY_TIMEOUT
from migrate.uffd import Region, Uffd

log = logging.getLogger(__name__)

_WATCH_EVERY = 0.02
#: The shortest: when the last pages are due sooner than _WATCH_EVERY (see watch_delay).
_WATCH_MIN = 0.002
#: Seconds between two journal records of a running run's counters (with --state-dir).
_JOURNAL_EVERY = 0.25
#: The counters a restarted agent carries on from (pages received come from the memfd itself).
#: before_resume + pushed + faulted + recovered == pages received; zero pages are among pushed and faulted.
_COUNTERS = ("pushed", "faulted", "zero", "bytes_wire", "bytes_pages", "faults", "recovered", "before_resume")
#: Seconds the guest may stay stopped for a policy's `before_resume` pages (a replayed working set).
BEFORE_RESUME_LIMIT = 30.0


def watch_delay(missing: int, got: int, since: float) -> float:
    """Seconds until the watcher's next look: _WATCH_EVERY, or, when the `missing` pages are due within it at
    the pace since the last look (`got` pages in `since` seconds), about when they are (at least _WATCH_MIN).

    The run completes at the first look that finds every page here: looking every _WATCH_EVERY alone
    added half of it on average to every run's total; looking every _WATCH_MIN all along would cost the
    agent a wake-up for nothing.
    """
    due = missing * since / got if got > 0 else _WATCH_EVERY
    return min(_WATCH_EVERY, max(_WATCH_MIN, due))


class IncomingRun:
    """One guest arriving at this agent."""

    def __init__(self, run_id: str, name: str, spec: GuestSpec, route: PageRoute) -> None:
        self.run_id = run_id
        self.name = name
        self.spec = spec
        self.recovery_timeout = DEFAULT_RECOVERY_TIMEOUT
        self.journal: Journal | None = None  # set by an agent with --state-dir
        self.warm: WarmPool | None = None    # the agent's pre-started runners (--warm-runners), if any
        self._push: dict = {}
        self.started_ns = time.time_ns()   # the run's start, as a resumed `migrate run` reports it
        self._resumed_ns = 0               # when the guest resumed here (realtime: it survives a restart)
        # What the paths do not count: a previous agent's counters, the pages here at the resume, recovered ones.
        self._before: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.route = route
        self.phase = Phase.NEW
        self.error = ""
        self._ended = threading.Event()  # set once the phase is COMPLETE or FAILED (wait_end)
        self.guest: HostedGuest | None = None
        self.bitmap: SharedBitmap | None = None
        self.uffd: Uffd | None = None
        self.regions: list[Region] = []
        self.paths: dict[str, BulkLoop | NativeBulk | FaultLoop | NativeFaultLoop] = {}
        self._mem: Memory | None = None  # the paths' memory: its region table follows REMAP and UNMAP
        self.mode: str = Mode.POSTCOPY
        self.precopy: PrecopyPuller | NativePrecopy | None = None
        self._asked: SharedBitmap | None = None  # pages asked for, shared by the gRPC paths
        self._round_lock = threading.Lock()   # one pre-copy round or start at a time
        self._t_resume = 0.0
        self._t_done = 0.0
        self._watcher: threading.Thread | None = None
        self._final: pb.MigrationStatus | None = None  # the status once complete and released
        self._lock = threading.Lock()
        self._stopping = threading.Lock()  # one _stop_work at a time
        # Push and prefetch policy (migrate.policies): built at prepare, run from the resume on.
        self._policy: tuple[PolicySpec, Policy] | None = None
        self._working_set: list[tuple[int, int]] = []
        self._record_ws = False
        self._runner: PolicyRunner | None = None
        self._written: WrittenPages | None = None  # the written-page scan, while the policy or recorder wants it
        self.recorded_ws: list[tuple[int, int]] = []
        self.before_resume_ms = 0.0  # the guest stayed stopped this long for a policy's before_resume pages
        self._here_at_start = b""    # the received bitmap when a held push started (start(hold_push=True))

    def set_policy(self, spec: str, working_set: bytes = b"", record_ws: bool = False,
                   allow_modules: bool = False) -> None:
        """Use policy `spec` ("": none) with a working set to replay (wire format), and/or record one.

        A module:Class policy only with `allow_modules` (the agent's
        --allow-policy-modules): building it imports that module here.
        PolicyError (a ValueError) with one line when the policy cannot be built.
        """
        if spec:
            parsed = parse(spec)
            if not allow_modules:
                parsed.require_builtin()
            self._policy = (parsed, parsed.build())
        self._working_set = workingset.unpack(working_set, self.page_count)
        self._record_ws = record_ws

    @property
    def watches_writes(self) -> bool:
        """Whether this run reads which pages the guest wrote (its policy watches use, or it records a working
        set): only then does its runner register write-protect (migrate.dest.written)."""
        return self._record_ws or (self._policy is not None and self._policy[1].watches_use)

    @property
    def page_count(self) -> int:
        return self.spec.size // self.spec.page_size

    # ------------------------------------------------------------ prepare
    def prepare(self, mode: str = Mode.POSTCOPY) -> float:
        """Create guest RAM, start the runner and, unless in precopy mode, both paths.

        Each path connects to the source as it starts, so a source that
        cannot be reached fails the prepare step, before the guest ever
        stops on the source. In precopy mode the runner maps RAM without
        userfaultfd, paused and untouched, and waits for its state.
        """
        t0 = time.monotonic()
        self.mode = mode
        fd = create_memfd(self.name, self.spec.size)
        try:
            if mode == Mode.PRECOPY:
                proc = GuestProcess.launch(self.spec, fd, start_paused=True, fill=False, warm=self.warm)
            else:
                rejoin = self.journal.socket_path(self.run_id) if self.journal else ""
                proc = GuestProcess.launch(self.spec, fd, restore=True, rejoin=rejoin, warm=self.warm,
                                           watch_writes=self.watches_writes)
        except BaseException:
            os.close(fd)
            raise
        log.info("run %s: guest runner %d %s in %.0f ms", self.run_id, proc.pid,
                 "warm (pre-started)" if proc.warm else "started", (time.monotonic() - t0) * 1000.0)
        self.guest = HostedGuest(self.name, self.spec, "runner", fd, proc, state="migrating-in", run_id=self.run_id)
        if mode == Mode.PRECOPY:
            self.bitmap = SharedBitmap.create(self.page_count)
            self.phase = Phase.PREPARED
        else:
            assert proc.uffd is not None  # a restore=True runner hands over its uffd
            self.attach(proc.uffd, proc.regions)
            self.start_paths()
        if mode != Mode.POSTCOPY:
            assert self.bitmap is not None
            r = self.route
            if r.plane is DataPlane.NATIVE:
                self.precopy = NativePrecopy(fd, self.bitmap, self.spec.page_size, r.data_endpoint, r.data_key,
                                             self.recovery_timeout)
            else:
                self.precopy = PrecopyPuller(fd, self.bitmap, self.spec.page_size, r.bulk_endpoint, self.run_id,
                                             self.recovery_timeout)
        self._record()
        return (time.monotonic() - t0) * 1000.0

    def attach(self, uffd_fd: int, regions: list[Region]) -> None:
        """Take over a registered userfaultfd and its Firecracker-style regions."""
        self.uffd = Uffd(uffd_fd)
        self.bitmap = SharedBitmap.create(self.page_count)
        page = self.spec.page_size
        covered = SharedBitmap.create(self.page_count)
        try:
            for r in regions:
                if r.page_size != page or r.offset % page or r.first_page + r.pages > self.page_count:
                    raise ValueError(f"region {r} does not fit the guest's {self.page_count} pages of {page}")
                self.regions.append(r)
                covered.set_range(r.first_page, r.pages)
            # Pages no region maps are never faulted on: count them as here.
            page_no = covered.next_clear(0)
            while page_no < self.page_count:
                end = covered.next_set(page_no)
                self.bitmap.set_range(page_no, end - page_no)
                page_no = covered.next_clear(end)
        finally:
            covered.close()

    def start_paths(self) -> None:
        """Start the bulk path (waiting for start()) and the urgent path (serving at once), on the run's plane.

        Both paths share the bitmap of pages asked for (the native bulk's,
        or one this run keeps for the gRPC paths): the bulk does not ask what
        the urgent path asked, nor a gRPC urgent path's prefetch what the
        bulk asked. Asking twice would put pages twice on the wire.
        """
        assert self.uffd is not None and self.bitmap is not None  # attach() made them
        mem = self._mem = Memory.over(self.uffd, self.bitmap, self.regions, self.spec.page_size)
        if self.guest is not None:
            # Our runner's memfd: a hole reads as zeros, so a zero page is only marked received
            # (a handshake client's memory may not be so: its zero pages are installed).
            mem.io.lazy_zero()
        r = self.route
        if r.plane is DataPlane.NATIVE:
            native = NativeBulk(mem, r.data_endpoint, r.data_key, self.recovery_timeout)
            bulk: BulkLoop | NativeBulk = native
            jump, asked = native.jump, native.asked
        else:
            self._asked = asked = SharedBitmap.create(self.page_count)
            bulk = BulkLoop(mem, r.bulk_endpoint, self.run_id, self.recovery_timeout, asked)
            jump = bulk.planner.jump
        self.paths["bulk"] = bulk
        if r.fault_path is FaultPath.NATIVE:
            assert isinstance(bulk, NativeBulk)  # planes.fault_path: the native fault path needs the native plane
            self.paths["faults"] = NativeFaultLoop(mem, r.data_endpoint, r.data_key, bulk, self.recovery_timeout)
        else:
            self.paths["faults"] = FaultLoop(mem, r.source_endpoint, self.run_id, jump, self.recovery_timeout,
                                             asked=asked, installs=bulk)
        self.phase = Phase.PREPARED

    # ------------------------------------------------------------ pre-copy
    def precopy_round(self, stale: bytes, pull: bool, max_bandwidth: int, deadline_s: float) -> pb.PrecopyRoundReply:
        """Discard the stale pages, then (if `pull`) fetch every page not received."""
        with self._round_lock:
            if self.precopy is None:
                raise errors.FailedPrecondition(f"run {self.run_id} is in {self.mode} mode: it takes no pre-copy")
            if self.phase != Phase.PREPARED:
                raise errors.FailedPrecondition(f"run {self.run_id} is {self.phase}: pre-copy ends at switchover")
            assert self.guest is not None and self.bitmap is not None  # prepare() made them
            t0 = time.monotonic()
            if pull:  # the pull rewrites the stale pages: punch out only those it did not
                unmarked = unmark(self.bitmap, stale)
                reply = pb.PrecopyRoundReply(discarded=int.from_bytes(unmarked, "little").bit_count(),
                                             discard_ms=(time.monotonic() - t0) * 1000.0)
                try:
                    got = self.precopy.pull(max_bandwidth, deadline_s)
                finally:
                    punch_left(self.guest.fd, self.bitmap, unmarked, self.spec.page_size)
                reply.pages, reply.zero, reply.bytes_wire, reply.seconds = \
                    got.pages, got.zero, got.bytes_wire, got.seconds
            else:
                discarded, _ = discard(self.guest.fd, self.bitmap, stale, self.spec.page_size)
                reply = pb.PrecopyRoundReply(discarded=discarded, discard_ms=(time.monotonic() - t0) * 1000.0)
            reply.missing = self.page_count - self.bitmap.count()
            return reply

    # -------------------------------------------------------------- start
    def start(self, state_json: bytes, no_push: bool, max_bandwidth: int, stale: bytes = b"",
              hold_push: bool = False) -> pb.StartIncomingReply:
        """Drop the stale pages, resume the guest with its execution state, let the bulk path go.

        With `hold_push` the bulk path fetches only what the policy queues
        (its `before_resume` pages) until record_touched() ends: the guest's
        faults bring the rest of what it touches meanwhile.
        """
        with self._round_lock:
            if self.phase != Phase.PREPARED:
                raise errors.FailedPrecondition(f"run {self.run_id} is {self.phase}, not prepared")
            assert self.bitmap is not None  # prepare() made it
            t0 = time.monotonic()
            discarded, _ = discard(self.guest.fd, self.bitmap, stale, self.spec.page_size) if self.guest else (0, 0)
            t1 = time.monotonic()
            if self.mode == Mode.PRECOPY and not self.bitmap.is_full():
                missing = self.page_count - self.bitmap.count()
                raise errors.FailedPrecondition(f"run {self.run_id} still misses {missing} pages "
                                                "and has no userfaultfd to fetch them: copy them first")
            self._before["before_resume"] = self.bitmap.count()
            if hold_push:
                self._here_at_start = self.bitmap.to_bytes()
            bulk = self._launch(no_push, max_bandwidth, hold_push)
            t2 = time.monotonic()
            self._fetch_before_resume(bulk)
            self.before_resume_ms = (time.monotonic() - t2) * 1000.0
            t2 = time.monotonic()
            if self.guest is not None and self.guest.process is not None:
                state = json.loads(state_json) if state_json else None
                self.guest.process.resume(state or None)
                self.guest.state = "running"
            self._t_resume = time.monotonic()
            if bulk is not None and stale:  # after the resume: it costs a walk of the bitmap
                self._push_first(bulk, stale)
            if self.precopy is not None:  # after the resume: closing a channel takes a while
                self.precopy.close()
            reply = pb.StartIncomingReply(resume_ms=(self._t_resume - t2) * 1000.0, discard_ms=(t1 - t0) * 1000.0,
                                          discarded=discarded)
        self._go(no_push, max_bandwidth)
        return reply

    def _launch(self, no_push: bool, max_bandwidth: int, hold_push: bool = False) -> BulkLoop | NativeBulk | None:
        """Start the policy and let the bulk path go (or stop it: --no-push); the guest may still be stopped."""
        bulk = self.paths.get("bulk")
        assert bulk is None or isinstance(bulk, BulkLoop | NativeBulk)
        if bulk is not None and no_push:
            bulk.stop()
            del self.paths["bulk"]
            bulk = None
        self._start_policy(bulk)
        if bulk is not None:
            bulk.plan_only(hold_push)
            bulk.start(max_bandwidth)
        return bulk

    def record_touched(self, quiet: float, limit: float) -> list[tuple[int, int]]:
        """After start(hold_push=True): wait until the guest has faulted on nothing for `quiet` seconds (at
        most `limit`), let the push go, and return the pages that arrived meanwhile (ranges, address order).

        With the push held, a page arrives only because the guest faulted on
        it (with its neighbourhood) or the policy fetched it before the
        resume: every page the guest touched is among them, none it never
        came near is. The faults are the price: each page touched is a
        remote fault or a neighbour of one.
        """
        t0 = last_change = time.monotonic()
        bitmap = self.bitmap  # its mapping lives as long as this reference, should the run end meanwhile
        assert bitmap is not None  # attach() made it
        count = bitmap.count()
        while self.phase == Phase.RUNNING and time.monotonic() - last_change < quiet and \
                time.monotonic() - t0 < limit:
            time.sleep(0.01)
            if (now := bitmap.count()) != count:
                count, last_change = now, time.monotonic()
        with self._lock:
            if self.bitmap is None:  # released: the run ended meanwhile
                return []
            here = int.from_bytes(self.bitmap.to_bytes(), "little") & ~int.from_bytes(self._here_at_start, "little")
            with SharedBitmap.create(self.page_count) as touched:
                touched.load_bytes(here.to_bytes(len(self._here_at_start), "little"))
                ranges = touched.runs(workingset.MAX_RANGES)
        bulk = self.paths.get("bulk")
        if isinstance(bulk, (BulkLoop, NativeBulk)):
            bulk.plan_only(False)
        return ranges

    def _push_first(self, bulk: BulkLoop | NativeBulk, stale: bytes) -> None:
        """Hybrid: the bulk path pushes the pages written last on the source first, as one scattered stream.

        They were discarded here, and they are what the guest was using when
        it paused: without this the bulk path reaches them in page order and
        the guest faults on them one by one meanwhile. Queued ahead of
        anything but the policy's first decision (its plan queue is bounded:
        the rest of the set comes in page order).
        """
        with SharedBitmap.create(self.page_count) as written:
            written.load_bytes(stale)
            runs = written.runs(PLAN_RUNS)
        log.info("run %s: the bulk path pushes first %d runs of pages written last", self.run_id, bulk.plan(runs))

    def _fetch_before_resume(self, bulk: BulkLoop | NativeBulk | None) -> None:
        """Wait until the policy's `before_resume` ranges are here (the bulk path fetches them first).

        Gives up, resuming the guest anyway, if the bulk path fails or they
        take longer than BEFORE_RESUME_LIMIT: the guest then faults on the rest.
        """
        ranges = self._runner.before_resume if self._runner is not None and bulk is not None else []
        deadline, i = time.monotonic() + BEFORE_RESUME_LIMIT, 0
        while i < len(ranges):
            first, count = ranges[i]
            assert self.bitmap is not None and bulk is not None  # ranges are empty without a bulk path
            if self.bitmap.next_clear(first) >= first + count:
                i += 1
                continue
            why = bulk.failure() or ("it took too long" if time.monotonic() > deadline else "")
            if why:
                log.warning("run %s resumes with %d of %d working-set ranges missing: %s", self.run_id,
                            len(ranges) - i, len(ranges), why)
                return
            time.sleep(0.001)

    def _go(self, no_push: bool, max_bandwidth: int) -> None:
        """Watch for the last page (the paths and the policy run)."""
        self._push = {"no_push": no_push, "max_bandwidth": max_bandwidth}
        self._resumed_ns = self._resumed_ns or time.time_ns()
        self.phase = Phase.RUNNING
        self._record()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"run-{self.run_id[:8]}")
        self._watcher.start()

    def _start_policy(self, bulk: BulkLoop | NativeBulk | None) -> None:
        """Run the policy (or a plain recorder) beside the paths; its first decision is queued before the bulk
        starts."""
        faults = self.paths.get("faults")
        if faults is None or (self._policy is None and not self._record_ws):
            return
        assert isinstance(faults, FaultLoop | NativeFaultLoop)
        spec, policy = self._policy if self._policy is not None else (PolicySpec("none"), Policy())
        info = RunInfo(self.page_count, self.spec.page_size, tuple(self._working_set))
        if (policy.watches_use or self._record_ws) and self._mem is not None and self.guest is not None \
                and self.guest.process is not None:
            self._written = WrittenPages.open(self._mem.io, self.guest.process.pid, self.page_count)
        self._runner = PolicyRunner(policy, str(spec), info, faults, bulk, record=self._record_ws,
                                    written=self._written)
        self._runner.start()

    def _stop_work(self, timeout: float = 10.0) -> None:
        """Stop the policy and every path, waiting up to `timeout` for each path.

        One caller at a time: the watcher failing the run and an AbortIncoming
        closing it get here together, and two threads stopping the same path
        both closed its descriptors (seen: EBADF to AbortIncoming, when the
        second close met a number already closed; had it been reused, the
        second close would have closed another run's file). A second caller
        waits for the first, then finds everything stopped.
        """
        with self._stopping:
            self._stop_policy()
            for w in list(self.paths.values()):
                w.stop(timeout=timeout)

    def _stop_policy(self) -> None:
        if self._runner is not None:
            self._runner.stop()
            if self._record_ws:
                self.recorded_ws = self._runner.working_set()
        if self._written is not None:
            self._written.close()
            self._written = None

    def _record(self) -> None:
        """Journal this run (with --state-dir), so a restarted agent can finish it."""
        if self.journal is None or self.mode == Mode.PRECOPY:
            return
        with self._lock:  # never after _finish or _fail dropped the record
            if self.phase not in FINISHED:
                self._save_record()

    def _save_record(self) -> None:
        assert self.journal is not None  # _record() checked
        self.journal.save(self.run_id, {
            "side": "in", "run_id": self.run_id, "name": self.name, "spec": self.spec.to_dict(), "mode": self.mode,
            **self.route.to_dict(), "recovery_timeout": self.recovery_timeout, "phase": self.phase,
            "started_ns": self.started_ns,
            "resumed_ns": self._resumed_ns, "counters": self._counters(), **self._push,
            "policy": str(self._policy[0]) if self._policy else "", "record_ws": self._record_ws,
            "working_set": workingset.pack(self._working_set).hex()})

    def _counters(self) -> dict[str, int]:
        """The run's counters so far, a previous agent's included."""
        now = {key: 0 for key in _COUNTERS}
        for kind, w in list(self.paths.items()):
            last = w.last
            now["pushed" if kind == "bulk" else "faulted"] += int(last.get("pages", 0))
            for key in ("zero", "bytes_wire", "bytes_pages"):
                now[key] += int(last.get(key, 0))
            now["faults"] += int(last.get("faults", 0))
        return {key: now[key] + self._before.get(key, 0) for key in _COUNTERS}

    @classmethod
    def rejoin(cls, record: dict, journal: Journal, allow_modules: bool = False) -> IncomingRun:
        """Finish a run a previous agent started: take its runner back, rebuild the bitmap, restart both paths.

        The run keeps its policy (rebuilt afresh: what it had learnt is
        lost, a replayed working set's pages here already are skipped);
        what a recorder saw before the restart is lost too.
        """
        run = cls(record["run_id"], record["name"], GuestSpec.from_dict(record["spec"]), PageRoute.from_dict(record))
        run.set_policy(record.get("policy", ""), bytes.fromhex(record.get("working_set", "")),
                       bool(record.get("record_ws")), allow_modules)
        run.journal = journal
        run.mode = record["mode"]
        run.recovery_timeout = float(record["recovery_timeout"])
        run.started_ns = int(record.get("started_ns", run.started_ns))
        run._resumed_ns = int(record.get("resumed_ns", 0))
        run._before.update({k: int(v) for k, v in record.get("counters", {}).items() if k in _COUNTERS})
        proc, memfd = GuestProcess.rejoin(journal.socket_path(run.run_id), run.spec)
        running = record["phase"] == Phase.RUNNING
        run.guest = HostedGuest(run.name, run.spec, "runner", memfd, proc,
                                state="running" if running else "migrating-in", run_id=run.run_id)
        assert proc.uffd is not None  # a rejoined runner hands over its uffd
        run.attach(proc.uffd, proc.regions)
        assert run.bitmap is not None  # attach() made it
        for first, count in resident_ranges(memfd, run.spec.size, run.spec.page_size):
            run.bitmap.set_range(first, count)
        run.start_paths()
        if running:  # elapsed time counts from the resume, before the restart
            run._count_recovered()
            run._t_resume = time.monotonic() - max(time.time_ns() - run._resumed_ns, 0) / 1e9
            no_push, max_bandwidth = bool(record.get("no_push")), int(record.get("max_bandwidth", 0))
            run._launch(no_push, max_bandwidth)
            run._go(no_push, max_bandwidth)
        return run

    def _count_recovered(self) -> None:
        """Count the pages the rebuilt bitmap holds beyond what the journal accounts for.

        The previous agent installed them after its last journal write (up to
        _JOURNAL_EVERY before it died): they did arrive, by a path no one can
        tell now. Counting them apart keeps the report adding up exactly.
        """
        accounted = sum(self._before[key] for key in ("before_resume", "pushed", "faulted", "recovered"))
        assert self.bitmap is not None  # attach() made it
        self._before["recovered"] += max(self.bitmap.count() - accounted, 0)

    def _watch(self) -> None:
        assert self.bitmap is not None  # watched from the start on, after prepare()
        recorded = time.monotonic()
        here, looked = self.bitmap.count(), time.monotonic()
        while self.phase == Phase.RUNNING:
            if time.monotonic() - recorded > _JOURNAL_EVERY:  # a restarted agent counts on from here
                self._record()
                recorded = time.monotonic()
            if self.bitmap.is_full():
                self._t_done = time.monotonic()
                self._finish()
                return
            failure = next((f for f in (w.failure() for w in self.paths.values()) if f), None)
            if failure:
                self._fail(failure)
                return
            before, here, since, looked = here, self.bitmap.count(), looked, time.monotonic()
            time.sleep(watch_delay(self.page_count - here, here - before, looked - since))

    def _finish(self) -> None:
        self._stop_work()
        self._let_go()
        events = self.paths["faults"].last.get("events", {}) if "faults" in self.paths else {}
        note_events(self.run_id, events)
        if self.guest is not None and self.guest.process is not None:
            self.guest.process.release_uffd()  # so a discard still waiting on its event is let go
        with self._lock:
            self.phase = Phase.COMPLETE
            # An agent lives through many migrations: keep the last status, give back the descriptors.
            self._final = self._status()
            self._release()
        self._ended.set()
        if self.guest is not None:
            self.guest.run_id = ""
        if self.journal is not None:
            self.journal.drop(self.run_id)

    def _let_go(self) -> None:
        """Nobody reads the userfaultfd from now on, and a foreign process keeps its own copy
        open: unregister every range where it is now (a moved piece at its new address, or
        the process's next munmap or fork would wait forever for a reader), then read the
        events raised before the unregister, whose threads wait for just that.

        The unregister wakes the threads faulting in the range, but before it clears the
        range's registration: a woken thread that faults again in that moment (a page fault
        under the VMA's own lock needs no mmap lock) waits again, and nothing would wake it
        (seen: a guest thread blocked for minutes after its run completed). So each range is
        woken once more after its unregister, when no new fault can wait there."""
        if self.uffd is None:  # never attached: nothing registered
            return
        regions = self._mem.io.current_regions() if self._mem is not None else list(self.regions)
        for r in regions:
            try:
                self.uffd.unregister(r.base, r.size)
                self.uffd.wake(r.base, r.size)
            except OSError:
                pass  # the guest unmapped or exited: nothing left to unregister
        if self._mem is not None:
            try:
                self._mem.io.read(self._mem.bitmap, 0)
            except OSError:
                pass  # the guest is gone: nobody waits

    def _fail(self, error: str) -> None:
        with self._lock:
            if self.phase in FINISHED:
                return
            self.error = error
            self.phase = Phase.FAILED
        self._ended.set()
        self._stop_work(timeout=2)
        if self.journal is not None:
            self.journal.drop(self.run_id)

    def abort(self, reason: str = "aborted") -> None:
        if self.precopy is not None:
            self.precopy.stop()  # a round in progress stops asking
        self._fail(reason)

    def set_bandwidth(self, max_bandwidth: int) -> None:
        """Pace the bulk path at `max_bandwidth` bytes/s from now on (0: unlimited); urgent requests never are.

        Any bulk path that can change its pace on the fly has `set_bandwidth`.
        """
        with self._lock:
            if self.phase in FINISHED:
                raise errors.FailedPrecondition(f"run {self.run_id} is {self.phase}: it moves no more pages")
            self._push["max_bandwidth"] = max_bandwidth
            paths = list(self.paths.values())
        for path in paths:
            setter = getattr(path, "set_bandwidth", None)
            if setter is not None:
                setter(max_bandwidth)

    def promised_bytes(self) -> tuple[int, int]:
        """(guest RAM, bytes not yet received) while the run holds memory it has not filled; (0, 0) once complete."""
        with self._lock:
            if self.phase == Phase.COMPLETE:
                return 0, 0
            received = self.bitmap.count() * self.spec.page_size if self.bitmap is not None else 0
        return self.spec.size, max(self.spec.size - received, 0)

    # ------------------------------------------------------------- status
    def status(self) -> pb.MigrationStatus:
        with self._lock:
            return self._final or self._status()

    def wait_end(self, timeout: float) -> pb.MigrationStatus:
        """The status once the run has completed or failed, or after `timeout` seconds if sooner.

        A client waiting for the end asks this instead of polling status():
        it hears of the last page within milliseconds, where a poll every
        quarter second made each run wait ~0.1 s after it (a drain of short
        runs lost a third of its time so), and it costs a call per wait, not
        one per poll.
        """
        self._ended.wait(timeout)
        return self.status()

    def _status(self) -> pb.MigrationStatus:
        counts = self._counters()
        end = self._t_done or time.monotonic()
        detail: dict = {k: w.last for k, w in self.paths.items()}
        detail["started_ns"] = self.started_ns
        if self.guest is not None and self.guest.process is not None:
            detail["runner"] = {"pid": self.guest.process.pid, "warm": self.guest.process.warm}
        if self._runner is not None:
            detail["policy"] = dict(self._runner.summary(), before_resume_ms=round(self.before_resume_ms, 3))
        faults = detail.get("faults", {})
        return pb.MigrationStatus(
            run_id=self.run_id, phase=self.phase, error=self.error,
            pages_total=self.page_count,
            pages_received=self.bitmap.count() if self.bitmap else 0,
            pages_pushed=counts["pushed"], pages_faulted=counts["faulted"], pages_zero=counts["zero"],
            pages_recovered=counts["recovered"], pages_before_resume=counts["before_resume"],
            faults=counts["faults"], bytes_wire=counts["bytes_wire"], bytes_pages=counts["bytes_pages"],
            elapsed_s=(end - self._t_resume) if self._t_resume else 0.0,
            detail_json=json.dumps(detail), data_plane=self.route.plane.value,
            fault_path=self.route.fault_path.value, pages_prefetched=int(faults.get("prefetched", 0)),
            prefetch_hits=int(faults.get("prefetch_hits", 0)),
            policy=str(self._policy[0]) if self._policy else "",
            working_set=workingset.pack(self.recorded_ws) if self.phase == Phase.COMPLETE else b"")

    def close(self) -> None:
        """Release what the run holds (not the guest, which the agent now hosts)."""
        self._stop_work(timeout=2)
        with self._lock:
            self._release()

    def _release(self) -> None:
        """Close the run's descriptors and mappings, drop its stopped paths."""
        self.paths = {}
        self._mem = None  # its reader's space (and eventfd) goes with the paths
        if self.precopy is not None:
            self.precopy.close()
        for bitmap in (self.bitmap, self._asked):
            if bitmap is not None:
                bitmap.close()
        self.bitmap = self._asked = None
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
