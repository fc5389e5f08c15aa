"""Pre-copy on the destination: pages written straight into guest RAM's memfd.

Before the guest runs here, a round pulls every page whose received bit is
clear from the source's bulk page server (Pages.Bulk, its own HTTP/2
connection) and pwrite()s it into the memfd, then sets its bit. A page in
the memfd's page cache never raises a MISSING fault in the runner's
registered mapping: pre-copied pages are simply there when post-copy
starts.

Pages the source reports as written since they were sent are *discarded*:
their bits are cleared, then they are punched out of the memfd
(fallocate PUNCH_HOLE), so the runner faults on them again and post-copy
fetches them fresh. Nothing stale stays visible.

The trap: never read destination RAM through a mapping of the memfd. A
read fault on a hole of a shared shmem mapping allocates a zero page in the
page cache, and the runner would then read that zero page instead of
faulting: post-copy silently broken. pwrite and pread do not allocate.

Rounds run in the agent's process, one Control.PrecopyRound call each, and
are strictly sequential with the source's scans (the orchestrator scans only
after a round returned), so every page read in a round is read before the
scan that follows it: a write after the read is always reported.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from migrate._native import ffi, lib
from migrate.batches import (
    MAX_REQUEST_RUNS,
    BatchDecoder,
    BatchError,
    DecodedBatch,
    bulk_request,
    unframe,
)
from migrate.bitmap import SharedBitmap, claim_runs
from migrate.dest.link import LinkLost, SourceLink
from migrate.errors import AgentUnreachable, BadRequest, os_error
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import DEFAULT_RECOVERY_TIMEOUT

#: Pages asked for and not yet written during a round (8 MiB of 4 KiB pages): keeps the link busy while
#: batches install. A request asks for at most half of it, in as many runs as the missing pages
#: make (a dirty set is scattered: one request per run would wait a round trip per few pages).
WINDOW_PAGES = 2048
REQUEST_PAGES = WINDOW_PAGES // 2


def _check_size(received: SharedBitmap, stale: bytes) -> None:
    want = (received.nbits + 63) // 64 * 8
    if len(stale) != want:
        raise BadRequest(f"a dirty bitmap of {len(stale)} bytes for {received.nbits} pages (want {want})")


def discard(memfd: int, received: SharedBitmap, stale: bytes, page_size: int) -> tuple[int, int]:
    """Mark the received pages set in `stale` (bitmap wire format) not received and punch them out.

    Returns (pages, fallocate calls). Bits are cleared before the punch: a
    set bit always means the page is present; a clear bit outside a round
    means a hole, so stale pages not received cost nothing.
    """
    if not stale:
        return 0, 0
    _check_size(received, stale)
    runs = ffi.new("uint64_t *")
    with ffi.from_buffer("uint64_t[]", stale) as bits:
        n = lib.mig_discard_pages(memfd, received.ptr, bits, received.nbits, page_size, runs)
    if n < 0:
        raise os_error(-n, "discarding stale pages (fallocate PUNCH_HOLE)")
    return int(n), int(runs[0])


def unmark(received: SharedBitmap, stale: bytes) -> bytes:
    """Clear the received bits of the pages in `stale` (bitmap wire format) without punching them out:
    a pull round that follows rewrites each in place (pwrite), so a punch would cost a fallocate per run
    of a scattered set for nothing. Returns the pages unmarked, for `punch_left` after the round.

    Plain stores: only while nothing else writes the bitmap (pre-copy, between the rounds' pulls).
    """
    if not stale:
        return b""
    _check_size(received, stale)
    have = int.from_bytes(received.to_bytes(), "little")
    lazy = int.from_bytes(stale, "little") & have
    received.load_bytes((have & ~lazy).to_bytes(len(stale), "little"))
    return lazy.to_bytes(len(stale), "little")


def punch_left(memfd: int, received: SharedBitmap, unmarked: bytes, page_size: int) -> None:
    """Punch out the unmarked pages the round did not rewrite (it was cut short or failed), as `discard`
    would have: outside a round a clear bit must mean a hole."""
    if not unmarked:
        return
    have = int.from_bytes(received.to_bytes(), "little")
    left = int.from_bytes(unmarked, "little") & ~have
    if left:
        received.load_bytes((have | left).to_bytes(len(unmarked), "little"))  # present (stale) until punched
        discard(memfd, received, left.to_bytes(len(unmarked), "little"), page_size)


@dataclass
class RoundStats:
    """What one pre-copy round did."""

    pages: int = 0
    zero: int = 0
    bytes_wire: int = 0
    seconds: float = 0.0


class Pacer:
    """Sleeps while the bytes moved run ahead of a rate (bytes/s, 0: unlimited)."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._t0 = time.monotonic()

    def wait(self, moved: int) -> None:
        if self._rate > 0:
            ahead = moved / self._rate - (time.monotonic() - self._t0)
            if ahead > 0:
                time.sleep(ahead)


class PageWindow:
    """Pages asked for and not yet answered, at most `limit`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._out = 0
        self._cond = threading.Condition()

    def acquire(self, pages: int, timeout: float) -> bool:
        """Take room for `pages` (at most the limit); False if there was none within `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._out + pages <= self._limit, timeout):
                return False
            self._out += pages
            return True

    def release(self, pages: int) -> None:
        with self._cond:
            self._out -= pages
            self._cond.notify_all()


class PrecopyPuller:
    """Pre-copy rounds into one incoming guest's memfd.

    Its link to the source's bulk server rides out outages as the
    post-copy paths' do (dest/link.py): a round whose stream breaks
    reconnects and carries on with the pages still missing, so only the
    requests in flight are asked again; past the recovery timeout the round
    fails with ConnectionError and the run is rolled back (the guest never
    left the source).
    """

    def __init__(self, memfd: int, received: SharedBitmap, page_size: int, bulk_endpoint: str,
                 run_id: str, recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT) -> None:
        self._fd = memfd
        self._received = received
        self._page_size = page_size
        self._run_id = run_id
        self._endpoint = bulk_endpoint
        self._recovery_timeout = recovery_timeout
        self._link: SourceLink | None = None
        self._decoder = BatchDecoder(received.nbits, page_size)
        self._rounds = 0  # pulls begun: a later one may find stale copies (unmark) where zero pages go
        self._stop = threading.Event()

    def _connect(self) -> SourceLink:
        if self._link is None:  # ConnectionError if the source's bulk server cannot be reached
            self._link = SourceLink(self._endpoint, "precopy", self._recovery_timeout)
        return self._link

    def pull(self, max_bandwidth: int, deadline_s: float) -> RoundStats:
        """Pull every page not received yet; stop asking after `deadline_s` seconds (0: no limit).

        Returns when every request asked is installed.
        """
        link = self._connect()
        self._rounds += 1
        stats = RoundStats()
        pacer = Pacer(max_bandwidth)
        t0 = time.monotonic()
        deadline = t0 + deadline_s if deadline_s > 0 else float("inf")
        wire0 = link.client.bytes_wire
        while True:
            window = PageWindow(WINDOW_PAGES)
            try:
                for message in link.bulk(self._requests(link, window, pacer, wire0, deadline)):
                    for batch in unframe(message):
                        decoded = self._decoder.decode(batch)
                        self._write(decoded)
                        self._received.set_range(decoded.first_page, decoded.count)
                        stats.pages += decoded.count
                        stats.zero += decoded.zero_pages
                        window.release(decoded.count)
                break
            except grpc.RpcError as err:
                if self._stop.is_set():
                    break
                try:  # then ask again for what is still missing: the unanswered requests
                    link.recover(err)
                except LinkLost as lost:
                    raise AgentUnreachable(f"pre-copy stream from the source failed: {lost}") from None
                except grpc.RpcError as fatal:
                    raise AgentUnreachable("pre-copy stream from the source failed: "
                                          f"{fatal.details() or fatal.code().name}") from None
            except BatchError as err:
                raise ValueError(f"pre-copy batch refused: {err}") from None
        stats.bytes_wire = link.client.bytes_wire - wire0
        stats.seconds = time.monotonic() - t0
        return stats

    def _requests(self, link: SourceLink, window: PageWindow, pacer: Pacer, wire0: int,
                  deadline: float) -> Iterator[pb.BulkRequest]:
        """Requests for the missing pages in page order, each up to REQUEST_PAGES in up to MAX_REQUEST_RUNS
        runs (planned natively), at most WINDOW_PAGES unanswered, paced."""
        asked = ffi.new("uint64_t[]", (self._received.nbits + 63) // 64)  # this stream's, freed with it
        page = 0
        while True:
            runs, page = claim_runs(self._received, asked, page, self._received.nbits, REQUEST_PAGES,
                                    MAX_REQUEST_RUNS)
            if not runs:
                return
            pages = sum(count for _, count in runs)
            pacer.wait(link.client.bytes_wire - wire0)
            while not window.acquire(pages, timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            yield bulk_request(self._run_id, 0, runs)

    def _write(self, batch: DecodedBatch) -> None:
        """pwrite the batch's data runs into the memfd; its zero runs stay (or, in a later round, become)
        holes: they read as zeros and take no memory (native/dp_dest.c, write_memfd, alike)."""
        size = self._page_size
        data = memoryview(batch.data)
        page = pos = 0
        runs = batch.zero_runs
        for start, length in [*zip(runs[::2], runs[1::2]), (batch.count, 0)]:
            if start > page:
                nbytes = (start - page) * size
                done = os.pwrite(self._fd, data[pos:pos + nbytes], (batch.first_page + page) * size)
                if done != nbytes:
                    raise OSError(f"short pwrite into guest RAM: {done} of {nbytes} bytes at page "
                                  f"{batch.first_page + page}")
                pos += nbytes
            if length and self._rounds > 1:
                err = lib.mig_punch_pages(self._fd, batch.first_page + start, length, size)
                if err:
                    raise os_error(-err, f"punching zero pages [{batch.first_page + start}, +{length})")
            page = start + length

    def stop(self) -> None:
        """Make a running round stop asking (it returns once its requests are answered)."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
        if self._link is not None:
            self._link.close()
            self._link = None
