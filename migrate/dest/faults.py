"""The destination's urgent path: faults in, urgent requests out, replies installed.

Two threads per run (FaultLoop). When the userfaultfd is readable, the fault
thread reads many fault messages at once (native; pages that already arrived
are woken right there) and asks the source for each missing page over the
urgent Pages.Fetch stream (its own HTTP/2 connection) with its aligned 64 KiB
neighbourhood, or, while the guest reads sequentially, a readahead that
doubles up to 256 KiB; the reply thread installs each reply with one
UFFDIO_COPY per run, and each fault is timed from its read to its install.
The faulting page and the missing neighbours right next to it, at most 64 KiB,
travel as one request and one reply (a message each way per fault, its
reply still small); the rest of a readahead follows in requests of its own.
With the bulk path's `asked` bitmap (pages asked for by either path; the urgent
path marks its own there), a fault on a page the bulk has in flight waits
for the bulk's batch (asked again urgently only if the bulk writes that
request off), and a prefetch asks only for pages neither received nor
asked: no page goes on the wire twice. Only such a fault makes the loop look
again before the next fault: when the bulk path signals an install or a
write-off (its eventfd, watched with the userfaultfd); a fault
waiting for its own reply is closed by the reply reader.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]

from migrate import spawn, stats
from migrate.batches import MAX_URGENT_PAGES, BatchDecoder, BatchError
from migrate.bitmap import SharedBitmap
from migrate.dest.link import LinkLost, UrgentLink
from migrate.dest.paths import MAX_REFUSED, Memory, guarded
from migrate.policies.base import Neighbourhood
from migrate.policies.workingset import ranges_of
from migrate.proto import migrate_pb2 as pb

#: Pages prefetched around a random fault: its aligned 64 KiB block.
NEIGHBOURHOOD = 16
#: Faults remembered to tell clustered from scattered ones, and how near is "clustered".
_RECENT = 16
_CLUSTER = 4 * NEIGHBOURHOOD
#: Most pages prefetched after a fault, when the guest reads sequentially
#: (the readahead doubles while faults keep landing right behind it).
MAX_READAHEAD = MAX_URGENT_PAGES
#: Faults kept for a policy to read (the newest).
HISTORY = 65536
#: How often faults waiting for the bulk path's pages are looked at without a signal from it
#: (the native bulk signals installs, not a request written off when its link is lost: such a
#: fault is asked for here after at most this long).
BULK_PATIENCE_MS = 10


def _without(page: int, run: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """The run (first, count) less `page`: itself, or the parts before and after the page."""
    first, count = run
    if not first <= page < first + count:
        yield run
        return
    if page > first:
        yield first, page - first
    if first + count > page + 1:
        yield page + 1, first + count - page - 1


class BulkInstalls(Protocol):
    """A bulk path that signals its installs (an eventfd): faults waiting for its pages
    are looked at when one lands, not on a 1 ms poll."""

    @property
    def installed_fd(self) -> int: ...

    def watch(self, faults: int) -> None: ...


class FaultServer:
    """Turns faults into urgent requests and urgent replies into installs."""

    def __init__(self, mem: Memory, link: UrgentLink, run_id: str, jump: Callable[[int], None],
                 send: Callable[[pb.PageRequest], None], asked: SharedBitmap | None = None) -> None:
        self.mem = mem
        self._link = link
        self._send = send
        self._run_id = run_id
        self._jump = jump
        self._asked = asked
        self._decoder = BatchDecoder(mem.page_count, mem.page_size)
        self._lock = threading.Lock()
        # In flight, by request id: the faults waiting on it [(page, t_ns, waiters)], the request
        # itself (sent again after a reconnect) and the pages it covers; and page -> request id.
        self._waiting: dict[int, list[tuple[int, int, int]]] = {}
        self._sent: dict[int, pb.PageRequest] = {}
        self._covers: dict[int, int] = {}
        self._next_id = 1
        self._readahead = NEIGHBOURHOOD
        self._expect = -1  # where a sequential reader's next fault would land
        self._recent: collections.deque[int] = collections.deque(maxlen=_RECENT)
        self._on_bulk: list[tuple[int, int, int]] = []  # faults waiting for a page the bulk has in flight
        self.latencies_us: list[float] = []
        self.blocked_us = 0.0
        self.counters: dict[str, Any] = {"kind": "faults", "faults": 0, "pages": 0, "zero": 0, "bytes_pages": 0,
                                         "requests": 0, "refused": 0, "prefetched": 0, "prefetch_hits": 0}
        # For a policy (migrate.policies): the faults it has not read yet, the neighbourhood it set
        # (None: the built-in readahead above), and the prefetched pages not yet seen used.
        self.history: collections.deque[int] = collections.deque(maxlen=HISTORY)
        self.neighbourhood: Neighbourhood | None = None
        self._prefetched = SharedBitmap.create(mem.page_count)

    def _region_end(self, page: int) -> int:
        for r in self.mem.io.regions:
            end = r.first_page + r.pages
            if r.first_page <= page < end:
                return end
        return page + 1

    def _ask(self, first: int, count: int, waiting: list[tuple[int, int, int]]) -> None:
        """Send a request and record it in flight (call with the lock held)."""
        req_id = self._next_id
        self._next_id += 1
        msg = pb.PageRequest(run_id=self._run_id, req_id=req_id, first_page=first, count=count)
        self._waiting[req_id] = waiting
        self._sent[req_id] = msg
        for page in range(first, first + count):
            self._covers.setdefault(page, req_id)
        self.counters["requests"] += 1
        self._send(msg)

    def _prefetch(self, page: int) -> tuple[int, int]:
        """(first, end) to fetch after `page`: a readahead for a sequential reader,
        the page's block when faults cluster, nothing when they are scattered
        (a prefetch no one touches only delays the next fault's reply)."""
        clustered = any(abs(page - q) < _CLUSTER for q in self._recent)
        self._recent.append(page)
        if self._expect <= page < self._expect + self._readahead:
            self._readahead = min(2 * self._readahead, MAX_READAHEAD)
            first = page + 1
        elif clustered:
            self._readahead = NEIGHBOURHOOD
            first = page - page % NEIGHBOURHOOD
        else:
            self._readahead = NEIGHBOURHOOD
            self._expect = page + 1
            return page + 1, page + 1
        end = min(first + self._readahead, self._region_end(page))
        self._expect = end
        return first, end

    def _neighbours(self, page: int) -> tuple[list[tuple[int, int]], int]:
        """(runs to prefetch with a fault on `page`, where the bulk path goes on from)."""
        nb = self.neighbourhood
        if nb is None:
            first, end = self._prefetch(page)
            return [(first, end - first)], end
        return ranges_of(sorted(nb.pages_of(page, self.mem.page_count))), page

    def _count_hits(self, page: int) -> None:
        """Prefetched pages this fault shows used: the page itself (on its way), and those right
        before and after it, stride apart (gone through without a fault); as the native path counts."""
        pf, n = self._prefetched, self.mem.page_count
        stride = abs(self.neighbourhood.stride) if self.neighbourhood and self.neighbourhood.shape != "aligned" else 1
        hits = [page] if pf.test(page) else []
        for step in (-stride, stride):
            q = page + step
            while 0 <= q < n and pf.test(q) and len(hits) <= 2 * MAX_READAHEAD:
                hits.append(q)
                q += step
        for q in hits:
            pf.clear_range(q, 1)
        self.counters["prefetch_hits"] += len(hits)

    def count_used(self, used: SharedBitmap) -> int:
        """Count as hits the prefetched pages set in `used` (seen used without a fault, e.g. written)."""
        with self._lock:  # the fault handling counts hits under it too
            hits = self._prefetched.take(used)
            self.counters["prefetch_hits"] += hits
        return hits

    def on_faults(self, faults: list[tuple[int, int, int]]) -> None:
        for page, waiters, t_ns in faults:
            with self._lock:
                self.counters["faults"] += 1
                self.history.append(page)
                self._count_hits(page)
                req_id = self._covers.get(page)
                least = 1
                fault: tuple[int, int, int] | None = None  # to ask for with its neighbours
                if req_id is not None:
                    self._waiting[req_id].append((page, t_ns, waiters))
                    if self.neighbourhood is None:
                        continue  # the built-in readahead already asked past it
                    # A policy's neighbourhood moves on with a fault on a page in flight, as on the native
                    # path, so that a reader that caught up with its readahead keeps the pipe full; in
                    # whole requests (a request per page or two would cost more than the faults it saves).
                    least = MAX_URGENT_PAGES // 2
                elif self._asked is not None and self._asked.test(page):
                    self._on_bulk.append((page, t_ns, waiters))
                else:
                    fault = (page, t_ns, waiters)
                runs, jump_to = self._neighbours(page)
                wanted = [run for first, count in runs for run in self._wanted(first, first + count, least)
                          for run in _without(fault[0] if fault else -1, run)]
                for run_first, n in wanted:
                    self._prefetched.set_range(run_first, n)
                    self.counters["prefetched"] += n
                if fault is not None:
                    wanted = self._ask_with(fault, wanted)
                for run_first, n in wanted:
                    for at in range(run_first, run_first + n, MAX_URGENT_PAGES):
                        self._ask(at, min(MAX_URGENT_PAGES, run_first + n - at), [])
            self._jump(jump_to)

    def _ask_with(self, fault: tuple[int, int, int], wanted: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Ask for a faulting page in one request with the neighbours right next to it, at most
        NEIGHBOURHOOD pages in all (its reply stays one small message, one UFFDIO_COPY); returns
        the runs of `wanted` (none holding the page) left to ask for on their own (call with the lock held)."""
        page = fault[0]
        if self._asked is not None:
            self._asked.set_range(page, 1)
        first, end, rest = page, page + 1, []
        for run_first, n in wanted:
            run_end = run_first + n
            if run_end == first:  # just before the page: its pages nearest the page join
                take = min(n, NEIGHBOURHOOD - (end - first))
                first -= take
                n -= take
            elif run_first == end:  # just after it
                take = min(n, NEIGHBOURHOOD - (end - first))
                end += take
                run_first, n = end, n - take
            if n:
                rest.append((run_first, n))
        self._ask(first, end - first, [fault])
        return rest

    def _wanted(self, first: int, end: int, least: int = 1) -> Iterator[tuple[int, int]]:
        """Runs of at least `least` pages in [first, end) neither received nor asked (marked asked now).

        Asked: in the bulk path's bitmap, where this path marks its own too;
        without one (the gRPC plane), covered by an urgent request in flight."""
        received, asked, covers = self.mem.bitmap, self._asked, self._covers
        page = first
        while (page := received.next_clear(page)) < end:
            if asked is not None and asked.test(page):
                page = asked.next_clear(page)
                continue
            if asked is None and page in covers:
                page += 1
                continue
            stop = min(end, received.next_set(page), asked.next_set(page) if asked is not None else end)
            if asked is None:
                stop = next((q for q in range(page, stop) if q in covers), stop)
            if stop - page < least:
                page = stop
                continue
            if asked is not None:
                asked.set_range(page, stop - page)
            yield page, stop - page
            page = stop

    def install(self, raw: bytes) -> None:
        """Install an urgent reply and close the faults it answers (a refused one is asked again)."""
        try:
            batch = self._decoder.install(raw, self.mem.io, self.mem.bitmap)
        except BatchError as err:
            self._ask_again(err)
            return
        now = batch.done.done_ns  # the guest ran again then, whatever delays us on the way back to Python
        with self._lock:
            msg = self._sent.pop(batch.req_id, None)
            if msg is not None:
                for page in range(msg.first_page, msg.first_page + msg.count):
                    if self._covers.get(page) == batch.req_id:
                        del self._covers[page]
            self._resolve(self._waiting.pop(batch.req_id, []), now)
            self.mem.count(self.counters, batch.done)

    def _ask_again(self, err: BatchError) -> None:
        """A refused batch is never installed: send its request again (a few times);
        every unanswered one when the batch does not say which it answers."""
        with self._lock:
            self.counters["refused"] += 1
            if self.counters["refused"] > MAX_REFUSED:
                raise err
            msg = self._sent.get(err.req_id) if err.req_id is not None else None
            for again in [msg] if msg is not None else self._unanswered():
                self._send(again)

    def unanswered(self) -> list[pb.PageRequest]:
        """The requests in flight, oldest first: what a fresh call sends again after a reconnect."""
        with self._lock:
            return self._unanswered()

    def _unanswered(self) -> list[pb.PageRequest]:
        return sorted(self._sent.values(), key=lambda m: m.req_id)

    def _resolve(self, faults: list[tuple[int, int, int]], now_ns: int) -> None:
        """Record the latency of faults whose page is in (call with the lock held)."""
        for _, t_ns, waiters in faults:
            us = (now_ns - t_ns) / 1000.0
            self.latencies_us.append(us)
            self.blocked_us += us * waiters

    @property
    def on_bulk(self) -> int:
        """How many faults wait for a page the bulk path has in flight."""
        return len(self._on_bulk)

    def resolve_arrived(self) -> bool:
        """Close the faults whose page another path (the bulk stream) installed first;
        True while faults wait that another path may answer (the fault loop then
        looks again soon; a fault only its own reply answers is closed by the reply reader).

        Their own reply may still be queued behind others; the guest thread
        already runs again, and its latency ends now, not then. With the bulk
        path's `asked` bitmap no other path installs a page asked here.
        """
        now = time.monotonic_ns()
        test = self.mem.bitmap.test
        with self._lock:
            for faults in self._waiting.values() if self._asked is None else ():
                if faults and any(test(page) for page, _, _ in faults):
                    arrived = [f for f in faults if test(f[0])]
                    faults[:] = [f for f in faults if not test(f[0])]
                    self._resolve(arrived, now)
            if self._on_bulk:
                self._resolve([f for f in self._on_bulk if test(f[0])], now)
                on_bulk, self._on_bulk = [f for f in self._on_bulk if not test(f[0])], []
                for fault in on_bulk:
                    if self._asked is not None and self._asked.test(fault[0]):
                        self._on_bulk.append(fault)
                    else:  # the bulk wrote its request off (a link lost): ask for it here, alone
                        self._ask_with(fault, [])
            return bool(self._on_bulk) or (self._asked is None and any(self._waiting.values()))

    def close(self) -> None:
        self._prefetched.close()

    def snapshot(self) -> dict:
        """The counters, for the agent."""
        with self._lock:
            return dict(self.counters, **self._link.counters(), events=self.mem.io.events())

    def summary(self) -> dict:
        out = self.snapshot()
        with self._lock:
            out["latency_us"] = stats.summarize(self.latencies_us)
            out["blocked_ms"] = round(self.blocked_us / 1000.0, 3)
        return out


#: The Fetch call's method, and the tags of its operations.
_FETCH = b"/migrate.v1.Pages/Fetch"
_OPENED, _ENDED, _SENT, _REPLY = "opened", "ended", "sent", "reply"
#: How long the fault thread waits for a fault before looking at its stop flag again.
_IDLE_MS = 20


class CallEnded(grpc.RpcError):
    """The Fetch call ended (the link broke, the source refused or the run stopped it), with its status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _FetchCall:
    """One Pages.Fetch call on a completion queue of its own (gRPC's "segregated" call, as its
    blocking unary calls make), driven by two threads and no other: requests go out from the thread
    that asks (the fault thread; the reply thread for a refused batch), one at a time as gRPC
    requires (the others queue here, in order); the reply thread waits on the queue (`next`), and
    while it waits it polls the connection itself. gRPC's asyncio client put its poller thread
    between the socket and the event loop for every reply and for every request's completion:
    about 2.5x the client's CPU per message and ~20 µs more per round trip, measured side by side
    (performance.md, "Where a gRPC fault's time goes").

    The segregated call belongs to gRPC Python's internal layer (grpc._cython.cygrpc), the one its
    own blocking calls are made of, not to its public API (tested with grpcio 1.85): every gRPC
    fault in the test suite goes through here, so a grpcio that changes it fails there at once."""

    def __init__(self, link: UrgentLink) -> None:
        meta = link.metadata
        self._wire = link.client
        self._lock = threading.Lock()
        self._queued: collections.deque[bytes] = collections.deque()
        self._sending = False
        self._status: tuple[grpc.StatusCode, str] | None = None  # how the call ended
        self._call = link.channel._channel.segregated_call(  # type: ignore[attr-defined]  # the channel's own calls
            cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS, _FETCH, None, None, meta, None,
            (((cygrpc.SendInitialMetadataOperation(meta, _NO_FLAGS),), _OPENED),
             ((cygrpc.ReceiveInitialMetadataOperation(_NO_FLAGS),), _OPENED),
             ((cygrpc.ReceiveStatusOnClientOperation(_NO_FLAGS),), _ENDED),
             ((cygrpc.ReceiveMessageOperation(_NO_FLAGS),), _REPLY)), None)
        self._due = 4  # operations started and not yet seen complete: `next` may wait while any is

    def send(self, msg: pb.PageRequest) -> None:
        """Send `msg` now, or after the requests before it. On a call that ended it goes nowhere: the
        request is still unanswered, and the next call sends it again."""
        with self._lock:
            raw = self._wire.serialize(msg)
            if self._sending:
                self._queued.append(raw)
            else:
                self._start(raw)

    def _start(self, raw: bytes) -> None:
        """Start sending `raw` (call with the lock held)."""
        self._sending = self._call.operate((cygrpc.SendMessageOperation(raw, _NO_FLAGS),), _SENT)
        self._due += self._sending

    def next(self) -> bytes | None:
        """The next reply (None: an event that brings none); CallEnded once the call ended and all its
        operations are in (call no more then)."""
        event = self._call.next_event()
        with self._lock:
            self._due -= 1
            if event.tag == _SENT:
                self._sending = False
                if self._queued:
                    self._start(self._queued.popleft())
            elif event.tag == _ENDED:
                op = event.batch_operations[0]
                details = op.details()
                self._status = (_STATUS[op.code()],
                                details.decode(errors="replace") if isinstance(details, bytes) else details)
            elif event.tag == _REPLY and (raw := event.batch_operations[0].message()) is not None:
                if self._call.operate((cygrpc.ReceiveMessageOperation(_NO_FLAGS),), _REPLY):
                    self._due += 1
                return self._wire.parse(raw)
            if not self._due:  # a fresh exception each time: one kept here would keep its frames alive
                raise CallEnded(*(self._status or _NO_STATUS))
        return None

    def cancel(self) -> None:
        """End the call (its operations complete, `next` raises CallEnded)."""
        self._call.cancel(cygrpc.StatusCode.cancelled, "the urgent path stopped")


_NO_FLAGS = 0
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_NO_STATUS = (grpc.StatusCode.UNKNOWN, "the urgent stream ended without a status")


class _Requests:
    """Where a run's requests go: the Fetch call in use, a fresh one after each reconnect. The
    FaultServer holds this, not the FaultLoop: a loop its own server pointed back to would live on
    after its run, with whatever it holds, until a garbage collection."""

    def __init__(self, call: _FetchCall) -> None:
        self.call = call

    def send(self, msg: pb.PageRequest) -> None:
        self.call.send(msg)


class FaultLoop:
    """A run's urgent path: two threads of the destination agent, each at spawn.URGENT_NICE.

    The fault thread waits on the userfaultfd (and the fds that say faults
    wait: the space's stash, a bulk path's installs), reads the faults there
    are in C, dedupes and asks (sending the request itself, see _FetchCall);
    the reply thread waits on the Fetch call, installs each reply (one C
    call) and closes its faults; after a transport error it reconnects and
    sends every request still unanswered on a fresh call. Connecting
    happens here: a source that cannot be reached raises AgentUnreachable
    (a ConnectionError), before the guest ever stops on the source. `jump`
    tells the bulk path where the guest faults; `asked`, a native bulk
    path's bitmap of pages asked for, keeps prefetches from asking them again.
    """

    def __init__(self, mem: Memory, endpoint: str, run_id: str, jump: Callable[[int], None],
                 recovery_timeout: float, asked: SharedBitmap | None = None,
                 installs: BulkInstalls | None = None) -> None:
        self._mem = mem
        self._installs = installs
        self._summary: dict | None = None
        self._error: str | None = None
        self._stop = threading.Event()
        self._link = UrgentLink(endpoint, recovery_timeout, self._stop)  # raises AgentUnreachable
        try:
            self._requests = _Requests(_FetchCall(self._link))
        except BaseException:
            self._link.close()
            raise
        self._server = FaultServer(mem, self._link, run_id, jump, self._requests.send, asked)
        self._threads = [threading.Thread(target=guarded(what, body, self._fail), daemon=True, name=name)
                         for what, body, name in (("urgent reply reader", self._receive, "urgent-replies"),
                                                  ("fault loop", self._serve, "urgent-faults"))]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        """The fault thread: read the faults there are, ask for them, close those another path answered,
        and look again soon while any wait for that (or at once when the bulk path signals an install)."""
        spawn.raise_to_urgent()
        server, mem, installs = self._server, self._mem, self._installs
        wake_fd, patience = (-1, 1) if installs is None else (installs.installed_fd, BULK_PATIENCE_MS)
        waiting = False
        try:
            while not self._stop.is_set():
                faults = mem.io.read(mem.bitmap, timeout_ms=patience if waiting else _IDLE_MS, wake_fd=wake_fd)
                if faults:
                    server.on_faults(faults)
                if installs is not None:  # before looking: an install from now on signals
                    installs.watch(server.on_bulk)
                waiting = server.resolve_arrived()
                if installs is not None:
                    installs.watch(server.on_bulk)
                # No exit on a full bitmap: with pre-copy it fills before the switch
                # and empties again (discards); the agent stops us.
        except (OSError, BatchError) as err:
            self._fail(f"fault loop failed: {err}")

    def _receive(self) -> None:
        """The reply thread: install urgent replies as they arrive; after a transport error reconnect,
        and send every request still unanswered on a fresh call."""
        spawn.raise_to_urgent()
        server = self._server
        while True:
            call = self._requests.call
            try:
                while True:
                    raw = call.next()
                    if raw is not None:
                        server.install(raw)
            except CallEnded as ended:
                if self._stop.is_set() or not self._reconnected(ended):
                    return
            except (BatchError, OSError) as failed:
                self._fail(f"urgent page install failed: {failed}")
                self._drain(call)
                return

    def _reconnected(self, ended: CallEnded) -> bool:
        """After the call ended with `ended`: reconnect, open a fresh call and send every request still
        unanswered on it; False if the path stops instead (stopped, or failed: the link stayed down, or
        the source refused the call)."""
        link = self._link
        try:
            if not link.recover(ended):
                return False
        except LinkLost as lost:
            self._fail(str(lost))
            return False
        except grpc.RpcError as fatal:
            self._fail(f"urgent stream to the source failed: {fatal.details() or fatal.code().name}")
            return False
        self._requests.call = call = _FetchCall(link)
        if self._stop.is_set():  # stop() may have cancelled the call before this one
            call.cancel()
            self._drain(call)
            return False
        for msg in self._server.unanswered():
            call.send(msg)
        return True

    @staticmethod
    def _drain(call: _FetchCall) -> None:
        """Wait out a cancelled call's last operations (its completion queue goes with the last)."""
        try:
            while True:
                call.next()
        except CallEnded:
            pass

    def _fail(self, error: str) -> None:
        """Stop serving, for `error` (the first one given is kept)."""
        if self._error is None:
            self._error = error
        self._stop.set()
        self._requests.call.cancel()

    @property
    def last(self) -> dict:
        """The counters; after stop(), the summary with latencies."""
        if self._summary is not None:
            return self._summary
        out = self._server.snapshot()
        if self._error:
            out["error"] = self._error
        return out

    def failure(self) -> str | None:
        """Why the urgent path stopped serving, or None while it serves."""
        return self._error

    def new_faults(self) -> list[int]:
        """The pages faulted on since the last call, in order (for a policy)."""
        history, out = self._server.history, []
        while history:
            out.append(history.popleft())
        return out

    def prefetch_counts(self) -> tuple[int, int]:
        c = self._server.counters
        return c["prefetched"], c["prefetch_hits"]

    def count_used(self, used: SharedBitmap) -> int:
        return self._server.count_used(used)

    def set_neighbourhood(self, nb: Neighbourhood) -> None:
        """What each following fault fetches with it."""
        self._server.neighbourhood = nb

    def stop(self, timeout: float = 10.0) -> None:
        if self._summary is not None:
            return
        self._stop.set()
        self._requests.call.cancel()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        if any(thread.is_alive() for thread in self._threads):
            self._error = self._error or f"the urgent path did not stop within {timeout:g} s"
        self._link.close()
        self._server.close()
        summary = dict(self._server.summary(), done=True)
        if self._error:
            summary["error"] = self._error
        self._summary = summary
