"""The source's bulk page server: a process of its own, serving Pages.Bulk.

It maps the guest's memfd read-only, compresses batches in a small thread
pool (zstd releases the GIL) and streams them in the order they were asked
for. Running it apart from the agent keeps bulk compression and bulk frames
away from the urgent fault path: its own process (SCHED_BATCH), its own port, its
own HTTP/2 connection.

Started by the source agent with the memfd inherited; prints one JSON line
{"port": N} when listening, serves until its stdin closes, then prints its
counters as a last JSON line. It never outlives its agent: the kernel kills
it when the agent dies (PR_SET_PDEATHSIG), and stdin's EOF stops it too.
"""
from __future__ import annotations

import argparse
import collections
import json
import mmap
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from migrate import rpc, spawn
from migrate.admission import CallClass
from migrate.batches import (
    MAX_BULK_PAGES,
    BatchEncoder,
    BulkRequestError,
    EncodedBatch,
    Run,
    add_pages_servicer,
    request_runs,
)
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc

#: Encoder threads: compressed batches are encoded this many ahead of the sender.
ENCODERS = 2
#: Batches a stream may have asked for and not yet been sent.
_QUEUED_BATCHES = 64
#: When bulk batches are compressed: when the link is the bottleneck, always, never.
COMPRESS_POLICIES = ("auto", "always", "never")
#: Bytes/s zstd is assumed to compress until it has been measured here.
_COMPRESS_BPS_GUESS = 400e6
#: Under "auto", data that compressed worse than this (compressed / raw) is
#: sent raw, with one batch in _PROBE_EVERY compressed to notice a change.
_STOP_RATIO = 0.9
_PROBE_EVERY = 32
#: Seconds an idle stream waits before it looks whether its call is still alive.
_IDLE_CHECK_S = 0.5
#: Streams served at once, in all and per destination host, each on a worker of its own (migrate.admission).
#: A destination needs one or two (bulk, pre-copy) plus those of a dropped link not yet noticed as dead.
CALLS = (CallClass("bulk streams", ("/migrate.v1.Pages/",), per_peer=8, total=16),)


@dataclass
class _Message:
    """The batches of one PageBatches message to send: pieces of a request's runs, MAX_BULK_PAGES in all."""

    req_id: int
    pieces: list[Run]
    pages: int


def _messages(runs: list[Run], req_id: int) -> Iterator[_Message]:
    """A request's runs, in order, as messages of at most MAX_BULK_PAGES pages, a batch per piece: a run
    that fits in one message is not split, a longer one is cut every MAX_BULK_PAGES pages."""
    pieces: list[Run] = []
    pages = 0
    for first, count in runs:
        while count:
            take = min(count, MAX_BULK_PAGES)
            if pages + take > MAX_BULK_PAGES:
                yield _Message(req_id, pieces, pages)
                pieces, pages = [], 0
            pieces.append((first, take))
            pages += take
            first, count = first + take, count - take
    if pieces:
        yield _Message(req_id, pieces, pages)


class BulkPages(pb_grpc.PagesServicer):
    """Pages.Bulk for one guest of one migration run.

    Compression ("auto") adapts to the link and to the data. A batch is
    compressed only when the link is what limits us: when the last send took
    longer than compressing the next batch would (spread over the encoder
    threads). Then encoders work ahead of the sender and compression costs
    no time. It is not when the data does not compress (the measured ratio
    says so; a probe now and then notices when that changes), and never
    when the destination is on this host: a loopback "link" is memory, a
    send that takes long waits for the destination's CPU, and compressing
    would take that same CPU.
    """

    def __init__(self, mem: memoryview, page_size: int, run_id: str, level: int, policy: str, threads: int) -> None:
        self._mem = mem
        self._page_size = page_size
        self._page_count = len(mem) // page_size
        self._run_id = run_id
        self._level = level
        self._policy = policy
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstd")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._compress_bps = _COMPRESS_BPS_GUESS
        self._ratio = 0.5  # compressed / raw bytes, a moving average
        self._skipped = 0  # batches sent raw for their poor ratio since the last probe
        self.pages = 0
        self.bytes = 0
        self.compressed_batches = 0

    def _encode(self, message: _Message, compress: bool) -> EncodedBatch:
        """One PageBatches message: a batch per piece of `message`."""
        key = "zstd" if compress else "raw"
        enc = getattr(self._local, key, None)
        if enc is None:
            enc = BatchEncoder(self._mem, self._page_size, self._level if compress else None)
            setattr(self._local, key, enc)
        if not compress:
            return enc.encode_runs(message.pieces, message.req_id)
        t0 = time.monotonic()
        batch = enc.encode_runs(message.pieces, message.req_id)
        seconds = time.monotonic() - t0
        raw = batch.count * self._page_size
        with self._lock:  # moving averages of this host's compression speed and this guest's ratio
            if seconds > 0:
                self._compress_bps = 0.8 * self._compress_bps + 0.2 * raw / seconds
            self._ratio = 0.8 * self._ratio + 0.2 * len(batch.wire) / raw
        return batch

    def _should_compress(self, last_send_s: float, message: _Message, local_peer: bool) -> bool:
        """Per policy; for "auto": does the data compress, and would compressing hide behind the link's pace?"""
        if self._policy != "auto":
            return self._policy == "always"
        if local_peer:
            return False
        if self._ratio > _STOP_RATIO:
            self._skipped += 1
            if self._skipped < _PROBE_EVERY:
                return False
            self._skipped = 0
        return last_send_s * self._threads > message.pages * self._page_size / self._compress_bps

    def _runs(self, req: pb.BulkRequest) -> list[Run] | str:
        """The runs `req` asks for, or why it is refused."""
        if req.run_id != self._run_id:
            return f"unknown run {req.run_id!r}"
        try:
            return request_runs(req, self._page_count)
        except BulkRequestError as err:
            return str(err)

    def Bulk(self, request_iterator: Iterator[pb.BulkRequest], context: grpc.ServicerContext) -> Iterator[bytes]:
        # Bounded: a client that floods requests is slowed by gRPC flow control, not served from RAM.
        incoming: queue.Queue[_Message | str | None] = queue.Queue(maxsize=_QUEUED_BATCHES)

        def put(item: _Message | str | None) -> bool:
            while context.is_active():
                try:
                    incoming.put(item, timeout=_IDLE_CHECK_S)
                    return True
                except queue.Full:
                    pass
            return False

        def wake() -> None:
            """Wake the loop below when the call ends: never blocks (a full queue means it is not waiting)."""
            try:
                incoming.put_nowait(None)
            except queue.Full:
                pass

        def read_requests() -> None:
            try:
                for req in request_iterator:
                    runs = self._runs(req)
                    if isinstance(runs, str):
                        put(runs)
                        return
                    for message in _messages(runs, req.req_id):
                        if not put(message):
                            return
            except grpc.RpcError:
                pass  # the client went away; the stream ends below
            finally:
                put(None)  # waits for room: every request before it is served

        if not context.add_callback(wake):  # a call that ends (cancelled, say) wakes the loop at once
            wake()
        threading.Thread(target=read_requests, daemon=True, name="bulk-requests").start()
        local_peer = rpc.is_local_peer(context.peer())
        pending: collections.deque[Future | EncodedBatch] = collections.deque()
        ended = False
        last_send_s = 0.0
        while True:
            while not ended and len(pending) <= self._threads:
                try:
                    item = incoming.get_nowait() if pending else incoming.get(timeout=_IDLE_CHECK_S)
                except queue.Empty:
                    if pending:
                        break  # send what is ready
                    if not context.is_active():
                        return  # the call ended while idle (wake() got no room): the worker comes back
                    continue
                if item is None:
                    ended = True
                elif isinstance(item, str):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, item)
                elif self._should_compress(last_send_s, item, local_peer):
                    pending.append(self._pool.submit(self._encode, item, True))
                else:
                    pending.append(self._encode(item, False))
            if not pending:
                return
            head = pending.popleft()
            batch = head.result() if isinstance(head, Future) else head
            with self._lock:
                self.pages += batch.count
                self.bytes += len(batch.wire)
                self.compressed_batches += batch.compressed
            t0 = time.monotonic()
            yield batch.wire
            last_send_s = time.monotonic() - t0

    def Fetch(self, request_iterator: Iterator[pb.PageRequest], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "urgent requests go to the source agent, not the bulk server")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memfd", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--page-size", type=int, required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--listen", required=True, help="host:port (port 0 picks one)")
    ap.add_argument("--level", type=int, default=1, help="zstd level")
    ap.add_argument("--compress", choices=COMPRESS_POLICIES, default="auto")
    ap.add_argument("--threads", type=int, default=ENCODERS)
    args = ap.parse_args(argv)
    spawn.die_with_parent()
    spawn.tune_allocator()
    spawn.yield_cpu_to_urgent_work()
    mem = memoryview(mmap.mmap(args.memfd, args.size, mmap.MAP_SHARED, mmap.PROT_READ))
    service = BulkPages(mem, args.page_size, args.run_id, args.level, args.compress, args.threads)
    server = rpc.server(CALLS)
    add_pages_servicer(service, server)
    try:
        port = rpc.bind(server, args.listen)
    except rpc.AgentError as err:
        _tell_agent({"error": str(err)})
        return 1
    server.start()
    _tell_agent({"port": port})
    sys.stdin.read()  # EOF: the agent closed our stdin to stop us, or it is gone
    server.stop(grace=0.5).wait()
    _tell_agent({"pages": service.pages, "bytes": service.bytes, "compressed_batches": service.compressed_batches})
    return 0


def _tell_agent(message: dict) -> None:
    """One JSON line on stdout; an agent that is gone hears nothing, and no traceback says so."""
    try:
        print(json.dumps(message), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit fails again


if __name__ == "__main__":
    sys.exit(main())
