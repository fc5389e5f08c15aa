"""The destination's fault worker: the urgent path, in a process of its own.

Loop: read many fault messages at once (native, GIL released; pages that
already arrived are woken right there), ask the source for each missing page
over the urgent Pages.Fetch stream (its own HTTP/2 connection) and, right
behind it, for its aligned 64 KiB neighbourhood, or, while the guest reads
sequentially, a readahead that doubles up to 256 KiB; install each reply with
one UFFDIO_COPY per run, and time each fault from its read to its install.
The faulting page travels alone so its reply is one small message.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Iterator

import grpc

from migrate import rpc, stats
from migrate.batches import MAX_URGENT_PAGES, BatchDecoder, BatchError
from migrate.dest import worker
from migrate.dest.link import LinkLost, SourceLink
from migrate.proto import migrate_pb2 as pb

#: Pages prefetched around a random fault: its aligned 64 KiB block.
NEIGHBOURHOOD = 16
#: Most pages prefetched after a fault, when the guest reads sequentially
#: (the readahead doubles while faults keep landing right behind it).
MAX_READAHEAD = MAX_URGENT_PAGES


class FaultServer:
    """Turns faults into urgent requests and urgent replies into installs."""

    def __init__(self, mem: worker.Memory, link: SourceLink, run_id: str, hint_fd: int) -> None:
        self.mem = mem
        self._link = link
        self._run_id = run_id
        self._hint_fd = hint_fd
        self._decoder = BatchDecoder(mem.page_count, mem.page_size)
        self._lock = threading.Lock()
        # In flight, by request id: the faults waiting on it [(t_ns, waiters)], the request itself
        # (sent again after a reconnect) and the pages it covers; and page -> request id.
        self._waiting: dict[int, list[tuple[int, int]]] = {}
        self._sent: dict[int, pb.PageRequest] = {}
        self._covers: dict[int, int] = {}
        self._next_id = 1
        self._readahead = NEIGHBOURHOOD
        self._expect = -1  # where a sequential reader's next fault would land
        self._closing = False
        self.latencies_us: list[float] = []
        self.blocked_us = 0.0
        self.counters = {"kind": "faults", "faults": 0, "pages": 0, "zero": 0, "bytes_pages": 0, "requests": 0}
        self.error: str | None = None
        self._requests: queue.SimpleQueue[pb.PageRequest | None] = queue.SimpleQueue()
        self._responses = self._open_stream(self._requests)

    def _open_stream(self, requests: queue.SimpleQueue) -> Iterator[pb.PageBatch]:
        def stream() -> Iterator[pb.PageRequest]:
            while (req := requests.get()) is not None:
                yield req

        return self._link.client.fetch(stream(), metadata=rpc.METADATA)

    def _region_end(self, page: int) -> int:
        for r in self.mem.io.regions:
            end = r.first_page + r.size // self.mem.page_size
            if r.first_page <= page < end:
                return end
        return page + 1

    def _ask(self, first: int, count: int, waiting: list[tuple[int, int]]) -> None:
        """Send a request and record it in flight (call with the lock held)."""
        req_id = self._next_id
        self._next_id += 1
        msg = pb.PageRequest(run_id=self._run_id, req_id=req_id, first_page=first, count=count)
        self._waiting[req_id] = waiting
        self._sent[req_id] = msg
        for page in range(first, first + count):
            self._covers.setdefault(page, req_id)
        self.counters["requests"] += 1
        self._requests.put(msg)

    def _prefetch(self, page: int) -> tuple[int, int]:
        """(first, end) to fetch after `page`: its block, or more for a sequential reader."""
        if self._expect <= page < self._expect + self._readahead:
            self._readahead = min(2 * self._readahead, MAX_READAHEAD)
            first = page + 1
        else:
            self._readahead = NEIGHBOURHOOD
            first = page - page % NEIGHBOURHOOD
        end = min(first + self._readahead, self._region_end(page))
        self._expect = end
        return first, end

    def on_faults(self, faults: list[tuple[int, int, int]]) -> None:
        for page, waiters, t_ns in faults:
            with self._lock:
                self.counters["faults"] += 1
                req_id = self._covers.get(page)
                if req_id is not None:
                    self._waiting[req_id].append((t_ns, waiters))
                    continue
                self._ask(page, 1, [(t_ns, waiters)])
                first, end = self._prefetch(page)
                if end > first:
                    self._ask(first, end - first, [])
            if self._hint_fd >= 0:
                try:
                    os.write(self._hint_fd, end.to_bytes(8, "little"))
                except BlockingIOError:
                    pass  # the bulk worker is behind on hints; it only loses a jump

    def _install(self, batch: pb.PageBatch) -> None:
        decoded = self._decoder.decode(batch)
        done = self.mem.io.install(self.mem.bitmap, decoded.first_page, decoded.count,
                                   decoded.zero_runs, decoded.data)
        now = time.monotonic_ns()
        with self._lock:
            msg = self._sent.pop(batch.req_id, None)
            if msg is not None:
                for page in range(msg.first_page, msg.first_page + msg.count):
                    if self._covers.get(page) == batch.req_id:
                        del self._covers[page]
            for t_ns, waiters in self._waiting.pop(batch.req_id, []):
                us = (now - t_ns) / 1000.0
                self.latencies_us.append(us)
                self.blocked_us += us * waiters
            c = self.counters
            c["pages"] += done.installed
            c["zero"] += done.zeroed
            c["bytes_pages"] += done.installed * self.mem.page_size

    def _reopen(self) -> None:
        """A fresh stream after a reconnect, carrying every request still unanswered."""
        with self._lock:
            old, self._requests = self._requests, queue.SimpleQueue()
            old.put(None)  # ends the dead stream's request generator
            self._responses = self._open_stream(self._requests)
            for req_id in sorted(self._sent):
                self._requests.put(self._sent[req_id])

    def receive(self) -> None:
        """Install urgent replies as they arrive (runs on its own thread)."""
        while True:
            try:
                for batch in self._responses:
                    self._install(batch)
                return
            except grpc.RpcError as err:
                if self._closing:
                    return
                try:
                    self._link.recover(err)
                except LinkLost as lost:
                    self.error = str(lost)
                    return
                except grpc.RpcError as fatal:
                    self.error = f"urgent stream to the source failed: {fatal.details() or fatal.code().name}"
                    return
                self._reopen()
            except (BatchError, OSError) as err:
                self.error = f"urgent page install failed: {err}"
                return

    def close(self) -> None:
        self._closing = True
        self._requests.put(None)

    def snapshot(self) -> dict:
        """The counters, for the agent."""
        with self._lock:
            return dict(self.counters, **self._link.counters())

    def summary(self) -> dict:
        out = self.snapshot()
        with self._lock:
            out["latency_us"] = stats.summarize(self.latencies_us)
            out["blocked_ms"] = round(self.blocked_us / 1000.0, 3)
        return out


def main(argv: list[str] | None = None) -> int:
    args = worker.arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    mem = worker.open_memory(args)
    if args.hint_fd >= 0:
        os.set_blocking(args.hint_fd, False)
    link = SourceLink(args.endpoint, "urgent", args.recovery_timeout)
    stop = worker.stop_on_stdin_close()
    server = FaultServer(mem, link, args.run_id, args.hint_fd)
    receiver = threading.Thread(target=server.receive, daemon=True, name="urgent-replies")
    receiver.start()
    worker.report_periodically(server.snapshot, stop)
    while not stop.is_set() and server.error is None:
        faults = mem.io.read(mem.bitmap, timeout_ms=20)
        if faults:
            server.on_faults(faults)
        # No exit on a full bitmap: with pre-copy it fills before the switch and
        # empties again (discards); the agent stops us by closing stdin.
    server.close()
    receiver.join(timeout=5)
    link.close()
    summary = dict(server.summary(), done=True)
    if server.error:
        summary["error"] = server.error
    worker.emit(summary)
    return 1 if server.error else 0


if __name__ == "__main__":
    sys.exit(main())
