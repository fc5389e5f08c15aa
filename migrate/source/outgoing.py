"""Source side of a migration: the run, its page server, the urgent stream.

A run begins with PrepareOutgoing (the guest keeps running; its page server
starts: a DataServer of the native plane, C threads in this agent, or a
bulk page server process for the gRPC plane; for pre-copy, write tracking
starts: see migrate.source.dirty), answers ScanDirty during pre-copy
rounds, switches over (the guest pauses, its execution state goes to the
destination), serves pages until the destination has them all, and ends
with CompleteOutgoing (the guest is released here) or AbortOutgoing (the
guest resumes here as if nothing happened).
"""
from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import grpc

from migrate import errors, spawn
from migrate.batches import MAX_URGENT_PAGES, BatchEncoder, EncodedBatch
from migrate.bitmap import SharedBitmap
from migrate.guests import HostedGuest
from migrate.local import read_first_line
from migrate.names import DataPlane
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc
from migrate.source.dataplane import DataServer
from migrate.source.dirty import DirtyTracker, TrackingUnavailable

log = logging.getLogger(__name__)

_BULK_START_TIMEOUT = 20.0
#: Seconds between two looks at a data server's counters for refused connections.
_WATCH_REJECTED_EVERY = 0.5


class BulkProcess:
    """The gRPC plane's page server: migrate.source.bulk_server, a process of its own."""

    key = b""  # the gRPC plane authenticates like the control plane (TLS, token)

    def __init__(self, guest: HostedGuest, run_id: str, listen_host: str, port: int, level: int,
                 compress: str) -> None:
        self._proc = subprocess.Popen(
            spawn.module_argv("migrate.source.bulk_server", "--memfd", str(guest.fd),
                              "--size", str(guest.spec.size), "--page-size", str(guest.spec.page_size),
                              "--run-id", run_id, "--listen", f"{listen_host}:{port}", "--level", str(level),
                              "--compress", compress),
            pass_fds=(guest.fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=spawn.child_env())
        line = read_first_line(self._proc, _BULK_START_TIMEOUT)
        reply = json.loads(line) if line else {"error": "bulk page server did not start"}
        self._stats: dict = {}
        if "port" not in reply:
            self.close()
            raise RuntimeError(reply.get("error", "bulk page server failed to start"))
        self.port = int(reply["port"])

    def stats(self) -> dict:
        """Its counters (pages, bytes, compressed_batches), known once it stopped."""
        return self._stats

    def freeze(self) -> None:
        """Nothing to change: the bulk server copies every batch before its checksum."""

    def close(self) -> None:
        """Stop it and keep its last counters (idempotent)."""
        proc = self._proc
        if proc.poll() is None:
            try:
                out, _ = proc.communicate(input="", timeout=5)
                lines = [ln for ln in out.splitlines() if ln.strip()]
                if lines:
                    self._stats = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
        if proc.stdout and not proc.stdout.closed:
            proc.stdout.close()


class NativeServer:
    """The native plane's page server: a DataServer (C threads of this agent) and a
    watcher that logs a line whenever connections without the run's key were refused."""

    def __init__(self, guest: HostedGuest, run_id: str, listen_host: str, port: int, level: int, compress: str,
                 key: bytes | None) -> None:
        self._run_id = run_id
        self._server = DataServer(guest.fd, guest.spec.size, guest.spec.page_size, listen_host, port, key=key,
                                  compress=compress, level=level)
        self.port = self._server.port
        self.key = self._server.key
        if not self._server.zstd_available:
            log.info("run %s: libzstd.so.1 not found, native page data goes uncompressed", run_id)
        self._stats: dict | None = None
        self._stop = threading.Event()
        self._rejected = 0
        self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"dp-watch-{run_id[:8]}")
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_REJECTED_EVERY):
            self._note_rejected(self._server.counters())

    def _note_rejected(self, counters: dict) -> None:
        rejected = int(counters.get("rejected", 0))
        if rejected > self._rejected:
            log.warning("run %s: refused %d data connection(s) that did not show the run's key (%d in all)",
                        self._run_id, rejected - self._rejected, rejected)
            self._rejected = rejected

    def stats(self) -> dict:
        """Its counters, live until it stops, then the last ones."""
        return self._stats if self._stats is not None else self._server.counters()

    def freeze(self) -> None:
        """The guest no longer writes its memory here: pages go out straight from its mapping."""
        self._server.freeze()

    def close(self) -> None:
        """Stop serving, keep the last counters (idempotent)."""
        if self._stats is not None:
            return
        self._stop.set()
        self._watcher.join()
        self._stats = self._server.counters()
        self._note_rejected(self._stats)
        self._server.close()


class OutgoingRun:
    """One guest leaving this agent."""

    def __init__(self, guest: HostedGuest, listen_host: str, level: int, compress: str = "auto",
                 track_writes: bool = False, run_id: str = "", plane: DataPlane = DataPlane.GRPC, port: int = 0,
                 key: bytes | None = None) -> None:
        """`run_id`, `port` (and `key` on the native plane) are given when a restarted agent
        takes a run back (the destination reconnects to the same run, port and key)."""
        self.run_id = run_id or uuid.uuid4().hex
        self.guest = guest
        self.plane = plane
        self.switched = False
        self.state_json = b""
        self.urgent_requests = 0
        self.urgent_pages = 0
        self.urgent_bytes = 0
        self._lock = threading.Lock()
        self.tracker: DirtyTracker | None = None
        self.tracking_error = ""
        # The runner arms write tracking while the page server starts (a bulk
        # server process takes ~0.1 s to start, arming 512 MiB ~35 ms).
        with ThreadPoolExecutor(1, thread_name_prefix="track") as pool:
            arming = pool.submit(self._start_tracking) if track_writes else None
            try:
                if plane is DataPlane.NATIVE:
                    self.pages: BulkProcess | NativeServer = NativeServer(guest, self.run_id, listen_host, port,
                                                                          level, compress, key)
                else:
                    self.pages = BulkProcess(guest, self.run_id, listen_host, port, level, compress)
            except BaseException:
                if arming:
                    wait([arming])
                    self._stop_tracking()
                raise
            try:
                if arming:
                    arming.result()
            except BaseException:
                self.pages.close()
                self._stop_tracking()
                raise
        if guest.process is None:  # an image: nobody writes it
            self.pages.freeze()

    def _start_tracking(self) -> None:
        """Write-protect the guest's RAM for dirty tracking, or say why it cannot be done."""
        proc = self.guest.process
        if proc is None:
            self.tracking_error = "an image guest has no runner to track"
            return
        removed = SharedBitmap.create(self.guest.spec.size // self.guest.spec.page_size)
        try:
            base = proc.track_writes(removed.fd)
            self.tracker = DirtyTracker(proc.pid, base, self.guest.spec.size, self.guest.spec.page_size, removed)
        except (RuntimeError, TrackingUnavailable) as err:
            removed.close()
            self.tracking_error = f"write tracking is unavailable: {err}"
            self._stop_tracking()

    def _stop_tracking(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.guest.process is not None:
            try:
                self.guest.process.untrack_writes()
            except (RuntimeError, TimeoutError):
                pass  # a runner that is gone tracks nothing

    def _take_dirty(self) -> pb.DirtySet:
        if self.tracker is None:
            return pb.DirtySet()
        _, ms = self.tracker.scan()
        bitmap, pages = self.tracker.take()
        return pb.DirtySet(bitmap=bitmap, pages=pages, scan_ms=ms)

    def scan_dirty(self) -> pb.DirtySet:
        """Pages written since the previous scan, the guest still running."""
        if self.tracker is None:
            raise errors.FailedPrecondition(f"run {self.run_id} does not track writes"
                                            + (f" ({self.tracking_error})" if self.tracking_error else ""))
        if self.switched:
            raise errors.FailedPrecondition(f"run {self.run_id} has switched over already")
        with self._lock:
            return self._take_dirty()

    def count_urgent(self, batch: EncodedBatch) -> None:
        with self._lock:
            self.urgent_requests += 1
            self.urgent_pages += batch.count
            self.urgent_bytes += len(batch.wire)

    def switchover(self) -> pb.SwitchoverReply:
        """Pause the guest and hand over its execution state and, with tracking,
        the pages written since the last scan (stale wherever they were sent)."""
        t0 = time.monotonic()
        proc = self.guest.process
        if proc is None:  # an image: nothing runs; a snapshot's image hands over its saved state
            state, last_op_ns = self.guest.saved_state or {}, 0
        else:
            state = proc.pause()
            last_op_ns = int(state.get("last_op_ns", 0))
        pause_ms = (time.monotonic() - t0) * 1000.0
        with self._lock:
            dirty = self._take_dirty()
        self.state_json = json.dumps(state).encode()
        self.switched = True
        self.pages.freeze()
        self.guest.state = "migrating-out"
        return pb.SwitchoverReply(state_json=self.state_json, last_op_ns=last_op_ns, pause_ms=pause_ms,
                                  dirty=dirty, sent_ns=time.time_ns())

    def abort(self) -> None:
        """Give the guest back to this host, running as before."""
        self.pages.close()
        self._stop_tracking()
        if self.guest.process is not None and self.switched:
            self.guest.process.resume()
        self.guest.state = "running" if self.guest.kind == "runner" else "image"
        self.guest.run_id = ""

    def complete(self) -> pb.SourceStats:
        self.pages.close()
        self._stop_tracking()
        served = self.pages.stats()
        return pb.SourceStats(urgent_requests=self.urgent_requests + served.get("fault_requests", 0),
                              urgent_pages=self.urgent_pages + served.get("fault_pages", 0),
                              urgent_bytes=self.urgent_bytes, bulk_pages=served.get("pages", 0),
                              bulk_bytes=served.get("bytes", 0),
                              bulk_compressed_batches=served.get("compressed_batches", 0))


class OutgoingRuns:
    """run_id -> OutgoingRun, shared by the control service and page service."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, OutgoingRun] = {}

    def add(self, run: OutgoingRun) -> None:
        with self._lock:
            self._runs[run.run_id] = run

    def get(self, run_id: str) -> OutgoingRun:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            raise errors.GuestNotFound(f"no outgoing migration {run_id!r} on this agent")
        return run

    def pop(self, run_id: str) -> OutgoingRun:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            raise errors.GuestNotFound(f"no outgoing migration {run_id!r} on this agent")
        return run

    def all(self) -> list[OutgoingRun]:
        with self._lock:
            return list(self._runs.values())


class UrgentPages(pb_grpc.PagesServicer):
    """Pages.Fetch: the urgent stream, answered raw, ahead of everything else."""

    def __init__(self, runs: OutgoingRuns) -> None:
        self._runs = runs

    def Fetch(self, request_iterator: Iterator[pb.PageRequest], context: grpc.ServicerContext) -> Iterator[bytes]:
        with spawn.urgent_thread():  # gRPC runs the whole call on one pool thread
            yield from self._answer(request_iterator, context)

    def _answer(self, request_iterator: Iterator[pb.PageRequest], context: grpc.ServicerContext) -> Iterator[bytes]:
        encoders: dict[str, BatchEncoder] = {}
        for req in request_iterator:
            try:
                run = self._runs.get(req.run_id)
            except errors.GuestNotFound as err:
                context.abort(errors.STATUS[errors.GuestNotFound], str(err))
            if not run.switched:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "pages are served only after switchover")
            pages = run.guest.page_count
            if not 0 < req.count <= MAX_URGENT_PAGES or req.first_page + req.count > pages:
                context.abort(grpc.StatusCode.OUT_OF_RANGE,
                              f"bad page range [{req.first_page}, +{req.count}) for {pages} pages")
            enc = encoders.get(req.run_id)
            if enc is None:
                enc = encoders[req.run_id] = BatchEncoder(run.guest.mem, run.guest.spec.page_size, None)
            batch = enc.encode(req.first_page, req.count, req.req_id)
            run.count_urgent(batch)
            yield batch.wire

    def Bulk(self, request_iterator: Iterator[pb.BulkRequest], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "bulk pages come from the bulk server named in PrepareOutgoingReply.bulk_endpoint")
