"""The policy protocol: what a push and prefetch policy sees and decides.

A post-copy guest is stalled for (remote faults) x (fault latency). A
policy attacks the first factor by choosing, at the granularity of page
RANGES, (a) what the bulk stream sends next and (b) the shape of the
neighbourhood fetched with each fault. It never decides per page and never
runs on the fault path: the fault is answered first (in C, or by the
urgent path's thread), and the destination calls the policy from a thread
of its own every few milliseconds (migrate.policies.runner) with the faults
read since the last call.

Writing one (docs/architecture.md, "Push and prefetch policies")::

    from migrate.policies.base import Decision, Neighbourhood, Policy, RunInfo, Tick

    class MyPolicy(Policy):
        name = "mine"
        params = {"ahead": int}          # --policy mymod:MyPolicy:ahead=512

        def __init__(self, ahead: int = 256) -> None:
            self.ahead = ahead

        def start(self, run: RunInfo) -> Decision:
            return Decision(neighbourhood=Neighbourhood(pages=16))

        def decide(self, tick: Tick) -> Decision:
            if not tick.faults:
                return Decision()
            last = tick.faults[-1]
            return Decision(push=[(last, self.ahead)], replace=True)

`push` ranges are queued for the bulk path in order, ahead of its own
cursor (which otherwise walks the address space from the latest fault);
pages already received or asked are skipped, so a policy may name ranges
loosely. `replace` drops what is still queued first. The queue is bounded
(`Tick.queued` says how many ranges wait): what does not fit waits in the
runner and is queued as room frees. A `neighbourhood` applies to the
following faults; None leaves it as it is. start() may also name ranges
`before_resume`: the destination fetches them before it lets the guest run.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from migrate import errors

#: Neighbourhood shapes (MIG_NB_* in native/dp_dest.h, same order).
SHAPES = ("aligned", "forward", "backward", "around")
#: Most pages fetched with one fault (MIG_DPD_MAX_NEIGHBOURHOOD).
MAX_NEIGHBOURHOOD = 128
#: The neighbourhood without a policy: the fault's aligned 64 KiB block.
DEFAULT_PAGES = 16


class PolicyError(errors.BadRequest):
    """A policy that cannot be loaded or built (unknown name, bad parameter): one line."""


@dataclass(frozen=True)
class Neighbourhood:
    """What the fault path fetches with each fault, by itself.

    aligned: the fault's aligned block of `pages` pages; forward/backward:
    `pages` pages after/before it, every `stride`-th; around: both sides,
    nearest first.
    """

    pages: int = DEFAULT_PAGES
    shape: str = "aligned"
    stride: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise PolicyError(f"unknown neighbourhood shape {self.shape!r}; use one of {', '.join(SHAPES)}")
        if not 0 <= self.pages <= MAX_NEIGHBOURHOOD:
            raise PolicyError(f"a neighbourhood has 0..{MAX_NEIGHBOURHOOD} pages, not {self.pages}")
        if self.stride == 0 or abs(self.stride) >= 1 << 31:
            raise PolicyError(f"a neighbourhood's stride is a non-zero 32-bit number, not {self.stride}")

    def pages_of(self, page: int, npages: int) -> list[int]:
        """The pages fetched with a fault on `page` (the native fault path computes the same in C)."""
        out = []
        stride = 1 if self.shape == "aligned" else self.stride
        for k in range(self.pages):
            if self.shape == "forward":
                q = page + (k + 1) * stride
            elif self.shape == "backward":
                q = page - (k + 1) * stride
            elif self.shape == "around":
                q = page + (-1 if k % 2 else 1) * (k // 2 + 1) * stride
            else:
                q = page - page % self.pages + k
            if 0 <= q < npages and q != page:
                out.append(q)
        return out


@dataclass(frozen=True)
class RunInfo:
    """The run a policy serves: its size and, for replay, a working set (ranges in recorded order)."""

    npages: int
    page_size: int
    working_set: Sequence[tuple[int, int]] = ()


@dataclass(frozen=True)
class Tick:
    """What happened since the last call."""

    faults: Sequence[int]          # pages faulted on (missing ones), in the order read
    prefetched: int                # neighbour pages fetched with faults, since the last call
    hits: int                      # of the prefetched pages, those seen used since the last call (faulted
                                   # on in flight, gone through, or found written when watches_use)
    queued: int                    # ranges still waiting in the bulk path's plan queue
    neighbourhood: Neighbourhood   # the one in force


@dataclass
class Decision:
    push: list[tuple[int, int]] = field(default_factory=list)
    replace: bool = False
    neighbourhood: Neighbourhood | None = None
    #: Only from start(): ranges queued before `push` and fetched BEFORE the guest resumes (REAP's eager
    #: prefetch of a recorded working set): the guest's first accesses find them here instead of faulting,
    #: for a longer stop. Ignored with --no-push (nothing pulls them then).
    before_resume: list[tuple[int, int]] = field(default_factory=list)


class Policy:
    """Base class: a policy that decides nothing (cursor + jump, the default neighbourhood)."""

    #: The name `--policy` knows it by (built-ins).
    name = ""
    #: Parameters `--policy NAME:key=value` accepts: key -> converter from the string.
    params: dict[str, type] = {}
    #: Ask the destination to watch which pages the guest writes (migrate.dest.written), so that Tick.hits
    #: also counts the prefetched pages written without a fault: the run then installs pages
    #: write-protected, and a guest's first write to each costs a minor fault the kernel resolves itself.
    watches_use = False

    def start(self, run: RunInfo) -> Decision:
        """Called once, before the guest runs here."""
        return Decision()

    def decide(self, tick: Tick) -> Decision:
        """Called every few ms (also with no faults), off the fault path."""
        return Decision()


class AdaptiveSize:
    """A neighbourhood size that doubles while prefetched pages are used and halves when not.

    Hits are counted by the fault paths (see mig_dpd_set_neighbourhood): a
    prefetched page the guest faulted on while it was on its way, or went
    through without faulting (its next fault lands right past it), and, for
    a policy that `watches_use`, one the guest wrote (a written-page scan,
    migrate.dest.written: the only sign of use of a page the guest touches
    out of order, as scattered accesses do). It acts
    once `sample` pages were prefetched since the last change. It halves no
    lower than the default block: in post-copy every page moves once, so a
    prefetched page nobody uses yet is one the push need not send, not a
    waste, and under random faults the neighbourhood carries much of the
    memory (measured: shrunk to 4 pages, `bubble` took 3x the faults of
    `sequential` on hotset, and twice the time).
    """

    def __init__(self, start: int = DEFAULT_PAGES, low: int = DEFAULT_PAGES, high: int = MAX_NEIGHBOURHOOD,
                 grow_at: float = 0.5, shrink_at: float = 0.2, sample: int = 64) -> None:
        self.pages, self.low, self.high = start, low, high
        self.grow_at, self.shrink_at, self.sample = grow_at, shrink_at, sample
        self._prefetched = self._hits = 0

    def update(self, prefetched: int, hits: int) -> int:
        """Count a tick's prefetches and hits; returns the size to use."""
        self._prefetched += prefetched
        self._hits += hits
        if self._prefetched >= self.sample:
            ratio = self._hits / self._prefetched
            if ratio >= self.grow_at:
                self.pages = min(self.high, self.pages * 2)
            elif ratio < self.shrink_at:
                self.pages = max(self.low, self.pages // 2)
            self._prefetched = self._hits = 0
        return self.pages
