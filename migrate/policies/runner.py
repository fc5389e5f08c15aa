"""Runs a policy for one incoming run, on a thread of its own, off the fault path.

Every PERIOD it reads the faults the fault path recorded since the last
time (a ring in C on the native fault path, a queue on the gRPC one), the
prefetch counters, asks the policy, and hands its decision to the paths:
ranges to the bulk path's plan queue (bounded: what does not fit waits
here), the neighbourhood to the fault path, which applies it itself from
its next fault on. With `record`, it also keeps the pages faulted on, in
first-touch order: the working set `--record-ws` writes.

With a `written` scan (migrate.dest.written: the run installs pages
write-protected and reads which ones the guest wrote), every SCAN_PERIOD it
also counts the prefetched pages written as hits (the fault path sees a page
used only when the guest faults on it or right past it) and, recording, adds
the written pages to the working set: with the push on, most of what the
guest touches came before it faulted, and a file of faults alone misses it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from migrate.bitmap import SharedBitmap
from migrate.policies import workingset
from migrate.policies.base import Decision, Neighbourhood, Policy, RunInfo, Tick

log = logging.getLogger(__name__)

#: Seconds between two calls of the policy.
PERIOD = 0.005
#: Seconds between two scans for written pages (one PAGEMAP_SCAN walks the guest's page tables: ~1 ms a GiB).
SCAN_PERIOD = 0.02
#: Most runs of written pages read from one scan into a recorded working set.
MAX_SCAN_RUNS = 1 << 20


class FaultFeed(Protocol):
    """What a fault path offers a policy (FaultLoop, NativeFaultLoop)."""

    def new_faults(self) -> list[int]: ...
    def prefetch_counts(self) -> tuple[int, int]: ...
    def set_neighbourhood(self, nb: Neighbourhood) -> None: ...
    def count_used(self, used: SharedBitmap) -> int: ...


class UseScan(Protocol):
    """Which pages the guest wrote since the last look (migrate.dest.written.WrittenPages)."""

    def scan(self) -> SharedBitmap: ...
    @property
    def total(self) -> int: ...


class PlanSink(Protocol):
    """What a bulk path offers a policy (BulkLoop, NativeBulk)."""

    def plan(self, ranges: Sequence[tuple[int, int]]) -> int: ...
    def plan_len(self) -> int: ...
    def plan_clear(self) -> None: ...


class PolicyRunner:
    def __init__(self, policy: Policy, name: str, run: RunInfo, faults: FaultFeed, bulk: PlanSink | None,
                 record: bool = False, written: UseScan | None = None) -> None:
        self.policy, self.name, self._run = policy, name, run
        self._faults, self._bulk, self._written = faults, bulk, written
        self._scanned = 0.0
        self._pending: list[tuple[int, int]] = []
        self._nb = Neighbourhood()
        self._record = record
        self._seen: set[int] = set()
        self._order: list[int] = []
        self._counts = (0, 0)
        self.before_resume: list[tuple[int, int]] = []
        self._failed = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """The policy's first decision, applied before the bulk path starts; then the thread.

        Its `before_resume` ranges are queued first and kept in
        self.before_resume, for the run to wait for before resuming the guest.
        """
        first = self._call(self.policy.start, self._run)
        self.before_resume = [r for r in first.before_resume if r[1] > 0]
        first.push = self.before_resume + first.push
        if first.neighbourhood is not None:  # even the default block: the gRPC path has a readahead of its own
            self._nb = first.neighbourhood
            self._faults.set_neighbourhood(first.neighbourhood)
        self._apply(first)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="policy")
        self._thread.start()

    def _call(self, fn, arg) -> Decision:
        if self._failed:
            return Decision()
        try:
            return fn(arg)
        except Exception as err:  # noqa: BLE001 - a user's policy must not take the run down
            self._failed = f"{type(err).__name__}: {err}"
            log.warning("policy %s failed, the run goes on without it: %s", self.name, self._failed)
            return Decision()

    def _loop(self) -> None:
        while not self._stop.wait(PERIOD):
            self.step()

    def step(self) -> None:
        """One turn: read the faults, ask the policy, apply (the thread's body; tests call it too)."""
        faults = self._faults.new_faults()
        self._note(faults)
        if self._written is not None and time.monotonic() - self._scanned >= SCAN_PERIOD:
            self._scan()
        prefetched, hits = self._faults.prefetch_counts()
        tick = Tick(faults=faults, prefetched=prefetched - self._counts[0], hits=hits - self._counts[1],
                    queued=(self._bulk.plan_len() if self._bulk else 0) + len(self._pending), neighbourhood=self._nb)
        self._counts = (prefetched, hits)
        self._apply(self._call(self.policy.decide, tick))

    def _note(self, faults: Iterable[int]) -> None:
        if self._record:
            for page in faults:
                if page not in self._seen:
                    self._seen.add(page)
                    self._order.append(page)

    def _scan(self) -> None:
        assert self._written is not None  # step() checked
        self._scanned = time.monotonic()
        used = self._written.scan()
        self._faults.count_used(used)
        if self._record:
            self._note(p for first, count in used.runs(MAX_SCAN_RUNS) for p in range(first, first + count))

    def _apply(self, d: Decision) -> None:
        if d.neighbourhood is not None and d.neighbourhood != self._nb:
            self._nb = d.neighbourhood
            self._faults.set_neighbourhood(d.neighbourhood)
        if self._bulk is None:
            return
        if d.replace:
            self._pending.clear()
            self._bulk.plan_clear()
        self._pending.extend(r for r in d.push if r[1] > 0)
        if self._pending:
            taken = self._bulk.plan(self._pending)
            del self._pending[:taken]

    def stop(self) -> None:
        """Stop the thread; recording, take the last written pages (once: the scan's owner closes it next)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._written is not None and self._record:
            self._scan()

    def working_set(self) -> list[tuple[int, int]]:
        """The pages faulted on (and found written) so far, as ranges in first-touch order (empty unless
        recording)."""
        self._note(self._faults.new_faults())
        return workingset.ranges_of(self._order)

    def summary(self) -> dict:
        out: dict = {"name": self.name, "neighbourhood": {"pages": self._nb.pages, "shape": self._nb.shape,
                                                          "stride": self._nb.stride}}
        if self._written is not None:
            out["written_pages"] = self._written.total  # pages found written by the scans (each at most once a scan)
        if self._failed:
            out["error"] = self._failed
        return out
