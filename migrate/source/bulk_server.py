"""The source's bulk page server: a process of its own, serving Pages.Bulk.

It maps the guest's memfd read-only, compresses batches in a small thread
pool (zstd releases the GIL) and streams them in the order they were asked
for. Running it apart from the agent keeps bulk compression and bulk frames
away from the urgent fault path: its own process (niced), its own port, its
own HTTP/2 connection.

Started by the source agent with the memfd inherited; prints one JSON line
{"port": N} when listening, serves until its stdin closes, then prints its
counters as a last JSON line.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import sys
import threading
from collections.abc import Iterator

import grpc

from migrate import rpc
from migrate.batches import BatchEncoder, approx_wire_size
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc

#: Most pages one bulk request may ask for (1 MiB of 4 KiB pages).
MAX_BULK_PAGES = 256


class BulkPages(pb_grpc.PagesServicer):
    """Pages.Bulk for one guest of one migration run.

    Compression adapts to the link by itself: encoder threads compress
    requested batches while the sender ships whatever is ready; when nothing
    compressed is ready and a request is still waiting, the sender takes it
    and sends it raw. On a slow link the sender waits on the network, the
    encoders keep ahead, and every batch goes compressed; on a fast link (or
    a CPU-starved host) raw batches fill the gaps instead of stalling it.
    """

    def __init__(self, mem: memoryview, page_size: int, run_id: str, level: int | None, threads: int) -> None:
        self._mem = mem
        self._page_size = page_size
        self._page_count = len(mem) // page_size
        self._run_id = run_id
        self._level = level
        self._threads = threads
        self._local = threading.local()
        self._lock = threading.Lock()
        self.pages = 0
        self.bytes = 0
        self.raw_batches = 0

    def _encoder(self, compress: bool) -> BatchEncoder:
        key = "zstd" if compress else "raw"
        enc = getattr(self._local, key, None)
        if enc is None:
            enc = BatchEncoder(self._mem, self._page_size, self._level if compress else None)
            setattr(self._local, key, enc)
        return enc

    def _check(self, req: pb.BulkRequest) -> str | None:
        if req.run_id != self._run_id:
            return f"unknown run {req.run_id!r}"
        if not 0 < req.count <= MAX_BULK_PAGES or req.first_page + req.count > self._page_count:
            return f"bad page range [{req.first_page}, +{req.count}) for {self._page_count} pages"
        return None

    def Bulk(self, request_iterator: Iterator[pb.BulkRequest], context: grpc.ServicerContext) -> Iterator[pb.PageBatch]:
        todo: queue.Queue[pb.BulkRequest | None] = queue.Queue()
        done: queue.Queue[pb.PageBatch | str | None] = queue.Queue()
        state = {"requests": 0, "answered": 0, "ended": False}

        def read_requests() -> None:
            try:
                for req in request_iterator:
                    problem = self._check(req)
                    if problem:
                        done.put(problem)
                        return
                    with self._lock:
                        state["requests"] += 1
                    todo.put(req)
            except grpc.RpcError:
                pass  # the client went away; the stream ends below
            finally:
                with self._lock:
                    state["ended"] = True
                done.put(None)  # wakes the sender to re-check the end

        def compress() -> None:
            while (req := todo.get()) is not None:
                done.put(self._encoder(True).encode(req.first_page, req.count))

        use_zstd = self._level is not None
        workers = [threading.Thread(target=compress, daemon=True, name=f"zstd-{i}")
                   for i in range(self._threads if use_zstd else 0)]
        for w in workers:
            w.start()
        threading.Thread(target=read_requests, daemon=True, name="bulk-requests").start()
        try:
            while True:
                item = self._next_batch(todo, done, steal=True)
                if item is None:
                    with self._lock:
                        if state["ended"] and state["answered"] == state["requests"]:
                            return
                    continue
                if isinstance(item, str):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, item)
                with self._lock:
                    state["answered"] += 1
                    self.pages += item.count
                    self.bytes += approx_wire_size(item)
                yield item
        finally:
            for _ in workers:
                todo.put(None)

    def _next_batch(self, todo: queue.Queue, done: queue.Queue, steal: bool) -> pb.PageBatch | str | None:
        """A ready batch; else a waiting request encoded raw; else wait for one."""
        try:
            return done.get_nowait()
        except queue.Empty:
            pass
        if steal:
            try:
                req = todo.get_nowait()
            except queue.Empty:
                req = None
            if req is not None:
                with self._lock:
                    self.raw_batches += 1
                return self._encoder(False).encode(req.first_page, req.count)
        return done.get()

    def Fetch(self, request_iterator: Iterator[pb.PageRequest], context: grpc.ServicerContext) -> Iterator[pb.PageBatch]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "urgent requests go to the source agent, not the bulk server")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memfd", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--page-size", type=int, required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--listen", required=True, help="host:port (port 0 picks one)")
    ap.add_argument("--level", type=int, default=1, help="zstd level; -100 sends raw")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.nice(5)  # urgent work on this host goes first
    mem = memoryview(mmap.mmap(args.memfd, args.size, mmap.MAP_SHARED, mmap.PROT_READ))
    service = BulkPages(mem, args.page_size, args.run_id, None if args.level == -100 else args.level, args.threads)
    server = rpc.server(workers=4)
    pb_grpc.add_PagesServicer_to_server(service, server)
    try:
        port = rpc.bind(server, args.listen)
    except rpc.AgentError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 1
    server.start()
    print(json.dumps({"port": port}), flush=True)
    sys.stdin.read()  # the agent closes our stdin to stop us
    server.stop(grace=0.5).wait()
    print(json.dumps({"pages": service.pages, "bytes": service.bytes, "raw_batches": service.raw_batches}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
