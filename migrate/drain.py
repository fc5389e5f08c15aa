"""`migrate drain`: move every guest off a source agent, a few at a time.

Each guest is one ordinary run (orchestrator.migrate, in a thread of its
own), so a drain's runs fail, roll back and recover exactly as single runs
do. What the drain adds is policy:

* at most `parallel` runs at once; the largest guests go first;
* each guest goes to the destination with the most free memory that holds
  it (each destination agent's Capacity: its host's available memory less
  what it promised to incoming runs), asked again before every placement,
  less what the drain itself started there that the agent does not count
  yet. A guest that fits nowhere waits while runs are active (a finished
  run gives back a --max-incoming-ram promise) and is left running on the
  source once none are;
* `max_bandwidth` is the drain's total: each active run gets an equal
  share, at its start and, through the destination's SetBandwidth, while
  it runs, so a finished run hands its share on;
* a run that failed after the switchover is aborted when that is safe
  (migrate.abort refuses when the guest may run on the destination), so a
  guest that did not move runs on the source again, or the summary says
  what to do next;
* a run an agent refused for want of room or of call slots (each agent
  serves a few slow calls per peer at once, migrate.admission), rolled
  back to the source, is tried again, up to RETRIES times, and the drain
  runs fewer at once from then on: one less than were active at the
  refusal, and at most SLOW_CALLS_PER_PEER.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from migrate import abort, orchestrator
from migrate.admission import SLOW_CALLS_PER_PEER
from migrate.client import AgentClient
from migrate.errors import ResourceExhausted
from migrate.names import Mode, Phase
from migrate.orchestrator import RunOptions
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import AgentError
from migrate.security import Credentials
from migrate.units import MiB, format_size

_log = logging.getLogger(__name__)

#: Seconds between two looks at the active runs (bandwidth shares, progress).
TICK = 0.25
#: Guest states a drain moves (a runner whose workload finished still holds its memory).
DRAINABLE = ("running", "paused", "finished")
#: Seconds to wait for a destination agent to answer a Capacity or SetBandwidth call.
_ASK_TIMEOUT = 5.0
#: Times a guest is tried again after an agent refused its run (RESOURCE_EXHAUSTED) and it rolled back.
RETRIES = 3


class DrainError(AgentError):
    """A drain that cannot begin (an agent of the wrong role, an unreachable source)."""


@dataclass
class Outcome:
    """One guest of a drain: where it went and how, or why it did not move."""

    name: str
    size: int
    dest: str = ""
    report: dict | None = None
    error: str = ""                 # why it did not move
    next_step: str = ""             # what to do about it, when something must be done
    started: float = 0.0            # time.monotonic() of the run's start, 0: never started
    ended: float = 0.0
    status: pb.MigrationStatus | None = None   # the destination's latest word on the run
    opts: RunOptions | None = field(default=None, repr=False)
    applied_bandwidth: int | None = None       # the pace the destination was last told (None: not yet)
    tries: int = 0                             # earlier runs an agent refused
    refused: bool = False                      # an agent refused this run and the guest is back on the source

    @property
    def moved(self) -> bool:
        return self.report is not None

    @property
    def active(self) -> bool:
        return bool(self.started) and not self.ended


class Drain:
    """Moves every guest of `src` to the destinations `dests`; run() returns the outcomes.

    `on_tick(drain)` is called from the drain's thread whenever a run
    starts or ends and every TICK while runs are active (progress display).
    """

    def __init__(self, src: str, dests: list[str], opts: RunOptions, *, parallel: int = 2,
                 max_bandwidth: int = 0, report_dir: str = "", credentials: Credentials | None = None,
                 on_tick: Callable[[Drain], None] | None = None) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if not dests:
            raise ValueError("a drain needs at least one destination")
        opts.check()
        self.src = src
        self.dests = list(dict.fromkeys(dests))
        self.opts = opts
        self.parallel = parallel
        self.max_bandwidth = max_bandwidth
        self.report_dir = report_dir
        self.credentials = credentials
        self.on_tick = on_tick
        self.outcomes: list[Outcome] = []
        self.t0 = time.monotonic()
        self._cond = threading.Condition()
        self._clients: dict[str, AgentClient] = {}
        self._threads: list[threading.Thread] = []
        self._limit = parallel  # runs at once: lowered when an agent refuses one for want of call slots

    # ------------------------------------------------------------ the loop
    def run(self) -> list[Outcome]:
        """Drain the source; every run has ended when this returns."""
        self._check_roles()
        try:
            queue = self._guests()
            while True:
                active = self.active_runs()  # before the refused are taken: a run refused marks itself, then ends
                queue = sorted(queue + self._take_refused(), key=lambda o: (-o.size, o.name))
                if not queue and not active:
                    break
                while queue and len(self.active_runs()) < self._limit:
                    placed = self._place(queue)
                    if placed is None:
                        break
                    self._start(*placed)
                if queue and not self.active_runs():  # nothing will free room: what is left fits nowhere
                    self._give_up(queue)
                    break
                self._share_bandwidth()
                self._tick()
                with self._cond:
                    self._cond.wait(TICK)
            for t in self._threads:
                t.join()
            self._tick()
        finally:
            for client in self._clients.values():
                client.close()
        self._write_summary()
        return self.outcomes

    def active_runs(self) -> list[Outcome]:
        with self._cond:
            return [o for o in self.outcomes if o.active]

    def _take_refused(self) -> list[Outcome]:
        """Refused runs that ended, as fresh entries to queue (those refused RETRIES times stay failures)."""
        again = []
        with self._cond:
            for o in [o for o in self.outcomes if o.refused and o.ended and o.tries < RETRIES]:
                self.outcomes.remove(o)
                again.append(Outcome(o.name, o.size, tries=o.tries + 1))
        return again

    def _tick(self) -> None:
        if self.on_tick:
            self.on_tick(self)

    def _check_roles(self) -> None:
        for target, role in [(self.src, "source"), *((d, "dest") for d in self.dests)]:
            with AgentClient(target, credentials=self.credentials) as client:
                if role not in client.call("Hello", pb.HelloRequest()).roles:
                    raise DrainError(f"agent at {target} is not a {role} agent")

    def _guests(self) -> list[Outcome]:
        """The source's guests to move, largest first; a guest already being migrated is named, not moved."""
        with AgentClient(self.src, credentials=self.credentials) as client:
            guests = client.call("ListGuests", pb.ListGuestsRequest()).guests
        queue = []
        for g in sorted(guests, key=lambda g: (-g.spec.size, g.name)):
            if g.kind != "runner" or g.state not in DRAINABLE:
                continue
            outcome = Outcome(g.name, g.spec.size)
            if g.run_id:
                outcome.error = f"already being migrated (run {g.run_id})"
                self.outcomes.append(outcome)
            else:
                queue.append(outcome)
        return queue

    # ----------------------------------------------------------- placement
    def _client(self, dest: str) -> AgentClient:
        if dest not in self._clients:
            self._clients[dest] = AgentClient(dest, connect_timeout=_ASK_TIMEOUT, credentials=self.credentials)
        return self._clients[dest]

    def rooms(self) -> dict[str, int | str]:
        """Bytes each destination can take now (or why it cannot be asked), less the drain's runs it does not count
        yet."""
        rooms: dict[str, int | str] = {}
        for dest in self.dests:
            try:
                cap = self._client(dest).call("Capacity", pb.CapacityRequest(), timeout=_ASK_TIMEOUT)
            except AgentError as err:
                rooms[dest] = str(err)
                continue
            counted = set(cap.guests)
            mine = sum(o.size for o in self.active_runs() if o.dest == dest and o.name not in counted)
            rooms[dest] = max(cap.free - mine, 0)
        return rooms

    def _place(self, queue: list[Outcome]) -> tuple[Outcome, str] | None:
        """The first guest of `queue` some destination holds, and the roomiest such destination."""
        rooms = self.rooms()
        for outcome in queue:
            fits = [(room, dest) for dest, room in rooms.items() if isinstance(room, int) and room >= outcome.size]
            if fits:
                queue.remove(outcome)
                return outcome, max(fits, key=lambda f: f[0])[1]
        return None

    def _give_up(self, queue: list[Outcome]) -> None:
        """What is left fits on no destination: it stays on the source, and says why."""
        rooms = self.rooms()
        free = {d: r for d, r in rooms.items() if isinstance(r, int)}
        if free:
            best = max(free, key=free.__getitem__)
            why = f"most free: {format_size(free[best])} at {best}"
        else:
            why = "; ".join(f"{d}: {r}" for d, r in rooms.items())
        for outcome in queue:
            outcome.error = f"fits on no destination (needs {format_size(outcome.size)}; {why}); still on {self.src}"
            with self._cond:
                self.outcomes.append(outcome)
        queue.clear()

    # ---------------------------------------------------------------- runs
    def share(self) -> int:
        """Each active run's bytes/s of the drain's total (0: unlimited)."""
        if not self.max_bandwidth:
            return 0
        return max(self.max_bandwidth // max(len(self.active_runs()), 1), 1)

    def _start(self, outcome: Outcome, dest: str) -> None:
        with self._cond:
            outcome.dest, outcome.started = dest, time.monotonic()
            self.outcomes.append(outcome)
        outcome.opts = dataclasses.replace(self.opts, max_bandwidth=self.share())
        thread = threading.Thread(target=self._migrate, args=(outcome,), daemon=True,
                                  name=f"drain-{outcome.name}"[:15])
        self._threads.append(thread)
        thread.start()
        self._tick()

    def _migrate(self, outcome: Outcome) -> None:
        """One guest's run (in its own thread)."""
        assert outcome.opts is not None, "set when the run is started"
        try:
            outcome.report = orchestrator.migrate(outcome.name, self.src, outcome.dest, outcome.opts,
                                                  on_status=lambda st: setattr(outcome, "status", st),
                                                  credentials=self.credentials)
        except orchestrator.RunFailed as err:
            outcome.error, outcome.next_step = str(err), err.next_step
            self._undo(outcome, refused=isinstance(err.__cause__, ResourceExhausted))
        except AgentError as err:
            outcome.error = str(err)
        except Exception as err:  # noqa: BLE001 - one run's surprise must not stop the others
            _log.exception("the run of %s failed", outcome.name)
            outcome.error = f"{type(err).__name__}: {err}"
        if outcome.report is not None and self.report_dir:
            orchestrator.write_report(outcome.report, os.path.join(self.report_dir, f"{outcome.name}.json"))
        with self._cond:
            outcome.ended = time.monotonic()
            self._cond.notify_all()

    def _undo(self, outcome: Outcome, refused: bool) -> None:
        """After a failed run, resume the guest on the source when that is safe (migrate.abort decides).

        A run an agent `refused` (RESOURCE_EXHAUSTED) that rolled back is
        marked to be tried again, and the drain runs fewer at once."""
        try:
            with AgentClient(self.src, credentials=self.credentials) as source:
                if not source.call("InspectGuest", pb.GuestRef(name=outcome.name)).run_id:
                    if refused:  # rolled back already: it runs on the source, and may go later
                        self._refused(outcome)
                    return
            note = abort.abort(outcome.name, self.src, outcome.dest, credentials=self.credentials)
        except AgentError as err:
            outcome.error += f"; not resumed on the source: {err}"
            return
        outcome.next_step = ""
        outcome.error += f"; {note}"

    def _refused(self, outcome: Outcome) -> None:
        """Mark `outcome` to go again; run fewer at once: less than were active (this one aside), and no more
        than an agent serves one peer's slow calls (a run makes one at a time to each agent)."""
        with self._cond:
            limit = max(min(len([o for o in self.outcomes if o.active]) - 1, SLOW_CALLS_PER_PEER), 1)
            if limit < self._limit:
                _log.info("an agent refused the run of %s (%s): at most %d runs at once from now on",
                          outcome.name, outcome.error, limit)
                self._limit = limit
            outcome.refused = True

    def _share_bandwidth(self) -> None:
        """Give every active run its share: the next steps of its run, and its bulk path on the destination."""
        share = self.share()
        for outcome in self.active_runs():
            assert outcome.opts is not None, "set when the run is started"
            outcome.opts.max_bandwidth = share  # read by its next pre-copy round or its start
            st = outcome.status
            if not self.max_bandwidth or st is None or st.phase != Phase.RUNNING or outcome.applied_bandwidth == share:
                continue
            try:
                self._client(outcome.dest).call("SetBandwidth", pb.SetBandwidthRequest(
                    run_id=st.run_id, max_bandwidth=share), timeout=_ASK_TIMEOUT)
                outcome.applied_bandwidth = share
            except AgentError as err:  # it completed or failed meanwhile: its own thread reports that
                _log.info("bandwidth of %s not changed: %s", outcome.name, err)

    # -------------------------------------------------------------- report
    def _write_summary(self) -> None:
        if not self.report_dir:
            return
        doc = {"source": self.src, "destinations": self.dests, "parallel": self.parallel,
               "max_bandwidth": self.max_bandwidth, "guests": [self.row(o) for o in self.outcomes]}
        with open(os.path.join(self.report_dir, "drain.json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")

    def row(self, o: Outcome) -> dict:
        """One guest's line of the drain's summary (times in seconds since the drain began)."""
        doc: dict = {"guest": o.name, "size": o.size, "destination": o.dest, "moved": o.moved}
        if o.started:
            doc.update(started_s=round(o.started - self.t0, 3), ended_s=round(o.ended - self.t0, 3))
        if o.report is not None:
            doc.update(total_s=o.report["total_s"], downtime_ms=o.report["downtime_ms"],
                       blocked_ms=o.report["guest"]["blocked_ms"], verified=o.report.get("verified"),
                       pages_bytes=o.report["bytes"]["pages"], transfer_s=o.report["transfer_s"])
        if o.error:
            doc.update(error=o.error, next_step=o.next_step)
        return doc


def most_at_once(outcomes: list[Outcome]) -> int:
    """The most runs that were active at the same moment."""
    edges = sorted([(o.started, 1) for o in outcomes if o.started] + [(o.ended, -1) for o in outcomes if o.started])
    most = now = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most


# -------------------------------------------------------------- display
def progress_lines(drain: Drain, *, coarse: bool = False) -> list[str]:
    """One line per active run and a total line; `coarse` rounds to 10 % steps (a pipe prints on change)."""
    lines, rate_sum = [], 0.0
    for o in drain.active_runs():
        st = o.status
        if st is None:
            step = "pre-copy" if drain.opts.mode != Mode.POSTCOPY else "preparing"
            lines.append(f"  {o.name:<16} -> {o.dest:<21} {step}")
            continue
        frac = st.pages_received / max(st.pages_total, 1)
        rate = st.bytes_pages / MiB / st.elapsed_s if st.elapsed_s > 0 else 0.0
        rate_sum += rate
        if coarse:
            lines.append(f"  {o.name:<16} -> {o.dest:<21} {int(frac * 10) * 10:3d}%  {st.phase}")
        else:
            lines.append(f"  {o.name:<16} -> {o.dest:<21} [{'#' * int(frac * 20):<20}] {frac * 100:5.1f}%  "
                         f"{rate:7.1f} MiB/s  {st.phase}")
    moved = sum(o.moved for o in drain.outcomes)
    failed = sum(bool(o.error) for o in drain.outcomes)
    total = f"drain {drain.src}: {moved} moved, {len(lines)} active, {failed} not moved"
    if not coarse:
        total += f", {rate_sum:.0f} MiB/s"
    return lines + [total]


def summary_table(drain: Drain) -> str:
    """The table printed at the end: one row per guest, then why each unmoved guest did not move."""
    head = f"{'GUEST':16} {'DESTINATION':21} {'TOTAL':>8} {'DOWNTIME':>10} {'BLOCKED':>9} VERIFIED"
    rows, notes = [head], []
    for o in drain.outcomes:
        r = drain.row(o)
        if o.moved:
            verified = {True: "yes", False: "NO", None: "-"}[r["verified"]]
            rows.append(f"{o.name:16} {o.dest:21} {r['total_s']:7.2f}s {r['downtime_ms']:8.2f}ms "
                        f"{r['blocked_ms']:7.0f}ms {verified}")
        else:
            rows.append(f"{o.name:16} {o.dest or '-':21} {'-':>8} {'-':>10} {'-':>9} not moved")
            notes.append(f"  {o.name}: {o.error}" + (f"; next: {o.next_step}" if o.next_step else ""))
    return "\n".join(rows + notes)
