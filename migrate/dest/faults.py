"""The destination's fault worker: the urgent path, in a process of its own.

Loop: read many fault messages at once (native, GIL released; pages that
already arrived are woken right there), ask the source for a small aligned
neighbourhood around each missing page over the urgent Pages.Fetch stream
(its own HTTP/2 connection), install the reply with one UFFDIO_COPY per run,
and time each fault from its read to its install.
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
from migrate.batches import BatchDecoder, BatchError, PagesClient
from migrate.dest import worker
from migrate.proto import migrate_pb2 as pb

#: Pages fetched per fault: a 64 KiB aligned block around it.
NEIGHBOURHOOD = 16


class FaultServer:
    """Turns faults into urgent requests and urgent replies into installs."""

    def __init__(self, mem: worker.Memory, client: PagesClient, run_id: str, hint_fd: int) -> None:
        self.mem = mem
        self._run_id = run_id
        self._hint_fd = hint_fd
        self._decoder = BatchDecoder(mem.page_count, mem.page_size)
        self._requests: queue.SimpleQueue[pb.PageRequest | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight: dict[int, list[tuple[int, int]]] = {}  # block start -> [(t_ns, waiters)]
        self._next_id = 1
        self.latencies_us: list[float] = []
        self.blocked_us = 0.0
        self.counters = {"kind": "faults", "faults": 0, "pages": 0, "zero": 0, "bytes_wire": 0,
                         "bytes_pages": 0, "requests": 0}
        self._client = client
        self._responses = client.fetch(self._request_stream(), metadata=rpc.METADATA)
        self.error: str | None = None

    def _request_stream(self) -> Iterator[pb.PageRequest]:
        while True:
            req = self._requests.get()
            if req is None:
                return
            yield req

    def _block(self, page: int) -> tuple[int, int, int]:
        """(key, first, count): the aligned neighbourhood of `page`, clipped to its region."""
        key = page - page % NEIGHBOURHOOD
        for r in self.mem.io.regions:
            end = r.first_page + r.size // self.mem.page_size
            if r.first_page <= page < end:
                first = max(key, r.first_page)
                return key, first, min(key + NEIGHBOURHOOD, end) - first
        return key, page, 1

    def on_faults(self, faults: list[tuple[int, int, int]]) -> None:
        for page, waiters, t_ns in faults:
            key, first, count = self._block(page)
            with self._lock:
                self.counters["faults"] += 1
                waiting = self._inflight.get(key)
                if waiting is not None:
                    waiting.append((t_ns, waiters))
                    continue
                self._inflight[key] = [(t_ns, waiters)]
                req_id = key + 1  # one request per block in flight: the key identifies it
            msg = pb.PageRequest(run_id=self._run_id, req_id=req_id, first_page=first, count=count)
            with self._lock:
                self.counters["requests"] += 1
            self._requests.put(msg)
            if self._hint_fd >= 0:
                try:
                    os.write(self._hint_fd, (first + count).to_bytes(8, "little"))
                except BlockingIOError:
                    pass  # the bulk worker is behind on hints; it only loses a jump

    def receive(self) -> None:
        """Install urgent replies as they arrive (runs on its own thread)."""
        try:
            for batch in self._responses:
                decoded = self._decoder.decode(batch)
                done = self.mem.io.install(self.mem.bitmap, decoded.first_page, decoded.count,
                                           decoded.zero_runs, decoded.data)
                now = time.monotonic_ns()
                with self._lock:
                    waiting = self._inflight.pop(batch.req_id - 1, [])
                    for t_ns, waiters in waiting:
                        us = (now - t_ns) / 1000.0
                        self.latencies_us.append(us)
                        self.blocked_us += us * waiters
                    c = self.counters
                    c["pages"] += done.copied + done.zeroed
                    c["zero"] += done.zeroed
                    c["bytes_pages"] += (done.copied + done.zeroed) * self.mem.page_size
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = f"urgent stream to the source failed: {err.details() or err.code().name}"
        except (BatchError, OSError) as err:
            self.error = f"urgent page install failed: {err}"

    def close(self) -> None:
        self._requests.put(None)

    def snapshot(self) -> dict:
        """The counters, for the agent."""
        with self._lock:
            return dict(self.counters, bytes_wire=self._client.bytes_wire)

    def summary(self) -> dict:
        with self._lock:
            out = dict(self.counters, bytes_wire=self._client.bytes_wire)
            out["latency_us"] = stats.summarize(self.latencies_us)
            out["blocked_ms"] = round(self.blocked_us / 1000.0, 3)
        return out


def main(argv: list[str] | None = None) -> int:
    args = worker.arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    mem = worker.open_memory(args)
    if args.hint_fd >= 0:
        os.set_blocking(args.hint_fd, False)
    channel = worker.connect(args.endpoint, "urgent")
    stop = worker.stop_on_stdin_close()
    server = FaultServer(mem, PagesClient(channel), args.run_id, args.hint_fd)
    receiver = threading.Thread(target=server.receive, daemon=True, name="urgent-replies")
    receiver.start()
    reporter = worker.Reporter()
    while not stop.is_set() and server.error is None:
        faults = mem.io.read(mem.bitmap, timeout_ms=20)
        if faults:
            server.on_faults(faults)
        elif mem.bitmap.is_full():
            break
        reporter.maybe(server.snapshot)
    server.close()
    receiver.join(timeout=5)
    channel.close()
    summary = server.summary()
    summary["done"] = True
    if server.error:
        summary["error"] = server.error
    worker.emit(summary)
    return 1 if server.error else 0


if __name__ == "__main__":
    sys.exit(main())
