"""The destination's bulk path: pulls every page not yet received.

It walks the received bitmap with a cursor, asks the source's bulk server
for missing pages (many runs per request, answered in batches of up to 512 KiB) keeping a
window of at most 6 MiB in flight, and installs each batch with as few
ioctls as possible, from two threads. The urgent path tells it where the
guest faults, and the cursor jumps there: the guest's working set arrives
first. Its threads run in the agent at low CPU priority (see BulkLoop).
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from migrate import spawn
from migrate.batches import (
    MAX_BULK_PAGES,
    MAX_REQUEST_PAGES,
    MAX_REQUEST_RUNS,
    BatchDecoder,
    BatchError,
    Run,
    batch_at,
    bulk_request,
)
from migrate.bitmap import SharedBitmap, claim_runs
from migrate.dest.link import LinkLost, SourceLink
from migrate.dest.paths import MAX_REFUSED, Memory, guarded
from migrate.proto import migrate_pb2 as pb
from migrate.uffd import InstallStats

#: Bulk requests in flight, in pages and in requests: enough to keep the link
#: busy while batches install, even when the runs between faults are short.
#: Pages asked for and not yet installed never exceed WINDOW_PAGES: they are
#: the bulk path's batch buffers (6 MiB of 4 KiB pages), the bound on what
#: gRPC can have received ahead of the installs. Each window MiB costs the
#: agent ~1.6 MiB (gRPC's copy of a message, allocator slack); 6 MiB kept
#: the bulk rate of 16 MiB on loopback (4 MiB lost 15 %) and covers the
#: bandwidth-delay product of a 1 GB/s link up to a 6 ms round trip.
WINDOW_PAGES = 1536
WINDOW_REQUESTS = 32
#: The window counts data: a zero page takes no bytes and no buffer (and,
#: lazy, no install), so unpaced it grows by 1 / (the share of data among the
#: pages installed lately), at most this many times (native/dp_dest.c alike).
ZERO_STRETCH = 64
#: Threads installing batches (see _Installers).
INSTALLERS = 2
#: Longest single sleep of the pacer: a raised rate takes effect within this long.
_PACE_SLEEP = 0.1
#: Ranges the plan queue holds (a policy's, see migrate.policies; MIG_DPD_PLAN_RUNS on the native plane).
PLAN_RUNS = 4096


class Planner:
    """Chooses the next runs of pages to ask for: missing and not yet asked, from
    the plan queue a policy fills first, else from the cursor.

    `asked` (pages asked for by any path) may be shared with the urgent path,
    which then leaves out of its prefetch what the bulk asked and marks what
    it asks; the planner closes it only if it created it.
    """

    def __init__(self, received: SharedBitmap, asked: SharedBitmap | None = None) -> None:
        self._received = received
        self._owns_asked = asked is None
        self._asked = SharedBitmap.create(received.nbits) if asked is None else asked
        self._cursor = 0
        self._jump: int | None = None
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._queue_lock = threading.Lock()
        self.planned = 0  # pages asked because the plan queue named them
        self.plan_only = False  # ask only what the plan queue names: the cursor waits (a recording restore)

    def jump(self, page: int) -> None:
        """Go on from `page` next (the urgent path calls this where the guest faults).

        A plain store, no lock: a jump lost to a race with the planner only
        leaves the cursor where it was, and the next fault moves it again.
        """
        self._jump = page

    def _take_jump(self) -> None:
        page, self._jump = self._jump, None
        if page is not None:
            self._cursor = min(page, self._received.nbits)

    def plan(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Queue ranges to ask next, in order, before the cursor's; returns how many the bounded queue took."""
        with self._queue_lock:
            taken = list(ranges[:PLAN_RUNS - len(self._queue)])
            self._queue.extend(taken)
        return len(taken)

    def plan_len(self) -> int:
        return len(self._queue)

    def plan_clear(self) -> None:
        with self._queue_lock:
            self._queue.clear()

    def _claim(self, start: int, stop: int, max_pages: int, max_runs: int) -> tuple[list[Run], int]:
        return claim_runs(self._received, self._asked.ptr, start, stop, max_pages, max_runs)

    def _planned(self, max_pages: int, max_runs: int) -> list[Run]:
        """The next runs the plan queue names (none once it is empty)."""
        out: list[Run] = []
        pages = 0
        with self._queue_lock:
            while self._queue and pages < max_pages and len(out) < max_runs:
                first, count = self._queue[0]
                stop = min(first + count, self._received.nbits)
                got, nxt = self._claim(first, stop, max_pages - pages, max_runs - len(out))
                if nxt < stop:
                    self._queue[0] = (nxt, stop - nxt)
                else:
                    self._queue.popleft()
                claimed = sum(n for _, n in got)
                self.planned += claimed
                pages += claimed
                out += got
        return out

    def next_runs(self, max_pages: int = MAX_REQUEST_PAGES, max_runs: int = MAX_REQUEST_RUNS) -> list[Run]:
        """Runs of missing, unasked pages, at most max_pages in max_runs runs (none when there are none):
        the plan queue's first, then on from the cursor, then from the start."""
        self._take_jump()
        out = self._planned(max_pages, max_runs)
        pages = sum(n for _, n in out)
        for start, stop in ((self._cursor, self._received.nbits), (0, self._cursor)):
            if pages >= max_pages or len(out) >= max_runs or self.plan_only:
                break
            got, nxt = self._claim(start, stop, max_pages - pages, max_runs - len(out))
            if got:
                self._cursor = nxt
            pages += sum(n for _, n in got)
            out += got
        return out

    def forget(self, first: int, count: int) -> None:
        """Pages asked for on a stream that broke: ask for them again."""
        self._asked.clear_range(first, count)

    def close(self) -> None:
        if self._owns_asked:
            self._asked.close()


class BulkPuller:
    """Keeps a window of bulk requests in flight and installs the replies.

    The window is counted in pages (so many small runs, as the guest's
    faults leave behind, still keep the link busy) and in requests.
    """

    def __init__(self, mem: Memory, planner: Planner, link: SourceLink, run_id: str,
                 max_bandwidth: int, on_install: Callable[[], None] = lambda: None) -> None:
        self.mem = mem
        self._on_install = on_install  # pages installed, or written off: a fault waiting for them looks
        self.link = link
        self._planner = planner
        self._run_id = run_id
        self._rate = max_bandwidth
        self._decoder = BatchDecoder(mem.page_count, mem.page_size)
        self._cond = threading.Condition()
        self._inflight: dict[int, tuple[list[Run], int]] = {}  # req_id -> (runs, pages still due)
        self._inflight_pages = 0
        self._next_id = 1
        self._generation = 0                 # bumped when a broken stream's requests are written off
        self._stop = False
        self._rate = 0
        self._request_pages = MAX_REQUEST_PAGES
        self._window_pages = WINDOW_PAGES
        self._data_share = 1.0  # of the pages installed lately, the data ones (a moving average)
        self._t0, self._wire0 = time.monotonic(), 0
        self.set_bandwidth(max_bandwidth)
        self.counters: dict[str, Any] = {"kind": "bulk", "pages": 0, "zero": 0, "bytes_pages": 0, "batches": 0,
                                         "refused": 0, "requests": 0}

    def set_bandwidth(self, max_bandwidth: int) -> None:
        """Pace at `max_bandwidth` bytes/s from now on (0: unlimited).

        The pace counts from the change: a raised rate does not burst to
        make up for the slower past, a lowered one does not stall to pay
        for the faster past. Under a rate a request carries at most ~50 ms
        of traffic, so pacing between requests is fine-grained enough to
        hold it.
        """
        with self._cond:
            self._rate = max_bandwidth
            self._t0, self._wire0 = time.monotonic(), self.link.client.bytes_wire
            self._request_pages = MAX_REQUEST_PAGES
            if max_bandwidth > 0:
                self._request_pages = max(16, min(MAX_REQUEST_PAGES,
                                                  int(max_bandwidth * 0.05) // self.mem.page_size))
            self._window_pages = min(WINDOW_PAGES, 2 * self._request_pages)
            self._cond.notify_all()

    def _pace(self) -> None:
        """Sleep while the bytes received since the last change of pace run ahead of the rate."""
        while True:
            with self._cond:
                rate, t0, wire0, stop = self._rate, self._t0, self._wire0, self._stop
            if rate <= 0 or stop:
                return
            ahead = (self.link.client.bytes_wire - wire0) / rate - (time.monotonic() - t0)
            if ahead <= 0:
                return
            time.sleep(min(ahead, _PACE_SLEEP))

    def _room(self) -> int:
        """Pages the next request may ask for; 0 while the window is too full to bother."""
        if len(self._inflight) >= WINDOW_REQUESTS:
            return 0
        window = self._window_pages
        if self._rate <= 0:
            window = int(window / max(self._data_share, 1 / ZERO_STRETCH))
        room = min(self._request_pages, window - self._inflight_pages)
        return room if room >= min(self._request_pages, MAX_BULK_PAGES) else 0

    def requests(self) -> Iterator[pb.BulkRequest]:
        """The request stream of one call; it ends when that call is written off."""
        with self._cond:
            generation = self._generation
        while True:
            self._pace()
            with self._cond:
                while not (room := self._room()) and not self._stop and generation == self._generation:
                    self._cond.wait()
                if self._stop or generation != self._generation:
                    return
                runs = self._planner.next_runs(room)
                if not runs:
                    if not self._inflight and not self._planner.plan_only:
                        return
                    self._cond.wait(0.05)
                    continue
                count = sum(n for _, n in runs)
                req_id = self._next_id
                self._next_id += 1
                self._inflight[req_id] = (runs, count)
                self._inflight_pages += count
                self.counters["requests"] += 1
            yield bulk_request(self._run_id, req_id, runs)

    def install(self, message: bytes) -> None:
        """Install the batches of one received PageBatches message (serialized): the raw ones natively, all
        at once; a compressed one decompressed here; a refused one's request planned again."""
        pos, end = 0, len(message)
        while pos < end:
            got = self._decoder.install_batches(message, pos, self.mem.io, self.mem.bitmap)
            self._answered(got.answered, got.done)
            pos = got.pos
            if pos < end and got.error:  # the batch at pos is compressed, or refused
                try:
                    raw, pos = batch_at(message, pos)
                except BatchError as err:  # not a batch: nothing after it can be trusted
                    self._ask_again(err)
                    return
                self._install(raw)

    def _install(self, raw: memoryview) -> None:
        try:
            batch = self._decoder.install(raw, self.mem.io, self.mem.bitmap)
        except BatchError as err:
            self._ask_again(err)
            return
        self._answered([(batch.req_id, batch.count)], batch.done)

    def _answered(self, answered: list[tuple[int, int]], done: InstallStats) -> None:
        """Count installed batches, (req_id, pages) each, against their requests."""
        with self._cond:
            for req_id, count in answered:
                if req_id in self._inflight:
                    runs, due = self._inflight[req_id]
                    due -= count
                    self._inflight_pages -= count
                    if due > 0:
                        self._inflight[req_id] = (runs, due)
                    else:
                        del self._inflight[req_id]
            self.mem.count(self.counters, done)
            if done.installed:  # over the last ~8 installs
                self._data_share += (done.copied / done.installed - self._data_share) / 8
            self.counters["batches"] += len(answered)
            self._cond.notify_all()
        self._on_install()

    def _ask_again(self, err: BatchError) -> None:
        """A refused batch is never installed: plan its request's pages again."""
        with self._cond:
            self.counters["refused"] += 1
            if self.counters["refused"] > MAX_REFUSED:
                raise err
            if err.req_id not in self._inflight:  # cannot tell which request: redo them all
                self._write_off()
                return
            runs, due = self._inflight.pop(err.req_id)
            self._inflight_pages -= due
            self._forget(runs)
            self._cond.notify_all()

    def write_off_inflight(self) -> None:
        """After a broken stream: its unanswered requests will be asked again."""
        with self._cond:
            self._write_off()
            self._generation += 1
            self._cond.notify_all()
        self._on_install()

    def _forget(self, runs: list[Run]) -> None:
        for first, count in runs:
            self._planner.forget(first, count)

    def _write_off(self) -> None:
        for runs, _ in self._inflight.values():
            self._forget(runs)
        self._inflight.clear()
        self._inflight_pages = 0

    def snapshot(self) -> dict:
        """The counters, for the agent."""
        with self._cond:
            return dict(self.counters, **self.link.counters(), max_bandwidth=self._rate)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()


class _Installers:
    """INSTALLERS threads installing the batches one stream receives.

    Most of an install is the kernel allocating and filling guest pages
    (UFFDIO_COPY), with the GIL released; two threads do that in parallel
    while the stream's thread receives the next batches. Batches may install
    in any order: the bitmap and the per-request counts do not care.
    """

    def __init__(self, puller: BulkPuller) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=2 * INSTALLERS)
        self._error: Exception | None = None
        self._threads = [threading.Thread(target=self._run, args=(puller,), daemon=True, name=f"install-{i}")
                         for i in range(INSTALLERS)]
        for t in self._threads:
            t.start()

    def _run(self, puller: BulkPuller) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is None:
                try:
                    puller.install(batch)
                except Exception as err:  # noqa: BLE001 - raised again in the stream's thread
                    self._error = err

    def put(self, batch: bytes) -> None:
        """Queue a batch; raises the first install error instead, once there is one."""
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def drain(self) -> None:
        """Install every batch queued, stop the threads; raise the first install error."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error


def pull(puller: BulkPuller, link: SourceLink, stop: threading.Event) -> str | None:
    """Stream until every page is in; reconnect on transport errors. Returns an error or None."""
    while True:
        installers = _Installers(puller)
        try:
            try:
                for batch in link.bulk(puller.requests()):
                    installers.put(batch)
            finally:
                installers.drain()  # what arrived before a break is installed, not asked again
            return None
        except grpc.RpcError as err:
            if stop.is_set():
                return None
            try:
                link.recover(err)
            except LinkLost as lost:
                return str(lost)
            except grpc.RpcError as fatal:
                return f"bulk stream from the source failed: {fatal.details() or fatal.code().name}"
            puller.write_off_inflight()
        except (BatchError, OSError) as err:
            return f"bulk page install failed: {err}"


class InstallSignal:
    """An eventfd signalled on each install while faults wait for the bulk path's pages.

    Closed when the last holder lets go, not in the bulk path's stop(): a
    fault loop may poll it until it is stopped too (and no reference cycle
    keeps it open past that).
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.watched = 0
        weakref.finalize(self, os.close, self.fd)

    def signal(self) -> None:
        if self.watched:
            try:
                os.eventfd_write(self.fd, 1)
            except BlockingIOError:  # the counter is full: the fault path has plenty to read
                pass


class BulkLoop:
    """The bulk path of one incoming run: threads of the destination agent.

    Threads, not a process of their own: a second Python process with gRPC
    cost the destination ~20 MiB before a page moved and put it over its
    memory budget. As threads, the bulk stream's gRPC work shares the
    agent's normal priority: a guest faulting while the bulk runs is blocked
    less in total (the stream is faster, so it faults less), and a single
    fault's tail is longer (docs/performance.md, "History", has the
    numbers). The pulling and installing threads run SCHED_BATCH, so the
    fault path preempts them (spawn.yield_cpu_to_urgent_work).

    Connecting happens here: a source that cannot be reached raises
    ConnectionError, before the guest ever stops on the source. Nothing
    moves until start(), at switchover.
    """

    def __init__(self, mem: Memory, endpoint: str, run_id: str, recovery_timeout: float,
                 asked: SharedBitmap | None = None) -> None:
        self._mem = mem
        self._run_id = run_id
        self._link = SourceLink(endpoint, "bulk", recovery_timeout)
        self.planner = Planner(mem.bitmap, asked)
        self._stop = threading.Event()
        self._puller: BulkPuller | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._summary: dict | None = None
        self._installed = InstallSignal()

    @property
    def installed_fd(self) -> int:
        return self._installed.fd

    def watch(self, faults: int) -> None:
        """How many faults wait for pages this path asked: while any do, each install (or a
        write-off) signals installed_fd, which the gRPC fault path polls with the userfaultfd."""
        self._installed.watched = faults

    def plan(self, ranges: Sequence[tuple[int, int]]) -> int:
        return self.planner.plan(ranges)

    def plan_len(self) -> int:
        return self.planner.plan_len()

    def plan_clear(self) -> None:
        self.planner.plan_clear()

    def plan_only(self, on: bool) -> None:
        """With `on`, ask only what the plan queue names; the push of the rest waits until it is off."""
        self.planner.plan_only = on  # the request stream looks again within 50 ms

    def set_bandwidth(self, max_bandwidth: int) -> None:
        """Pace the pull at `max_bandwidth` bytes/s from now on (0: unlimited); before start() start's rate wins."""
        if self._puller is not None:
            self._puller.set_bandwidth(max_bandwidth)

    def start(self, max_bandwidth: int) -> None:
        """Pull every missing page, at most `max_bandwidth` bytes/s (0: no limit)."""
        self._puller = BulkPuller(self._mem, self.planner, self._link, self._run_id, max_bandwidth,
                                  self._installed.signal)
        self._thread = threading.Thread(target=guarded("bulk path", self._run, self._fail), daemon=True,
                                        name="bulk-pull")
        self._thread.start()

    def _run(self) -> None:
        spawn.yield_cpu_to_urgent_work()  # this thread, and the installers it starts
        assert self._puller is not None  # start() made it before this thread
        try:
            self._error = pull(self._puller, self._link, self._stop)
        finally:  # here, not in stop(): a thread still reconnecting must not lose its planner
            self._close()

    def _close(self) -> None:
        self._link.close()
        self.planner.close()

    def _fail(self, error: str) -> None:
        self._error = self._error or error

    @property
    def last(self) -> dict:
        """The counters; after stop(), the final ones."""
        if self._summary is not None:
            return self._summary
        out = self._puller.snapshot() if self._puller else {}
        out["planned"] = self.planner.planned
        if self._error:
            out["error"] = self._error
        return out

    def failure(self) -> str | None:
        """Why the bulk path stopped serving, or None while it serves (or is done)."""
        return self._error

    def stop(self, timeout: float = 10.0) -> None:
        """Stop asking; what arrived is installed. A stream still open after
        `timeout` (a source that stopped answering) is cancelled."""
        if self._summary is not None:
            return
        self._stop.set()
        if self._thread is None:
            self._close()
        else:
            if self._puller is not None:  # start() makes it before the thread
                self._puller.stop()
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._link.close()
                self._thread.join(timeout)
        self._summary = dict(self.last, done=True)
