"""Runs a policy for one incoming run, on a thread of its own, off the fault path.

Every PERIOD it reads the faults the fault path recorded since the last
time (a ring in C on the native fault path, a queue on the gRPC one), the
prefetch counters, asks the policy, and hands its decision to the paths:
ranges to the bulk path's plan queue (bounded: what does not fit waits
here), the neighbourhood to the fault path, which applies it itself from
its next fault on. With `record`, it also keeps the pages faulted on, in
first-touch order: the working set `--record-ws` writes.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from migrate.policies import workingset
from migrate.policies.base import Decision, Neighbourhood, Policy, RunInfo, Tick

log = logging.getLogger(__name__)

#: Seconds between two calls of the policy.
PERIOD = 0.005


class FaultFeed(Protocol):
    """What a fault path offers a policy (FaultLoop, NativeFaultLoop)."""

    def new_faults(self) -> list[int]: ...
    def prefetch_counts(self) -> tuple[int, int]: ...
    def set_neighbourhood(self, nb: Neighbourhood) -> None: ...


class PlanSink(Protocol):
    """What a bulk path offers a policy (BulkLoop, NativeBulk)."""

    def plan(self, ranges: Sequence[tuple[int, int]]) -> int: ...
    def plan_len(self) -> int: ...
    def plan_clear(self) -> None: ...


class PolicyRunner:
    def __init__(self, policy: Policy, name: str, run: RunInfo, faults: FaultFeed, bulk: PlanSink | None,
                 record: bool = False) -> None:
        self.policy, self.name, self._run = policy, name, run
        self._faults, self._bulk = faults, bulk
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
        prefetched, hits = self._faults.prefetch_counts()
        tick = Tick(faults=faults, prefetched=prefetched - self._counts[0], hits=hits - self._counts[1],
                    queued=(self._bulk.plan_len() if self._bulk else 0) + len(self._pending), neighbourhood=self._nb)
        self._counts = (prefetched, hits)
        self._apply(self._call(self.policy.decide, tick))

    def _note(self, faults: list[int]) -> None:
        if self._record:
            for page in faults:
                if page not in self._seen:
                    self._seen.add(page)
                    self._order.append(page)

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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def working_set(self) -> list[tuple[int, int]]:
        """The pages faulted on so far, as ranges in first-touch order (empty unless recording)."""
        self._note(self._faults.new_faults())
        return workingset.ranges_of(self._order)

    def summary(self) -> dict:
        out = {"name": self.name, "neighbourhood": {"pages": self._nb.pages, "shape": self._nb.shape,
                                                    "stride": self._nb.stride}}
        if self._failed:
            out["error"] = self._failed
        return out
