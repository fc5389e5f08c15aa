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
from concurrent.futures import Future, ThreadPoolExecutor

import grpc

from migrate import rpc
from migrate.batches import BatchEncoder
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc

#: Most pages one bulk request may ask for (1 MiB of 4 KiB pages).
MAX_BULK_PAGES = 256
#: Encoded batches queued ahead of the network.
_PIPELINE = 4


class BulkPages(pb_grpc.PagesServicer):
    """Pages.Bulk for one guest of one migration run."""

    def __init__(self, mem: memoryview, page_size: int, run_id: str, level: int | None, threads: int) -> None:
        self._mem = mem
        self._page_size = page_size
        self._page_count = len(mem) // page_size
        self._run_id = run_id
        self._level = level
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstd")
        self._lock = threading.Lock()
        self.pages = 0
        self.bytes = 0

    def _encode(self, req: pb.BulkRequest) -> pb.PageBatch:
        enc = getattr(self._local, "enc", None)
        if enc is None:
            enc = self._local.enc = BatchEncoder(self._mem, self._page_size, self._level)
        return enc.encode(req.first_page, req.count)

    def _check(self, req: pb.BulkRequest) -> str | None:
        if req.run_id != self._run_id:
            return f"unknown run {req.run_id!r}"
        if not 0 < req.count <= MAX_BULK_PAGES or req.first_page + req.count > self._page_count:
            return f"bad page range [{req.first_page}, +{req.count}) for {self._page_count} pages"
        return None

    def Bulk(self, request_iterator: Iterator[pb.BulkRequest], context: grpc.ServicerContext) -> Iterator[pb.PageBatch]:
        pending: queue.Queue[Future | str | None] = queue.Queue(maxsize=_PIPELINE)

        def read_requests() -> None:
            try:
                for req in request_iterator:
                    problem = self._check(req)
                    if problem:
                        pending.put(problem)
                        return
                    pending.put(self._pool.submit(self._encode, req))
            except grpc.RpcError:
                pass  # the client went away; the stream ends below
            finally:
                pending.put(None)

        threading.Thread(target=read_requests, daemon=True, name="bulk-requests").start()
        while True:
            item = pending.get()
            if item is None:
                return
            if isinstance(item, str):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, item)
            batch = item.result()
            with self._lock:
                self.pages += batch.count
                self.bytes += batch.ByteSize()
            yield batch

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
    print(json.dumps({"pages": service.pages, "bytes": service.bytes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
