"""The native data plane's destination (migrate.dest.dataplane) against the real
source (DataServer, in this process or in a child that gets killed), a real
userfaultfd (a restore-mode guest runner) and, for corruption, a small
wire-speaking fake source."""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from migrate._native import lib

from migrate import spawn
from migrate.bitmap import SharedBitmap
from migrate.dest.dataplane import NativeBulk, NativeFaultLoop, NativePrecopy
from migrate.dest.paths import Memory
from migrate.dest.precopy import discard
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guest.workloads import Workload, digest, fill_realistic
from migrate.source.dataplane import DataServer
from migrate.uffd import Region, Uffd

PAGE = mmap.PAGESIZE
MiB = 1 << 20
KEY = bytes(range(32))
WAIT_S = 120.0


def wait_for(cond: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def filled(make: Callable[[int], int], size: int, seed: int = 5) -> int:
    """A memfd of `size` bytes of realistic guest content (zero pages included)."""
    fd = make(size)
    with mmap.mmap(fd, size) as m:
        fill_realistic(m, PAGE, seed)
    return fd


def memfd_digest(fd: int, size: int) -> str:
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return digest(m)


class Restored:
    """A restore-mode guest runner on a fresh memfd and the Memory its userfaultfd fills."""

    def __init__(self, spec: GuestSpec, memfd: int) -> None:
        self.spec = spec
        self.proc = GuestProcess.launch(spec, memfd, restore=True)
        self.uffd = Uffd(self.proc.uffd)
        self.proc.uffd = None
        self.bitmap = SharedBitmap.create(spec.size // spec.page_size)
        self.mem = Memory.over(self.uffd, self.bitmap, self.proc.regions, spec.page_size)

    def close(self) -> None:
        self.proc.stop()
        self.mem.io.close()
        self.uffd.close()
        self.bitmap.close()


@pytest.fixture
def restored() -> Iterator[Callable[[GuestSpec, int], Restored]]:
    made: list[Restored] = []

    def make(spec: GuestSpec, memfd: int) -> Restored:
        made.append(Restored(spec, memfd))
        return made[-1]

    yield make
    for r in made:
        r.close()


def idle_spec(size: int) -> GuestSpec:
    return GuestSpec(size=size, workload="idle", seed=5, ops=0)


def pull_all(bulk: NativeBulk, rate: int = 0) -> dict:
    bulk.start(rate)
    wait_for(lambda: bulk.last.get("done") or bulk.failure(), "the bulk path to finish")
    bulk.stop()
    return bulk.last


# ------------------------------------------------------------------ bulk, pre-copy

def test_bulk_pull_into_a_registered_guest_gives_its_memory(memfds, restored) -> None:
    size = 32 * MiB
    src = filled(memfds, size)
    guest = restored(idle_spec(size), memfds(size))
    with DataServer(src, size, PAGE, "127.0.0.1", key=KEY) as server:
        last = pull_all(NativeBulk(guest.mem, server.endpoint, KEY, recovery_timeout=10))
        served = server.counters()
    assert "error" not in last and last["done"]
    assert guest.bitmap.is_full()
    assert last["pages"] == size // PAGE and last["duplicates"] == 0 and last["refused"] == 0
    assert 0 < last["zero"] < last["pages"] and last["bytes_pages"] == size
    assert last["bytes_wire"] == served["bytes"] and last["requests"] == served["requests"]
    assert {"batches", "link_down", "outages", "paused_s"} <= last.keys()
    assert guest.proc.digest() == memfd_digest(src, size)


@pytest.mark.parametrize("watched", [1, 0], ids=["watched", "unwatched"])
def test_the_bulk_path_signals_its_installs_while_faults_wait_for_them(memfds, restored, watched: int) -> None:
    """A gRPC fault path with faults waiting for the bulk's pages says so (watch) and polls
    installed_fd: every install signals it then, and none does while no fault waits."""
    size = 4 * MiB
    src = filled(memfds, size)
    guest = restored(idle_spec(size), memfds(size))
    with DataServer(src, size, PAGE, "127.0.0.1", key=KEY) as server:
        bulk = NativeBulk(guest.mem, server.endpoint, KEY, recovery_timeout=10)
        try:
            bulk.watch(watched)
            bulk.start(0)
            wait_for(lambda: bulk.last.get("done") or bulk.failure(), "the bulk path to finish")
            if watched:
                assert os.eventfd_read(bulk.installed_fd) > 0
            else:
                with pytest.raises(BlockingIOError):
                    os.eventfd_read(bulk.installed_fd)
        finally:
            bulk.stop()
    assert guest.bitmap.is_full()


def test_contiguous_missing_pages_go_out_in_large_requests(memfds, restored) -> None:
    """A request takes whole words of the bitmap on end: a word claimed whole (64 pages, every bit set)
    once read as "the request is full", so every request stopped at 64 pages and the next one scanned
    the bitmap again from the start (quadratic in the guest's size)."""
    size = 16 * MiB
    npages = size // PAGE
    src = filled(memfds, size)
    guest = restored(idle_spec(size), memfds(size))
    with DataServer(src, size, PAGE, "127.0.0.1", key=KEY) as server:
        last = pull_all(NativeBulk(guest.mem, server.endpoint, KEY, recovery_timeout=10))
    assert "error" not in last and guest.bitmap.is_full()
    # every request but the last asks for at least a full batch (128 pages)
    assert last["requests"] <= npages // 128 + 1, last


def test_zero_pages_do_not_fill_the_window(memfds, restored) -> None:
    """The window counts data: a guest's zero RAM costs no bytes and (lazy) no install, so while
    the pages that come back are zero the window and the requests stretch, up to 64x. A window of
    data pages per round trip held a 4 GiB guest's 3.3 GiB of zero RAM to ~1M pages/s (0.8 s)."""
    size = 64 * MiB
    npages = size // PAGE
    src = memfds(size)  # holes, but for one page in 1024
    for page in range(0, npages, 1024):
        os.pwrite(src, b"\x5a" * PAGE, page * PAGE)
    dst = memfds(size)
    guest = restored(idle_spec(size), dst)
    guest.mem.io.lazy_zero()
    with DataServer(src, size, PAGE, "127.0.0.1", key=KEY) as server:
        last = pull_all(NativeBulk(guest.mem, server.endpoint, KEY, recovery_timeout=10))
    assert "error" not in last and guest.bitmap.is_full()
    assert last["zero_lazy"] == last["zero"] == npages - npages // 1024, last
    assert last["requests"] < npages // 512, last  # data windows: requests of 512 pages at most
    assert os.fstat(dst).st_blocks * 512 <= npages // 1024 * PAGE  # the zero pages stayed holes
    for r in guest.proc.regions:  # as a run's finish does: the holes read as zeros from now on
        guest.uffd.unregister(r.base, r.size)
    assert guest.proc.digest() == memfd_digest(src, size)


def test_while_the_guest_faults_the_bulk_asks_in_small_requests(memfds, restored) -> None:
    """Within 20 ms of a fault (a jump) the bulk window is 1 MiB, its requests half that (128 pages): a fault
    on a page in flight waits behind what was asked before it. Jumps come every ms here, so nearly every
    request is small (the bound leaves room for a jumping thread the machine starves now and then)."""
    size = 16 * MiB
    npages = size // PAGE
    src = filled(memfds, size)
    guest = restored(idle_spec(size), memfds(size))
    with DataServer(src, size, PAGE, "127.0.0.1", key=KEY) as server:
        bulk = NativeBulk(guest.mem, server.endpoint, KEY, recovery_timeout=10)
        bulk.jump(0)
        done = threading.Event()

        def faulting() -> None:
            while not done.wait(0.001):
                bulk.jump(0)

        jumper = threading.Thread(target=faulting)
        jumper.start()
        try:
            last = pull_all(bulk)
        finally:
            done.set()
            jumper.join()
    assert "error" not in last and guest.bitmap.is_full()
    assert last["requests"] >= npages // 200, last  # 8 MiB windows: requests of ~350 pages; 1 MiB: <= 128


def test_precopy_rounds_write_the_memfd_and_fetch_discarded_pages_again(memfds) -> None:
    size = 16 * MiB
    npages = size // PAGE
    src, dst = filled(memfds, size), memfds(size)
    received = SharedBitmap.create(npages)
    try:
        with DataServer(src, size, PAGE, "127.0.0.1", key=KEY) as server:
            puller = NativePrecopy(dst, received, PAGE, server.endpoint, KEY)
            try:
                first = puller.pull(0, 0)
                assert received.is_full() and first.pages == npages and 0 < first.zero < npages
                assert first.bytes_wire > 0
                # the source writes some pages: the destination discards them, the next round fetches them
                with mmap.mmap(src, size) as m:
                    for page in range(3, npages, 97):
                        m[page * PAGE:page * PAGE + 8] = b"rewritten"[:8]
                stale = bytearray((npages + 63) // 64 * 8)
                for page in range(3, npages, 97):
                    stale[page // 8] |= 1 << (page % 8)
                discarded, _ = discard(dst, received, bytes(stale), PAGE)
                again = puller.pull(0, 0)
                assert again.pages == discarded == len(range(3, npages, 97))
            finally:
                puller.close()
        assert received.is_full()
        assert memfd_digest(dst, size) == memfd_digest(src, size)
    finally:
        received.close()


def test_a_scattered_set_is_pulled_exactly(memfds) -> None:
    """A random fifth of the pages, discarded after a first round (a third of them zeroed meanwhile), come
    back in one-page runs packed many to a request and to a batch (zero runs spanning the batch's runs):
    the right pages, each counted once on both sides."""
    size = 16 * MiB
    npages = size // PAGE
    src, dst = filled(memfds, size), memfds(size)
    received = SharedBitmap.create(npages)
    scattered = sorted(random.Random(9).sample(range(npages), npages // 5))
    try:
        with DataServer(src, size, PAGE, "127.0.0.1", key=KEY, compress="never") as server:
            puller = NativePrecopy(dst, received, PAGE, server.endpoint, KEY)
            try:
                puller.pull(0, 0)
                with mmap.mmap(src, size) as m:
                    for k, page in enumerate(scattered):
                        tag = bytes(8) if k % 3 == 0 else page.to_bytes(8, "little")
                        m[page * PAGE:(page + 1) * PAGE] = tag * (PAGE // 8)
                stale = bytearray((npages + 63) // 64 * 8)
                for page in scattered:
                    stale[page // 8] |= 1 << (page % 8)
                before, first = server.counters(), puller._path.counters()
                assert discard(dst, received, bytes(stale), PAGE)[0] == len(scattered)
                again = puller.pull(0, 0)
                served = server.counters()
                last = puller._path.counters()
            finally:
                puller.close()
        assert again.pages == served["pages"] - before["pages"] == len(scattered)
        assert again.bytes_wire == served["bytes"] - before["bytes"]
        assert last["bytes_wire"] == served["bytes"] and last["requests"] == served["requests"]
        assert last["duplicates"] == 0 and last["refused"] == 0 and received.is_full()
        assert len(scattered) / (last["batches"] - first["batches"]) > 32  # many runs to a batch, not one
        assert last["zero"] - first["zero"] == served["zero_pages"] - before["zero_pages"] >= len(scattered) // 3
        assert memfd_digest(dst, size) == memfd_digest(src, size)
    finally:
        received.close()


def test_a_scattered_set_lands_exactly_in_a_registered_guest(memfds, restored) -> None:
    """After the switch: a random fifth of a guest's pages missing (a third of them zero at the source),
    pulled in batches of many one- and two-page runs (zero runs spanning them), each installed piece by
    piece into the userfaultfd: every missing page lands with its bytes, nothing else is touched."""
    size = 16 * MiB
    npages = size // PAGE
    src = filled(memfds, size)
    scattered = sorted(random.Random(11).sample(range(npages), npages // 5))
    with mmap.mmap(src, size) as m:
        for page in scattered[::3]:
            m[page * PAGE:(page + 1) * PAGE] = bytes(PAGE)
    dst = memfds(size)
    guest = restored(idle_spec(size), dst)
    bits = bytearray(b"\xff" * (npages // 8))
    for page in scattered:
        bits[page // 8] &= ~(1 << (page % 8))
    guest.bitmap.load_bytes(bits)
    with DataServer(src, size, PAGE, "127.0.0.1", key=KEY, compress="never") as server:
        server.freeze()
        last = pull_all(NativeBulk(guest.mem, server.endpoint, KEY, recovery_timeout=10))
    assert "error" not in last and last["done"] and guest.bitmap.is_full()
    assert last["pages"] == len(scattered) and last["duplicates"] == 0 and last["refused"] == 0
    assert last["zero"] >= len(scattered) // 3 and len(scattered) / last["batches"] > 32
    missing = set(scattered)
    with mmap.mmap(src, size, mmap.MAP_SHARED, mmap.PROT_READ) as want, \
            mmap.mmap(dst, size, mmap.MAP_SHARED, mmap.PROT_READ) as got:
        for page in range(npages):  # the guest's memfd, outside the userfaultfd: holes read as zeros
            at = slice(page * PAGE, (page + 1) * PAGE)
            assert got[at] == (want[at] if page in missing else bytes(PAGE)), page


def test_frames_of_one_page_runs_across_two_regions_wake_every_waiter_and_install_each_page_once(memfds) -> None:
    """A frame's pieces (a scattered set's one- and two-page runs) go in under one hold of the space's lock,
    each in its own region: here guest pages [0, n) and [n, 2n) are two mappings (the second below the
    first or not, as mmap places them), and frames run across the boundary. Threads reading the guest's
    memory meanwhile (in this process) block on the missing pages, between the runs of every frame, and
    are all woken by their installs; no page is installed twice and every page lands in its place."""
    n = 1024  # pages a region
    size = 2 * n * PAGE
    npages = 2 * n
    src, dst = filled(memfds, size), memfds(size)
    missing = set(random.Random(13).sample(range(npages), npages // 5)) | set(range(n - 3, n + 3))
    with mmap.mmap(src, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        content = bytes(m)
    bits = bytearray(npages // 8)
    for page in set(range(npages)) - missing:  # in the guest already: in its memfd, never faulted on
        os.pwrite(dst, content[page * PAGE:(page + 1) * PAGE], page * PAGE)
        bits[page // 8] |= 1 << (page % 8)
    halves = [mmap.mmap(dst, n * PAGE, mmap.MAP_SHARED, offset=k * n * PAGE) for k in range(2)]
    uffd = Uffd.create()
    bitmap = SharedBitmap.create(npages)
    readers: list[Workload] = []
    mem = None
    try:
        bitmap.load_bytes(bits)
        regions = []
        for k, half in enumerate(halves):
            base = ctypes.addressof(ctypes.c_char.from_buffer(half))
            uffd.register(base, n * PAGE)
            regions.append(Region(base, n * PAGE, offset=k * n * PAGE))
        mem = Memory.over(uffd, bitmap, regions, PAGE)
        readers = [Workload(half, workload="seq-read", seed=1, ops=2 * n, page_size=PAGE) for half in halves]
        for reader in readers:
            reader.start()
        with DataServer(src, size, PAGE, "127.0.0.1", key=KEY, compress="never") as server:
            server.freeze()
            bulk = NativeBulk(mem, server.endpoint, KEY, recovery_timeout=10)
            assert not any(reader.finished for reader in readers)  # each half has missing pages to wait on
            last = pull_all(bulk)
        assert all(reader.wait_finished(WAIT_S) for reader in readers), "a reader was never woken"
    finally:
        if mem is not None:
            mem.io.close()
        uffd.close()  # wakes any reader still waiting (it then reads what is there)
        for reader in readers:
            reader.close()
        bitmap.close()
        for half in halves:
            half.close()
    assert "error" not in last and last["done"]
    assert last["pages"] == len(missing) and last["duplicates"] == 0 and last["refused"] == 0
    assert len(missing) / last["batches"] > 32  # many runs to a frame
    assert memfd_digest(dst, size) == digest(content)


def test_a_wrong_key_cannot_connect(memfds) -> None:
    size = 1 * MiB
    src, dst = filled(memfds, size), memfds(size)
    received = SharedBitmap.create(size // PAGE)
    try:
        with DataServer(src, size, PAGE, "127.0.0.1", key=KEY) as server:
            with pytest.raises(ConnectionError, match=f"{server.endpoint}.*closed the connection"):
                NativePrecopy(dst, received, PAGE, server.endpoint, bytes(32))
            assert server.counters()["rejected"] >= 1
    finally:
        received.close()


# ------------------------------------------------------------------ a corrupt frame

HELLO = struct.Struct("<8sII32s")
REPLY = struct.Struct("<8sIIQ")
REQUEST = struct.Struct("<IIQ")
RUN = struct.Struct("<QII")
BATCH = struct.Struct("<IIQIIIIIIQ")
KIND_BULK = 1  # dp_wire.h's DP_KIND_BULK: a hello's kind


class WireSource:
    """A wire-speaking source that answers a request as the real one does (its runs in order, up to 128
    pages a batch, many runs to a batch). With `corrupt` it flips one byte of its corrupt-th batch after
    computing the checksum: of the data, or of the page runs (`part`); that batch must be refused and
    asked again. With `hold_bulk` it answers bulk connections' requests only once that event is set:
    the bulk's window stays in flight while the fault path is answered at once.
    bulk_requests: the pages of each bulk request, as read."""

    def __init__(self, content: bytes, corrupt: int = 0, part: str = "data",
                 hold_bulk: threading.Event | None = None) -> None:
        self._content = content
        self._nth = corrupt
        self._part = part
        self._hold = hold_bulk
        self.batches = 0
        self.multi_run_batches = 0
        self.bulk_requests: list[int] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self._listener.accept()
                self._conns.append(conn)
                threading.Thread(target=self._conn, args=(conn,), daemon=True).start()
        except OSError:
            return  # closed

    def _read(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = conn.recv(n - len(buf))
            if not got:
                raise ConnectionError
            buf += got
        return buf

    def _conn(self, conn: socket.socket) -> None:
        try:
            magic, _, kind, _ = HELLO.unpack(self._read(conn, HELLO.size))
            conn.sendall(REPLY.pack(magic, 0, PAGE, len(self._content) // PAGE))
            bulk = kind == KIND_BULK
            requests = self._requests(conn, bulk)
            for req_id, runs in self._held(requests) if bulk and self._hold else requests:
                pieces: list[tuple[int, int]] = []  # the next batch's runs
                for first, count in runs:
                    while count:
                        n = min(count, 128 - sum(c for _, c in pieces))
                        pieces.append((first, n))
                        first, count = first + n, count - n
                        if sum(c for _, c in pieces) == 128:
                            conn.sendall(self._batch(req_id, pieces))
                            pieces = []
                if pieces:
                    conn.sendall(self._batch(req_id, pieces))
        except (ConnectionError, OSError):
            pass
        conn.close()

    def _requests(self, conn: socket.socket, bulk: bool) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """(request id, its runs (first, count)) as they come."""
        while True:
            _, nruns, req_id = REQUEST.unpack(self._read(conn, REQUEST.size))
            runs = [RUN.unpack(self._read(conn, RUN.size))[:2] for _ in range(nruns)]
            if bulk:
                self.bulk_requests.append(sum(count for _, count in runs))
            yield req_id, runs

    def _held(self, requests: Iterator[tuple[int, list[tuple[int, int]]]]) -> Iterator[tuple[int, list]]:
        """`requests`, read on at once, given out once the hold is let go."""
        read: queue.SimpleQueue = queue.SimpleQueue()

        def reader() -> None:
            try:
                for req in requests:
                    read.put(req)
            except (ConnectionError, OSError):
                pass
            read.put(None)

        threading.Thread(target=reader, daemon=True).start()
        self._hold.wait()
        while (req := read.get()) is not None:
            yield req

    def _batch(self, req_id: int, pieces: list[tuple[int, int]]) -> bytes:
        runs = bytearray(b"".join(RUN.pack(first, n, 0) for first, n in pieces))
        data = bytearray(b"".join(self._content[first * PAGE:(first + n) * PAGE] for first, n in pieces))
        covered = bytes(runs + data)  # the checksum's order: page runs, raw data, zero runs (none here)
        checksum = lib.mig_digest(covered, len(covered))
        self.batches += 1
        self.multi_run_batches += len(pieces) > 1
        if self.batches == self._nth:
            (data if self._part == "data" else runs)[100 if self._part == "data" else 0] ^= 0x01
        return BATCH.pack(0x48435442, 0, req_id, len(pieces), 0, len(data) // PAGE, 0, len(data), len(data),
                          checksum) + bytes(runs) + bytes(data)

    def close(self) -> None:
        self._listener.close()
        for c in self._conns:
            c.close()
        self._thread.join(5)


def pull_from(source: WireSource, dst: int, received: SharedBitmap) -> tuple[object, dict]:
    """One pre-copy pull into dst from the fake source: (its RoundStats, the path's counters)."""
    try:
        puller = NativePrecopy(dst, received, PAGE, source.endpoint, KEY)
        try:
            return puller.pull(0, 0), puller._path.counters()
        finally:
            puller.close()
    finally:
        source.close()
        received.close()


def test_a_corrupt_batch_is_refused_and_asked_again(memfds) -> None:
    size = 4 * MiB
    src, dst = filled(memfds, size), memfds(size)
    with mmap.mmap(src, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        content = bytes(m)
    got, counters = pull_from(WireSource(content, corrupt=3), dst, SharedBitmap.create(size // PAGE))
    assert counters["refused"] == 1 and counters["outages"] == 0
    assert got.pages == size // PAGE
    assert memfd_digest(dst, size) == digest(content)


@pytest.mark.parametrize("part", ["data", "runs"])
def test_a_corrupt_multi_run_batch_is_refused_and_its_pages_land_right_when_asked_again(memfds, part: str) -> None:
    """A scattered set travels many runs to a batch: a batch whose data or page runs were damaged on the
    way is refused whole (the checksum covers the runs), and every page ends where it belongs."""
    size = 4 * MiB
    npages = size // PAGE
    src, dst = filled(memfds, size), memfds(size)
    with mmap.mmap(src, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        content = bytes(m)
    have = random.Random(2).sample(range(npages), npages * 3 // 4)  # the rest is a scattered set to pull
    bits = bytearray(npages // 8)
    for page in have:
        os.pwrite(dst, content[page * PAGE:(page + 1) * PAGE], page * PAGE)
        bits[page // 8] |= 1 << (page % 8)
    received = SharedBitmap.create(npages)
    received.load_bytes(bits)
    source = WireSource(content, corrupt=2, part=part)
    got, counters = pull_from(source, dst, received)
    assert counters["refused"] == 1 and source.multi_run_batches > 1
    assert got.pages == npages - len(have)
    assert memfd_digest(dst, size) == digest(content)


# ------------------------------------------------------------------ link loss

SOURCE_SCRIPT = """
import sys, time
from migrate.source.dataplane import DataServer
memfd, size, port, key = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
with DataServer(memfd, size, {page}, "127.0.0.1", port, key=key, compress="never") as s:
    print(s.port, flush=True)
    time.sleep(3600)
"""


class SourceProcess:
    """A DataServer in a child process, to be killed (SIGKILL) mid-stream and started again on its port."""

    def __init__(self, memfd: int, size: int, port: int = 0) -> None:
        argv = [sys.executable, "-P", "-c", SOURCE_SCRIPT.format(page=PAGE), str(memfd), str(size), str(port),
                KEY.hex()]
        self.proc = subprocess.Popen(argv, pass_fds=(memfd,), stdout=subprocess.PIPE, env=spawn.child_env(),
                                     cwd=os.getcwd())
        self.port = int(self.proc.stdout.readline())
        self.endpoint = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()


def bulk_from_a_child(memfds, restored, size: int, recovery_timeout: float) -> tuple[int, Restored, SourceProcess,
                                                                                     NativeBulk]:
    """(source memfd, restored guest, source process, bulk path from it into the guest)."""
    src = filled(memfds, size)
    guest = restored(idle_spec(size), memfds(size))
    source = SourceProcess(src, size)
    return src, guest, source, NativeBulk(guest.mem, source.endpoint, KEY, recovery_timeout)


def test_a_source_killed_mid_stream_and_restarted_is_resumed_from(memfds, restored) -> None:
    size = 64 * MiB
    src, guest, source, bulk = bulk_from_a_child(memfds, restored, size, recovery_timeout=60)
    try:
        bulk.start(64 * MiB)  # ~1 s: killed well before the end
        wait_for(lambda: bulk.last["pages"] > 2000, "pages to arrive")
        source.kill()
        wait_for(lambda: bulk.last["link_down"], "the loss to be noticed")
        source = SourceProcess(src, size, source.port)
        wait_for(lambda: bulk.last.get("done") or bulk.failure(), "the bulk path to finish")
    finally:
        bulk.stop()
        source.kill()
    last = bulk.last
    assert "error" not in last and last["done"]
    assert last["outages"] == 1 and not last["link_down"] and last["paused_s"] > 0
    assert guest.proc.digest() == memfd_digest(src, size)


def test_a_source_gone_past_the_recovery_timeout_fails_the_path(memfds, restored) -> None:
    _, guest, source, bulk = bulk_from_a_child(memfds, restored, 32 * MiB, recovery_timeout=1.0)
    try:
        bulk.start(16 * MiB)
        wait_for(lambda: bulk.last["pages"] > 0, "pages to arrive")
        source.kill()
        wait_for(bulk.failure, "the path to give up")
    finally:
        bulk.stop()
        source.kill()
    assert bulk.failure().startswith(f"lost the source at {source.endpoint}: ")
    assert bulk.last["error"] == bulk.failure() and not guest.bitmap.is_full()


# ------------------------------------------------------------------ faults

@contextlib.contextmanager
def paused(memfds, spec: GuestSpec) -> Iterator[tuple[int, dict]]:
    """A source runner of `spec` paused once it made progress: its memfd and its state (the runner stopped after)."""
    src_fd = memfds(spec.size)
    src = GuestProcess.launch(spec, src_fd)
    try:
        wait_for(lambda: src.progress and src.progress[-1][1] > 0, "source progress")
        yield src_fd, src.pause()
    finally:
        src.stop()


@contextlib.contextmanager
def moved(memfds, restored, spec: GuestSpec) -> Iterator[tuple[dict, Restored, DataServer]]:
    """paused(): its state, a restored guest to resume with it, and a DataServer of the source's memory."""
    with paused(memfds, spec) as (src_fd, state):
        guest = restored(spec, memfds(spec.size))
        with DataServer(src_fd, spec.size, PAGE, "127.0.0.1", key=KEY) as server:
            yield state, guest, server


@pytest.mark.parametrize("workload", ["hotset", "balloon"])
@pytest.mark.parametrize("push", [True, False], ids=["bulk+faults", "faults-only"])
def test_a_faulting_guest_over_the_native_fault_path(memfds, restored, reference_digest, push: bool,
                                                     workload: str) -> None:
    """balloon: the guest discards (MADV_REMOVE) ranges while its pages arrive, so
    REMOVE events race the fault path's and the bulk path's installs."""
    spec = GuestSpec(size=32 * MiB, workload=workload, seed=13, ops=200_000, threads=2, ops_per_sec=200_000)
    with moved(memfds, restored, spec) as (state, guest, server):
        bulk = NativeBulk(guest.mem, server.endpoint, KEY, recovery_timeout=10) if push else None
        faults = NativeFaultLoop(guest.mem, server.endpoint, KEY, bulk, recovery_timeout=10)
        try:
            guest.proc.resume(state)
            if bulk is not None:
                bulk.start(32 * MiB)  # slow enough for the guest to fault ahead of it
            assert guest.proc.wait_finished(300)
            d = guest.proc.digest(timeout=300)  # faults in every page still missing
        finally:
            faults.stop()
            if bulk is not None:
                bulk.stop()
    f = faults.last
    assert "error" not in f and f["faults"] > 0 and f["pages"] > 0
    assert f["latency_us"]["count"] > 0 and f["latency_us"]["p50"] > 0 and f["blocked_ms"] > 0
    assert d == reference_digest(spec)
    if workload == "balloon":
        assert f["events"]["remove"] > 0 and f["events"]["removed_pages"] > 0
    if bulk is not None and workload == "hotset":
        # (balloon's discards make duplicates of their own: a page it discards while the bulk has it in
        # flight arrives after the discard marked it; ~1-5 % of the pages under load, 100k pages discarded)
        b = bulk.last
        wire_pages = b["pages"] + b["duplicates"] + f["pages"] + f["duplicates"]
        assert b["duplicates"] + f["duplicates"] < 0.01 * wire_pages, (b, f)


def test_a_fault_deep_in_the_bulks_window_asks_its_page_at_once(memfds, restored, reference_digest) -> None:
    """The bulk holds the guest's upper half in flight (a source that answers its fault path only, until
    let go): a random fault there, far behind the window's head, is asked by the fault path at once
    (asked_in_flight) and the guest runs to its end while the window is still in flight."""
    spec = GuestSpec(size=16 * MiB, workload="random-read", seed=13, ops=100_000, threads=1, ops_per_sec=100_000)
    npages = spec.size // PAGE
    let_go = threading.Event()
    with paused(memfds, spec) as (src_fd, state):
        with mmap.mmap(src_fd, spec.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            source = WireSource(bytes(m), hold_bulk=let_go)
        guest = restored(spec, memfds(spec.size))
        bulk = faults = None
        try:
            bulk = NativeBulk(guest.mem, source.endpoint, KEY, recovery_timeout=10)
            faults = NativeFaultLoop(guest.mem, source.endpoint, KEY, bulk, recovery_timeout=10)
            bulk.jump(npages // 2)
            bulk.start(0)
            wait_for(lambda: sum(source.bulk_requests) >= npages // 2, "the bulk's whole window (8 MiB) in flight")
            guest.proc.resume(state)
            assert guest.proc.wait_finished(300)
            before = faults.last  # the window still in flight
            let_go.set()
            d = guest.proc.digest(timeout=300)
            wait_for(lambda: bulk.last.get("done") or bulk.failure(), "the bulk path to finish")
        finally:
            let_go.set()
            for path in (faults, bulk):
                if path is not None:
                    path.stop()
            source.close()
    assert "error" not in faults.last and "error" not in bulk.last
    assert before["asked_in_flight"] > 0, before
    assert before["pages"] >= before["asked_in_flight"], before
    assert d == reference_digest(spec)



# ------------------------------------------------------------------ priorities

def thread_policies() -> dict[str, set[tuple[int, int]]]:
    """This process's threads by name: the (scheduling policy, niceness) of each."""
    out: dict[str, set[tuple[int, int]]] = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            out.setdefault(name, set()).add((os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)))
        except OSError:
            continue  # ended meanwhile
    return out


def test_bulk_threads_yield_to_the_fault_threads_at_the_agents_niceness(memfds, restored) -> None:
    """Both ends' bulk threads run SCHED_BATCH at the niceness of the thread that started them: niced, the
    guests on either side (a drain's next ones, the ones moved) starved a drain's bulk; the fault threads
    run SCHED_FIFO, or niced below the bulk where that is refused."""
    size = 16 * MiB
    src = filled(memfds, size)
    guest = restored(idle_spec(size), memfds(size))
    agents = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    bulk_names = {"dps-bulk", "dpd-request", "dpd-receive", "dpd-install"}
    with DataServer(src, size, PAGE, "127.0.0.1", key=KEY) as server:
        bulk = NativeBulk(guest.mem, server.endpoint, KEY, recovery_timeout=10)
        faults = NativeFaultLoop(guest.mem, server.endpoint, KEY, bulk, recovery_timeout=10)
        try:
            bulk.start(MiB)  # paced: its threads live for the test's look at them
            wait_for(lambda: bulk_names | {"dps-fault", "dpd-fault"} <= thread_policies().keys(), "every thread")
            threads = thread_policies()
        finally:
            faults.stop()
            bulk.stop()
    for name in bulk_names:
        assert threads[name] == {(os.SCHED_BATCH, agents)}, (name, threads[name])
    for name in ("dps-fault", "dpd-fault"):
        assert all(policy == os.SCHED_FIFO or nice < agents for policy, nice in threads[name]), (name, threads[name])
