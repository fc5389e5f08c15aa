"""The built-in policies: sequential, bubble, trend, replay (see base.py for the protocol)."""
from __future__ import annotations

from collections import deque

from migrate.policies import workingset
from migrate.policies.base import (
    DEFAULT_PAGES,
    MAX_NEIGHBOURHOOD,
    AdaptiveSize,
    Decision,
    Neighbourhood,
    Policy,
    RunInfo,
    Tick,
)

#: Pages one pushed range covers (1 MiB of 4 KiB pages): what bubble and trend queue at a time.
STEP = 256
#: Ranges bubble and trend keep queued ahead of the bulk path.
DEPTH = 8


class Sequential(Policy):
    """Address order, the bulk cursor restarting at the latest fault; a fixed aligned neighbourhood."""

    name = "sequential"
    params = {"pages": int}

    def __init__(self, pages: int = DEFAULT_PAGES) -> None:
        self.neighbourhood = Neighbourhood(pages=pages)

    def start(self, run: RunInfo) -> Decision:
        return Decision(neighbourhood=self.neighbourhood)


class Bubble(Policy):
    """Pre-paging that grows outward in both directions from the latest fault (Hines and Gopalan).

    The bulk path is fed rings of `step` pages alternately after and before
    the pivot (the latest fault), farther each time; a new fault moves the
    pivot and starts a new bubble. The neighbourhood is fetched around each
    fault (`shape=aligned`: the fault's aligned block) and its size adapts to
    how many prefetched pages get used, between `min` and `max` pages.
    Against uniform accesses (hotset's cold ones) no order helps, only more
    pages per fault: `min=128,shape=aligned` (docs/architecture.md).
    """

    name = "bubble"
    params = {"step": int, "max": int, "min": int, "shape": str}
    watches_use = True

    def __init__(self, step: int = STEP, max: int = MAX_NEIGHBOURHOOD,  # noqa: A002 - the params' names
                 min: int = DEFAULT_PAGES, shape: str = "around") -> None:  # noqa: A002
        if step < 1:
            raise ValueError("step must be >= 1")
        if not 1 <= min <= max <= MAX_NEIGHBOURHOOD:
            raise ValueError(f"1 <= min <= max <= {MAX_NEIGHBOURHOOD} pages")
        if shape not in ("around", "aligned"):
            raise ValueError("shape is around or aligned")
        self.step, self.shape = step, shape
        self.size = AdaptiveSize(start=min, low=min, high=max)
        self._pivot: int | None = None
        self._radius = 0
        self._npages = 0

    def start(self, run: RunInfo) -> Decision:
        self._npages = run.npages
        return Decision(neighbourhood=Neighbourhood(self.size.pages, self.shape))

    def decide(self, tick: Tick) -> Decision:
        out = Decision()
        pages = self.size.update(tick.prefetched, tick.hits)
        if pages != tick.neighbourhood.pages:
            out.neighbourhood = Neighbourhood(pages, self.shape)
        if tick.faults:
            self._pivot, self._radius, out.replace = tick.faults[-1], 0, True
        if self._pivot is None:
            return out
        queued = 0 if out.replace else tick.queued
        while queued < DEPTH and self._radius < self._npages:
            after = self._pivot + 1 + self._radius
            before = self._pivot - self._radius - self.step
            out.push.append((after, self.step))
            out.push.append((max(before, 0), self.step + min(before, 0)))
            self._radius += self.step
            queued += 2
        out.push = [(first, count) for first, count in out.push if count > 0 and first < self._npages]
        return out


class Trend(Policy):
    """Detects sequential runs and strides in the fault history and prefetches ahead (as Leap does).

    Over the last `window` faults, a majority of equal gaps between
    consecutive faults is a trend: a gap no larger than the neighbourhood's
    span means the guest reads through (forward or backward, stride 1),
    a larger one a stride of that many pages. On a trend the fault path
    fetches ahead in its direction (the size adapting to the hits) and the
    bulk path is fed the next `ahead` pages of the trend; without one, the
    default aligned block.
    """

    name = "trend"
    params = {"window": int, "ahead": int}
    watches_use = True

    def __init__(self, window: int = 8, ahead: int = 4 * STEP) -> None:
        if window < 3:
            raise ValueError("window must be >= 3")
        self.window, self.ahead = window, ahead
        self.size = AdaptiveSize(start=2 * DEFAULT_PAGES)
        self._recent: deque[int] = deque(maxlen=window)
        self._npages = 0

    def start(self, run: RunInfo) -> Decision:
        self._npages = run.npages
        return Decision(neighbourhood=Neighbourhood())

    def _trend(self, span: int) -> tuple[int, int] | None:
        """(direction, stride) of the recent faults, or None."""
        recent = list(self._recent)
        gaps = [b - a for a, b in zip(recent, recent[1:])]
        if len(gaps) < 2:
            return None
        forward = [g for g in gaps if g > 0]
        backward = [g for g in gaps if g < 0]
        same = forward if len(forward) >= len(backward) else backward
        if len(same) * 2 <= len(gaps):
            return None
        direction = 1 if same is forward else -1
        stride = sorted(abs(g) for g in same)[len(same) // 2]
        if stride <= span + 1:
            return direction, 1  # reads through: each fault lands right past the last neighbourhood
        if sum(1 for g in same if abs(g) == stride) * 2 > len(gaps):
            return direction, stride
        return None

    def decide(self, tick: Tick) -> Decision:
        self._recent.extend(tick.faults)
        nb = tick.neighbourhood
        trend = self._trend(nb.pages * max(abs(nb.stride), 1))
        if trend is None:
            default = Neighbourhood()
            return Decision(neighbourhood=None if nb == default else default)
        direction, stride = trend
        pages = self.size.update(tick.prefetched, tick.hits)
        want = Neighbourhood(pages, "forward" if direction > 0 else "backward", stride)
        out = Decision(neighbourhood=None if want == nb else want)
        if tick.faults and stride == 1:
            last = tick.faults[-1]
            first = last + pages + 1 if direction > 0 else max(last - pages - self.ahead, 0)
            if first < self._npages:
                out.push, out.replace = [(first, self.ahead)], True
        return out


class Replay(Policy):
    """Fetches first the pages a previous run of the same guest faulted on (a working-set file), as REAP does.

    `ws=FILE` is read by the command that names it: `migrate run` sends it
    to the destination, `migrate dest serve` reads it itself. With `eager=1`
    (the default) the working set is fetched before the guest resumes:
    queued after the resume it would race the guest, which touches its
    working set in its first milliseconds, and lose (the first migration's
    faults come then). `eager=0` only queues it first. A working set
    holds the pages faulted on; each fault also fetched its aligned block,
    whose other pages the guest went on to use without faulting, so each
    recorded page brings its aligned block of `block` pages (the default
    neighbourhood; 1: the pages alone). The rest follows the cursor; the
    neighbourhood is the default block.
    """

    name = "replay"
    params = {"ws": str, "eager": int, "block": int}

    def __init__(self, ws: str = "", eager: int = 1, block: int = DEFAULT_PAGES) -> None:
        if eager not in (0, 1):
            raise ValueError("eager is 0 or 1")
        if not 1 <= block <= MAX_NEIGHBOURHOOD:
            raise ValueError(f"block is 1..{MAX_NEIGHBOURHOOD} pages")
        self.working_set = workingset.load(ws) if ws else None
        self.eager, self.block = bool(eager), block

    def start(self, run: RunInfo) -> Decision:
        ranges = list(run.working_set)
        if not ranges and self.working_set is not None:
            self.working_set.check_fits(run.npages, run.page_size)
            ranges = list(self.working_set.ranges)
        ranges = workingset.blocks_of(ranges, self.block, run.npages)
        if self.eager:
            return Decision(before_resume=ranges, neighbourhood=Neighbourhood())
        return Decision(push=ranges, neighbourhood=Neighbourhood())


BUILTINS: dict[str, type[Policy]] = {p.name: p for p in (Sequential, Bubble, Trend, Replay)}
