"""Destination side of a migration: one incoming run.

PrepareIncoming creates empty guest RAM, starts a guest runner in restore
mode (it registers its RAM with userfaultfd and hands us the fd), creates the
received bitmap, and starts the urgent path (dest/faults.py) and the bulk
path (dest/bulk.py), threads of this agent; both connect to the source. In
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

from migrate.bitmap import SharedBitmap
from migrate.journal import Journal, resident_ranges
from migrate.dest.bulk import BulkLoop
from migrate.dest.faults import FaultLoop
from migrate.dest.link import DEFAULT_RECOVERY_TIMEOUT
from migrate.dest.paths import Memory, note_events
from migrate.dest.precopy import PrecopyPuller, discard
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guests import HostedGuest, create_memfd
from migrate.proto import migrate_pb2 as pb
from migrate.uffd import Uffd

log = logging.getLogger("migrate.dest")

_WATCH_EVERY = 0.02
#: Seconds between two journal records of a running run's counters (with --state-dir).
_JOURNAL_EVERY = 0.25
#: The counters a restarted agent carries on from (pages received come from the memfd itself).
_COUNTERS = ("pushed", "faulted", "zero", "bytes_wire", "bytes_pages", "faults")
#: Migration modes: switch at once; pre-copy rounds then post-copy; pre-copy then stop-and-copy.
MODES = ("postcopy", "hybrid", "precopy")


class IncomingRun:
    """One guest arriving at this agent."""

    def __init__(self, run_id: str, name: str, spec: GuestSpec, source_endpoint: str, bulk_endpoint: str) -> None:
        self.run_id = run_id
        self.name = name
        self.spec = spec
        self.recovery_timeout = DEFAULT_RECOVERY_TIMEOUT
        self.journal: Journal | None = None  # set by an agent with --state-dir
        self._push: dict = {}
        self.started_ns = time.time_ns()   # the run's start, as a resumed `migrate run` reports it
        self._resumed_ns = 0               # when the guest resumed here (realtime: it survives a restart)
        self._before: dict[str, int] = dict.fromkeys(_COUNTERS, 0)  # counted by a previous agent
        self.source_endpoint = source_endpoint
        self.bulk_endpoint = bulk_endpoint
        self.phase = "new"
        self.error = ""
        self.guest: HostedGuest | None = None
        self.bitmap: SharedBitmap | None = None
        self.uffd: Uffd | None = None
        self.regions: list[tuple[int, int, int]] = []
        self.paths: dict[str, BulkLoop | FaultLoop] = {}
        self.mode = "postcopy"
        self.precopy: PrecopyPuller | None = None
        self._round_lock = threading.Lock()   # one pre-copy round or start at a time
        self._t_resume = 0.0
        self._t_done = 0.0
        self._watcher: threading.Thread | None = None
        self._final: pb.MigrationStatus | None = None  # the status once complete and released
        self._lock = threading.Lock()

    @property
    def page_count(self) -> int:
        return self.spec.size // self.spec.page_size

    # ------------------------------------------------------------ prepare
    def prepare(self, mode: str = "postcopy") -> float:
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
            if mode == "precopy":
                proc = GuestProcess.launch(self.spec, fd, start_paused=True, fill=False)
            else:
                rejoin = self.journal.socket_path(self.run_id) if self.journal else ""
                proc = GuestProcess.launch(self.spec, fd, restore=True, rejoin=rejoin)
        except BaseException:
            os.close(fd)
            raise
        self.guest = HostedGuest(self.name, self.spec, "runner", fd, proc, state="migrating-in", run_id=self.run_id)
        if mode == "precopy":
            self.bitmap = SharedBitmap.create(self.page_count)
            self.phase = "prepared"
        else:
            self.attach(proc.uffd, proc.regions)
            self.start_paths()
        if mode != "postcopy":
            self.precopy = PrecopyPuller(fd, self.bitmap, self.spec.page_size, self.bulk_endpoint, self.run_id,
                                         self.recovery_timeout)
        self._record()
        return (time.monotonic() - t0) * 1000.0

    def attach(self, uffd_fd: int, regions: list[dict]) -> None:
        """Take over a registered userfaultfd and its Firecracker-style regions."""
        self.uffd = Uffd(uffd_fd)
        self.bitmap = SharedBitmap.create(self.page_count)
        page = self.spec.page_size
        covered = SharedBitmap.create(self.page_count)
        try:
            for r in regions:
                first = r["offset"] // page
                count = r["size"] // page
                if r["offset"] % page or first + count > self.page_count:
                    raise ValueError(f"region {r} does not fit the guest's {self.page_count} pages")
                self.regions.append((r["base_host_virt_addr"], r["size"], first))
                covered.set_range(first, count)
            # Pages no region maps are never faulted on: count them as here.
            page_no = covered.next_clear(0)
            while page_no < self.page_count:
                end = covered.next_set(page_no)
                self.bitmap.set_range(page_no, end - page_no)
                page_no = covered.next_clear(end)
        finally:
            covered.close()

    def start_paths(self) -> None:
        """Start the bulk path (waiting for start()) and the urgent path (serving at once)."""
        mem = Memory.over(self.uffd, self.bitmap, self.regions, self.spec.page_size)
        bulk = BulkLoop(mem, self.bulk_endpoint, self.run_id, self.recovery_timeout)
        self.paths["bulk"] = bulk
        self.paths["faults"] = FaultLoop(mem, self.source_endpoint, self.run_id, bulk.planner.jump,
                                         self.recovery_timeout)
        self.phase = "prepared"

    # ------------------------------------------------------------ pre-copy
    def precopy_round(self, stale: bytes, pull: bool, max_bandwidth: int, deadline_s: float) -> pb.PrecopyRoundReply:
        """Discard the stale pages, then (if `pull`) fetch every page not received."""
        with self._round_lock:
            if self.precopy is None:
                raise RuntimeError(f"run {self.run_id} is in {self.mode} mode: it takes no pre-copy")
            if self.phase != "prepared":
                raise RuntimeError(f"run {self.run_id} is {self.phase}: pre-copy ends at switchover")
            t0 = time.monotonic()
            discarded, _ = discard(self.guest.fd, self.bitmap, stale, self.spec.page_size)
            reply = pb.PrecopyRoundReply(discarded=discarded, discard_ms=(time.monotonic() - t0) * 1000.0)
            if pull:
                got = self.precopy.pull(max_bandwidth, deadline_s)
                reply.pages, reply.zero, reply.bytes_wire, reply.seconds = \
                    got.pages, got.zero, got.bytes_wire, got.seconds
            reply.missing = self.page_count - self.bitmap.count()
            return reply

    # -------------------------------------------------------------- start
    def start(self, state_json: bytes, no_push: bool, max_bandwidth: int, stale: bytes = b"") -> pb.StartIncomingReply:
        """Drop the stale pages, resume the guest with its execution state, let the bulk path go."""
        with self._round_lock:
            if self.phase != "prepared":
                raise RuntimeError(f"run {self.run_id} is {self.phase}, not prepared")
            t0 = time.monotonic()
            discarded, _ = discard(self.guest.fd, self.bitmap, stale, self.spec.page_size) if self.guest else (0, 0)
            t1 = time.monotonic()
            if self.mode == "precopy" and not self.bitmap.is_full():
                raise RuntimeError(f"run {self.run_id} still misses {self.page_count - self.bitmap.count()} pages "
                                   "and has no userfaultfd to fetch them: copy them first")
            if self.guest is not None and self.guest.process is not None:
                state = json.loads(state_json) if state_json else None
                self.guest.process.resume(state or None)
                self.guest.state = "running"
            self._t_resume = time.monotonic()
            if self.precopy is not None:  # after the resume: closing a channel takes a while
                self.precopy.close()
            reply = pb.StartIncomingReply(resume_ms=(self._t_resume - t1) * 1000.0, discard_ms=(t1 - t0) * 1000.0,
                                          discarded=discarded)
        self._go(no_push, max_bandwidth)
        return reply

    def _go(self, no_push: bool, max_bandwidth: int) -> None:
        """Let the bulk path go (or stop it: --no-push) and watch for the last page."""
        bulk = self.paths.get("bulk")
        if bulk is not None and no_push:
            bulk.stop()
            del self.paths["bulk"]
        elif bulk is not None:
            bulk.start(max_bandwidth)
        self._push = {"no_push": no_push, "max_bandwidth": max_bandwidth}
        self._resumed_ns = self._resumed_ns or time.time_ns()
        self.phase = "running"
        self._record()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"run-{self.run_id[:8]}")
        self._watcher.start()

    def _record(self) -> None:
        """Journal this run (with --state-dir), so a restarted agent can finish it."""
        if self.journal is None or self.mode == "precopy":
            return
        with self._lock:  # never after _finish or _fail dropped the record
            if self.phase not in ("complete", "failed"):
                self._save_record()

    def _save_record(self) -> None:
        self.journal.save(self.run_id, {
            "side": "in", "run_id": self.run_id, "name": self.name, "spec": self.spec.to_dict(), "mode": self.mode,
            "source_endpoint": self.source_endpoint, "bulk_endpoint": self.bulk_endpoint,
            "recovery_timeout": self.recovery_timeout, "phase": self.phase, "started_ns": self.started_ns,
            "resumed_ns": self._resumed_ns, "counters": self._counters(), **self._push})

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
    def rejoin(cls, record: dict, journal: Journal) -> "IncomingRun":
        """Finish a run a previous agent started: take its runner back, rebuild the bitmap, restart both paths."""
        run = cls(record["run_id"], record["name"], GuestSpec.from_dict(record["spec"]), record["source_endpoint"],
                  record["bulk_endpoint"])
        run.journal = journal
        run.mode = record["mode"]
        run.recovery_timeout = float(record["recovery_timeout"])
        run.started_ns = int(record.get("started_ns", run.started_ns))
        run._resumed_ns = int(record.get("resumed_ns", 0))
        run._before.update({k: int(v) for k, v in record.get("counters", {}).items() if k in _COUNTERS})
        proc, memfd = GuestProcess.rejoin(journal.socket_path(run.run_id), run.spec)
        running = record["phase"] == "running"
        run.guest = HostedGuest(run.name, run.spec, "runner", memfd, proc,
                                state="running" if running else "migrating-in", run_id=run.run_id)
        run.attach(proc.uffd, proc.regions)
        for first, count in resident_ranges(memfd, run.spec.size, run.spec.page_size):
            run.bitmap.set_range(first, count)
        run.start_paths()
        if running:  # elapsed time counts from the resume, before the restart
            run._t_resume = time.monotonic() - max(time.time_ns() - run._resumed_ns, 0) / 1e9
            run._go(bool(record.get("no_push")), int(record.get("max_bandwidth", 0)))
        return run

    def _watch(self) -> None:
        recorded = time.monotonic()
        while self.phase == "running":
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
            time.sleep(_WATCH_EVERY)

    def _finish(self) -> None:
        for w in self.paths.values():
            w.stop()
        for base, size, _ in self.regions:
            try:
                self.uffd.unregister(base, size)
            except OSError:
                pass  # the guest unmapped or exited: nothing left to unregister
        events = self.paths["faults"].last.get("events", {}) if "faults" in self.paths else {}
        note_events(self.run_id, events)
        if self.guest is not None and self.guest.process is not None:
            self.guest.process.release_uffd()  # so a discard still waiting on its event is let go
        with self._lock:
            self.phase = "complete"
            # An agent lives through many migrations: keep the last status, give back the descriptors.
            self._final = self._status()
            self._release()
        if self.guest is not None:
            self.guest.run_id = ""
        if self.journal is not None:
            self.journal.drop(self.run_id)

    def _fail(self, error: str) -> None:
        with self._lock:
            if self.phase in ("complete", "failed"):
                return
            self.error = error
            self.phase = "failed"
        for w in self.paths.values():
            w.stop(timeout=2)
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
            if self.phase in ("complete", "failed"):
                raise RuntimeError(f"run {self.run_id} is {self.phase}: it moves no more pages")
            self._push["max_bandwidth"] = max_bandwidth
            paths = list(self.paths.values())
        for path in paths:
            setter = getattr(path, "set_bandwidth", None)
            if setter is not None:
                setter(max_bandwidth)

    def promised_bytes(self) -> tuple[int, int]:
        """(guest RAM, bytes not yet received) while the run holds memory it has not filled; (0, 0) once complete."""
        with self._lock:
            if self.phase == "complete":
                return 0, 0
            received = self.bitmap.count() * self.spec.page_size if self.bitmap is not None else 0
        return self.spec.size, max(self.spec.size - received, 0)

    # ------------------------------------------------------------- status
    def status(self) -> pb.MigrationStatus:
        with self._lock:
            return self._final or self._status()

    def _status(self) -> pb.MigrationStatus:
        counts = self._counters()
        end = self._t_done or time.monotonic()
        detail: dict = {k: w.last for k, w in self.paths.items()}
        detail["started_ns"] = self.started_ns
        return pb.MigrationStatus(
            run_id=self.run_id, phase=self.phase, error=self.error,
            pages_total=self.page_count,
            pages_received=self.bitmap.count() if self.bitmap else 0,
            pages_pushed=counts["pushed"], pages_faulted=counts["faulted"], pages_zero=counts["zero"],
            faults=counts["faults"], bytes_wire=counts["bytes_wire"], bytes_pages=counts["bytes_pages"],
            elapsed_s=(end - self._t_resume) if self._t_resume else 0.0,
            detail_json=json.dumps(detail))

    def close(self) -> None:
        """Release what the run holds (not the guest, which the agent now hosts)."""
        for w in self.paths.values():
            w.stop(timeout=2)
        with self._lock:
            self._release()

    def _release(self) -> None:
        """Close the run's descriptors and mappings, drop its stopped paths."""
        self.paths = {}
        if self.precopy is not None:
            self.precopy.close()
        if self.bitmap is not None:
            self.bitmap.close()
            self.bitmap = None
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
