"""migrate.uffd against the real kernel: faults, installs, EEXIST/EAGAIN, errors.

Faulting memory lives in a forked child (a "guest") that maps it, creates the
userfaultfd, registers the mapping and sends the fd over a unix socket, the
way the guest runner does: uffd registrations are per mm and not inherited by
fork, and the ioctls act on the creator's mm from whichever process holds the
fd. The parent (the "agent") resolves the child's faults. Threads that must
fault concurrently touch memory through ctypes.memmove, which releases the
GIL, so several of them can block on one page at once.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import pickle
import random
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from migrate._native import ffi

from migrate import pages
from migrate import uffd as U
from migrate.bitmap import SharedBitmap
from migrate.uffd.pagemap import UNSUPPORTED

P = U.PAGE_SIZE
TIMEOUT_S = 10.0


def content(page: int) -> bytes:
    """The test content of global page `page`: distinct for every page."""
    return random.Random(page).randbytes(P)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def address_of(buf: mmap.mmap) -> int:
    with ffi.from_buffer(buf) as p:
        return int(ffi.cast("uintptr_t", p))


# ---- the guest child ----

class GuestContext:
    """What a command running in the child sees."""

    def __init__(self, mems: list[mmap.mmap], layout: list[tuple[int, int]], page_size: int) -> None:
        self.mems = mems
        self.layout = layout  # (first_page, npages) per region
        self.page_size = page_size
        self.bases = [address_of(m) for m in mems]

    def locate(self, page: int) -> tuple[int, int]:
        """(region index, byte offset) of a global page."""
        for i, (first, n) in enumerate(self.layout):
            if first <= page < first + n:
                return i, (page - first) * self.page_size
        raise IndexError(page)


def child_read_pages(ctx: GuestContext, page_list: list[int]) -> list[str]:
    """Read pages one after the other from one thread; their digests."""
    out = []
    for page in page_list:
        i, off = ctx.locate(page)
        out.append(digest(ctx.mems[i][off:off + ctx.page_size]))
    return out


def child_touch_concurrently(ctx: GuestContext, page_list: list[int]) -> list[str]:
    """One thread per entry copies its page GIL-free; the digests in entry order."""
    bufs = [ctypes.create_string_buffer(P) for _ in page_list]
    threads = []
    for buf, page in zip(bufs, page_list):
        i, off = ctx.locate(page)
        threads.append(threading.Thread(target=ctypes.memmove, args=(buf, ctx.bases[i] + off, P)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [digest(b.raw) for b in bufs]


def child_dontneed(ctx: GuestContext, region: int) -> None:
    ctx.mems[region].madvise(mmap.MADV_DONTNEED)


MEMFD_FLAGS = {"shmem": os.MFD_CLOEXEC, "hugetlb": os.MFD_CLOEXEC | os.MFD_HUGETLB}
KIND_FEATURES = {"anon": 0, "shmem": U.FEATURE_MISSING_SHMEM, "hugetlb": U.FEATURE_MISSING_HUGETLBFS}


def child_main(sock: socket.socket, kind: str, sizes: tuple[int, ...], features: int, page_size: int) -> None:
    mems, layout, first = [], [], 0
    for n in sizes:
        if kind in MEMFD_FLAGS:
            fd = os.memfd_create("guest", MEMFD_FLAGS[kind])
            os.ftruncate(fd, n * page_size)
            mems.append(mmap.mmap(fd, n * page_size, mmap.MAP_SHARED))
            os.close(fd)
        else:
            mems.append(mmap.mmap(-1, n * page_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        layout.append((first, n))
        first += n
    ctx = GuestContext(mems, layout, page_size)
    uffd = U.Uffd.create(features=features | KIND_FEATURES[kind])
    for base, (_, n) in zip(ctx.bases, layout):
        uffd.register(base, n * page_size, U.MODE_MISSING)
    socket.send_fds(sock, [json.dumps(ctx.bases).encode()], [uffd.fd])
    uffd.close()
    while msg := sock.recv(1 << 16):
        fn, args = pickle.loads(msg)
        try:
            reply = ("ok", fn(ctx, *args))
        except Exception as err:  # reported to the parent, which fails the test
            reply = ("err", repr(err))
        sock.send(pickle.dumps(reply))


class Guest:
    """A child process whose memory (regions of `sizes` pages) faults to us."""

    def __init__(self, kind: str = "anon", sizes: tuple[int, ...] = (8,), features: int = 0,
                 page_size: int = P) -> None:
        self.page_size = page_size
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                self.sock.close()
                child_main(theirs, kind, sizes, features, page_size)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.sock.settimeout(TIMEOUT_S)
        try:
            msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        except BaseException:
            self.exit()
            self.sock.close()
            raise
        self.uffd = U.Uffd(fds[0], page_size=page_size)
        bases = json.loads(msg)
        self.regions, first = [], 0
        for base, n in zip(bases, sizes):
            self.regions.append(U.Region(base, n * page_size, first * page_size, page_size))
            first += n
        self.npages = first

    def addr(self, page: int) -> int:
        for r in self.regions:
            if r.first_page <= page < r.first_page + r.pages:
                return r.base + (page - r.first_page) * self.page_size
        raise IndexError(page)

    def start(self, fn: Callable, *args: object) -> None:
        self.sock.send(pickle.dumps((fn, args)))

    def result(self) -> object:
        status, value = pickle.loads(self.sock.recv(1 << 20))
        assert status == "ok", value
        return value

    def call(self, fn: Callable, *args: object) -> object:
        self.start(fn, *args)
        return self.result()

    def done(self) -> bool:
        """Has the running command replied (without consuming the reply)?"""
        return bool(select.select([self.sock], [], [], 0)[0])

    def wait_blocked(self, nthreads: int) -> None:
        """Wait until nthreads of the child's threads sleep in a userfault."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            blocked = 0
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                try:
                    with open(f"/proc/{self.pid}/task/{tid}/wchan") as f:
                        blocked += f.read() == "handle_userfault"
                except FileNotFoundError:
                    pass
            if blocked >= nthreads:
                return
            time.sleep(0.002)
        raise TimeoutError(f"{nthreads} threads never blocked in handle_userfault")

    def exit(self) -> None:
        """End the child and reap it (its mm goes away)."""
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0

    def close(self) -> None:
        self.exit()
        self.sock.close()
        self.uffd.close()


@pytest.fixture
def guest_factory() -> Iterator[Callable[..., Guest]]:
    guests: list[Guest] = []

    def make(*args: object, **kwargs: object) -> Guest:
        guests.append(Guest(*args, **kwargs))
        return guests[-1]

    yield make
    for g in guests:
        g.close()


def wait_readable(fd: int) -> None:
    """Wait until a message is queued on the uffd, without reading it."""
    r, _, _ = select.select([fd], [], [], TIMEOUT_S)
    assert r, "no userfault message arrived"


# ---- features, open, errors ----

def test_probe_reports_the_kernel_features_we_rely_on() -> None:
    features = U.probe_features()
    # Bits defined in native/uffd.h for newer kernels than the headers: a wrong
    # value there would not be reported by this 6.x kernel.
    for f in (U.FEATURE_MISSING_SHMEM, U.FEATURE_WP_UNPOPULATED, U.FEATURE_WP_ASYNC, U.FEATURE_MOVE):
        assert features & f, U.feature_names(f)
    assert not features & (1 << 40)


def test_create_refuses_missing_features_and_names_them() -> None:
    with pytest.raises(OSError) as err:
        U.Uffd.create(features=U.FEATURE_MISSING_SHMEM | (1 << 40))
    assert err.value.errno == errno.EOPNOTSUPP
    assert "0x10000000000" in str(err.value) and "MISSING_SHMEM" not in str(err.value)


def test_create_enables_requested_features() -> None:
    with U.Uffd.create(features=U.FEATURE_MISSING_SHMEM | U.FEATURE_WP_ASYNC) as u:
        assert u.features & U.FEATURE_MISSING_SHMEM
        # The kernel adds WP_UNPOPULATED whenever WP_ASYNC is asked for.
        assert u.features & U.FEATURE_WP_UNPOPULATED
    assert u.fd == -1


def test_errors_carry_errno_and_name_the_operation() -> None:
    mem = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address_of(mem)
    with U.Uffd.create() as u:
        with pytest.raises(OSError) as err:
            u.register(base + 1, P)
        assert err.value.errno == errno.EINVAL
        assert f"UFFDIO_REGISTER start=0x{base + 1:x} len={P}" in str(err.value)
        with pytest.raises(OSError) as err:
            u.copy(base + 8, b"x" * P)
        assert err.value.errno == errno.EINVAL and "UFFDIO_COPY" in str(err.value)
    mem.close()


# ---- copy / zeropage / wake ----

@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_faults_resolved_by_copy_zeropage_and_wake(guest_factory, kind: str) -> None:
    g = guest_factory(kind, (8,))
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    wanted = [0, 5, 2, 7]
    g.start(child_read_pages, wanted)
    served = []
    while len(served) < len(wanted):
        faults = reader.read(bm, int(TIMEOUT_S * 1000))
        assert faults, "the guest's fault never arrived"
        for page, waiters, t_ns in faults:
            assert waiters == 1 and t_ns <= time.monotonic_ns()
            served.append(page)
            addr = g.addr(page)
            if page % 2:
                assert g.uffd.zeropage(addr, P) == P
            elif page == 2:
                # Installed without waking: only the explicit wake lets the guest go on.
                assert g.uffd.copy(addr, content(page), U.COPY_MODE_DONTWAKE) == P
                g.uffd.wake(addr, P)
            else:
                assert g.uffd.copy(addr, content(page)) == P
    assert served == wanted  # one thread: one fault at a time, in order
    expected = [digest(bytes(P) if p % 2 else content(p)) for p in wanted]
    assert g.result() == expected
    assert reader.stats == U.FaultStats(msgs=4, woken=0, other_events=0)
    bm.close()


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_copy_skips_pages_already_present(guest_factory, kind: str) -> None:
    g = guest_factory(kind, (8,))
    assert g.uffd.copy(g.addr(2), content(102)) == P
    # Page 2 is present: the kernel stops there (-EAGAIN after page 1, then
    # -EEXIST); the copy goes on past it and reports only the new bytes.
    new = b"".join(content(p) for p in range(4))
    assert g.uffd.copy(g.addr(0), new) == 3 * P
    assert g.uffd.zeropage(g.addr(0), 6 * P) == 2 * P
    got = g.call(child_read_pages, list(range(6)))
    assert got == [digest(c) for c in (content(0), content(1), content(102), content(3), bytes(P), bytes(P))]


def test_copy_into_a_gone_guest_raises_esrch(guest_factory) -> None:
    g = guest_factory("anon", (4,))
    g.exit()
    with pytest.raises(ProcessLookupError) as err:
        g.uffd.copy(g.addr(0), content(0))
    assert err.value.errno == errno.ESRCH and "UFFDIO_COPY" in str(err.value)


def test_eagain_while_the_mm_changes_is_retried_then_reported(guest_factory) -> None:
    """A pending UFFD_EVENT_REMOVE makes the kernel answer -EAGAIN until it is read."""
    g = guest_factory("anon", (4,), U.FEATURE_EVENT_REMOVE)
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    g.start(child_dontneed, 0)
    wait_readable(g.uffd.fd)  # the child now sleeps in madvise until the event is read
    with pytest.raises(BlockingIOError) as err:
        g.uffd.copy(g.addr(1), content(1))  # retried for the bounded time, then reported
    assert err.value.errno == errno.EAGAIN and "UFFDIO_COPY" in str(err.value)
    assert reader.read(bm, 0) == []  # reads the event: the discarded pages are marked received
    assert reader.events()["remove"] == 1 and reader.events()["removed_pages"] == 4 and bm.count() == 4
    g.result()  # madvise returned
    assert g.uffd.copy(g.addr(1), content(1)) == P
    assert g.call(child_read_pages, [1]) == [digest(content(1))]
    bm.close()


# ---- the fault loop step ----

def test_read_faults_dedupes_and_counts_waiters(guest_factory) -> None:
    g = guest_factory("anon", (8,))
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    touches = [3, 3, 5, 3, 5, 3]
    g.start(child_touch_concurrently, touches)
    g.wait_blocked(len(touches))
    faults = reader.read(bm, int(TIMEOUT_S * 1000))
    assert sorted((page, waiters) for page, waiters, _ in faults) == [(3, 4), (5, 2)]
    assert reader.stats.msgs == 6
    for page in (3, 5):
        assert g.uffd.copy(g.addr(page), content(page)) == P  # wakes every waiter
    assert g.result() == [digest(content(p)) for p in touches]
    bm.close()


def test_read_faults_never_reads_more_than_it_can_return(guest_factory) -> None:
    g = guest_factory("anon", (8,))
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P, max_faults=2)
    touches = [0, 1, 2, 3, 4]
    g.start(child_touch_concurrently, touches)
    g.wait_blocked(len(touches))
    seen: list[int] = []
    while len(seen) < len(touches):
        faults = reader.read(bm, int(TIMEOUT_S * 1000))
        assert 0 < len(faults) <= 2
        seen += [page for page, _, _ in faults]
    assert sorted(seen) == touches  # none lost to a full output array
    for page in touches:
        g.uffd.copy(g.addr(page), content(page))
    assert g.result() == [digest(content(p)) for p in touches]
    bm.close()


def test_read_faults_wakes_pages_already_received(guest_factory) -> None:
    g = guest_factory("shmem", (4,))
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    g.start(child_read_pages, [1])
    wait_readable(g.uffd.fd)
    # The page arrives (say by the bulk stream) without waking the faulting thread.
    g.uffd.copy(g.addr(1), content(1), U.COPY_MODE_DONTWAKE)
    bm.set_range(1)
    assert reader.read(bm, int(TIMEOUT_S * 1000)) == []
    assert reader.stats == U.FaultStats(msgs=1, woken=1, other_events=0)
    assert g.result() == [digest(content(1))]
    bm.close()


def test_read_faults_times_out_empty() -> None:
    mem = mmap.mmap(-1, P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    bm = SharedBitmap.create(1)
    with U.Uffd.create() as u:
        reader = U.FaultReader(u.fd, [U.Region(address_of(mem), P, 0)], P)
        assert reader.read(bm, 1) == []
        with SharedBitmap.create(0) as small, pytest.raises(ValueError):
            reader.read(small, 0)  # too small for the regions
    bm.close()
    mem.close()


def test_read_faults_returns_when_its_wake_fd_is_signalled_and_reads_it_empty() -> None:
    """A fault loop waiting for another path's installs polls that path's eventfd with the
    userfaultfd: a signal ends the wait (no faults) and is consumed, so the next wait waits."""
    mem = mmap.mmap(-1, P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    bm = SharedBitmap.create(1)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with U.Uffd.create() as u:
            reader = U.FaultReader(u.fd, [U.Region(address_of(mem), P, 0)], P)
            os.eventfd_write(wake, 1)
            assert reader.read(bm, 600_000, wake_fd=wake) == []  # a missed signal would wait 10 minutes
            with pytest.raises(BlockingIOError):
                os.eventfd_read(wake)
    finally:
        os.close(wake)
        bm.close()
        mem.close()


# ---- the installer ----

def source_memory(npages: int, zero: set[int]) -> bytearray:
    return bytearray(b"".join(bytes(P) if p in zero else content(p) for p in range(npages)))


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_install_batch_across_regions(guest_factory, kind: str) -> None:
    g = guest_factory(kind, (6, 6))  # global pages 0-5 and 6-11, two mappings
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd, g.regions, P)
    src = source_memory(g.npages, zero={3, 8})
    g.uffd.copy(g.addr(4), content(104))
    bm.set_range(4)  # received earlier: must be left alone
    g.uffd.copy(g.addr(7), content(107))  # present but not yet in the bitmap: EEXIST
    zero_runs, data, _ = pages.pack_pages(src, 2, 8, P)
    assert zero_runs == [1, 1, 6, 1]
    st = reader.install(bm, 2, 8, zero_runs, data)
    assert (st.copied, st.zeroed, st.skipped, st.eexist) == (4, 2, 1, 1)
    assert st.installed == 6
    # One ioctl per piece: [2] [3]z [5] [6-7: stops at 7, then EEXIST] [8]z [9]; 5|6 is the region boundary.
    assert st.ioctls == 7
    assert [bm.test(p) for p in range(g.npages)] == [p in range(2, 10) for p in range(g.npages)]
    expected = {2: content(2), 3: bytes(P), 4: content(104), 5: content(5), 6: content(6), 7: content(107),
                8: bytes(P), 9: content(9)}
    assert g.call(child_read_pages, list(expected)) == [digest(c) for c in expected.values()]
    again = reader.install(bm, 2, 8, zero_runs, bytes(data))
    assert (again.installed, again.skipped, again.ioctls) == (0, 8, 0)
    bm.close()


def test_install_rejects_bad_batches() -> None:
    mem = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    bm = SharedBitmap.create(8)
    with U.Uffd.create() as u:
        reader = U.FaultReader(u.fd, [U.Region(address_of(mem), 4 * P, 0)], P)
        with pytest.raises(OSError) as err:  # page 5 is in no region
            reader.install(bm, 4, 2, [], bytes(2 * P))
        assert err.value.errno == errno.EINVAL and "mig_install first_page=4 count=2" in str(err.value)
        with pytest.raises(OSError) as err:  # one zero page: one page of data, not two
            reader.install(bm, 0, 2, [0, 1], bytes(2 * P))
        assert err.value.errno == errno.EINVAL
        with pytest.raises(OSError) as err:  # overlapping zero runs
            reader.install(bm, 0, 3, [0, 2, 1, 1], b"")
        assert err.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            reader.install(bm, 0, 2, [0], bytes(P))
    assert bm.count() == 0
    bm.close()
    mem.close()


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_fault_loop_with_neighbourhood_installs(guest_factory, kind: str) -> None:
    """The destination's loop in miniature: read faults, install 4-page batches
    around them, until the guest (several threads, random pages) is done."""
    g = guest_factory(kind, (16, 8))
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    src = source_memory(g.npages, zero={1, 2, 9, 17, 23})
    rng = random.Random(7)
    touches = [rng.randrange(g.npages) for _ in range(12)]
    g.start(child_touch_concurrently, touches)
    while not g.done():
        for page, _, _ in reader.read(bm, 50):
            first = page // 4 * 4
            zero_runs, data, _ = pages.pack_pages(src, first, 4, P)
            reader.install(bm, first, 4, zero_runs, data)
    assert g.result() == [digest(bytes(src[p * P:(p + 1) * P])) for p in touches]
    bm.close()


def free_huge_pages() -> tuple[int, int]:
    """(free huge pages, their size in bytes) from /proc/meminfo."""
    info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    return int(info["HugePages_Free"]), int(info["Hugepagesize"].split()[0]) * 1024


@pytest.mark.skipif(free_huge_pages()[0] < 3, reason="needs 3 free huge pages (vm.nr_hugepages)")
def test_install_on_hugetlbfs(guest_factory) -> None:
    """UFFDIO_ZEROPAGE does not do hugetlbfs: zero runs must be copied from zeroes."""
    h = free_huge_pages()[1]
    g = guest_factory("hugetlb", (3,), page_size=h)
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, h)
    data = random.Random(1).randbytes(h)
    zero_runs, packed, _ = pages.pack_pages(bytes(h) + data + bytes(h), 0, 3, h)
    st = reader.install(bm, 0, 3, zero_runs, packed)
    assert (st.copied, st.zeroed) == (1, 2) and bm.is_full()
    assert g.call(child_read_pages, [0, 1, 2]) == [digest(bytes(h)), digest(data), digest(bytes(h))]
    bm.close()


# ---- write protection, dirty tracking, move ----

def test_pagemap_scan_reports_and_reprotects_written_pages() -> None:
    npages = 8
    mem = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address_of(mem)
    mem[0:P] = content(0)  # populated before tracking starts
    found = SharedBitmap.create(npages + 2)

    def scan() -> list[int]:
        found.clear_range(0, found.nbits)
        n = U.scan_written(pagemap, base, npages * P, P, found, first_page=2)
        pages = [p - 2 for p in range(found.nbits) if found.test(p)]
        assert n == len(pages)
        return pages

    with U.Uffd.create(features=U.FEATURE_WP_ASYNC | U.FEATURE_WP_UNPOPULATED) as u:
        u.register(base, npages * P, U.MODE_WP)
        u.writeprotect(base, npages * P, True)
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            assert scan() == []
            for p in (1, 4, 5, 7):
                mem[p * P] = 1  # async WP: the write goes through and is recorded
            mem[0] = 1
            assert scan() == [0, 1, 4, 5, 7]
            assert scan() == []  # the scan re-protected them
            with pytest.raises(ValueError):  # C trusts the range: Python checks it
                U.scan_written(pagemap, base, (npages + 1) * P, P, found, first_page=2)
            other = mmap.mmap(-1, P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            other[0] = 1
            with pytest.raises(OSError) as err:  # not registered WP_ASYNC: the kernel refuses
                U.scan_written(pagemap, address_of(other), P, P, found)
            assert err.value.errno in UNSUPPORTED and "PAGEMAP_SCAN" in str(err.value)
            other.close()
        finally:
            os.close(pagemap)
    found.close()
    mem.close()


def test_installs_write_protect_on_request_for_a_scan_of_present_pages() -> None:
    """What a destination watching use does (migrate.dest.written): installs write-protect what they fill,
    data and zero pages alike, and a scan of present pages finds only those written since; missing pages
    it leaves alone, where the plain scan counts them written (the kernel's fast path for WRITTEN alone)."""
    npages = 8
    fd = os.memfd_create("wp-installs", os.MFD_CLOEXEC)
    os.ftruncate(fd, npages * P)
    mem = mmap.mmap(fd, npages * P, mmap.MAP_SHARED)
    os.close(fd)
    base = address_of(mem)
    bm, found = SharedBitmap.create(npages), SharedBitmap.create(npages)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)

    def scan(present_only: bool = True) -> list[int]:
        found.clear_range(0, npages)
        U.scan_written(pagemap, base, npages * P, P, found, present_only=present_only)
        return [p for p in range(npages) if found.test(p)]

    try:
        with U.Uffd.create(U.FEATURE_MISSING_SHMEM | U.WP_ASYNC_FEATURES) as u:
            u.register(base, npages * P, U.MODE_MISSING | U.MODE_WP)
            reader = U.FaultReader(u.fd, [U.Region(base, npages * P, 0)], P)
            reader.install(bm, 0, 1, [], content(0))  # before: mapped writable
            reader.protect_installs(True)
            zero_runs, data, _ = pages.pack_pages(source_memory(npages, zero={3}), 1, 4, P)
            st = reader.install(bm, 1, 4, zero_runs, data)
            assert (st.copied, st.zeroed) == (3, 1)
            reader.protect_installs(False)
            reader.install(bm, 5, 1, [], content(5))
            assert scan() == [0, 5]  # mapped without the protection: reported once, protected since
            assert scan() == []
            mem[P] = 1
            mem[3 * P] = 1  # the zero page was protected too
            assert bytes(mem[4 * P:5 * P]) == content(4)  # a read is no write
            assert scan() == [1, 3]
            assert scan(present_only=False) == [6, 7]  # the missing pages
            reader.close()
    finally:
        os.close(pagemap)
        bm.close()
        found.close()
        mem.close()


def test_move_pages_into_a_registered_range() -> None:
    dst = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src[:2 * P] = content(0) + content(1)
    with U.Uffd.create(features=U.FEATURE_MOVE) as u:
        u.register(address_of(dst), 4 * P)
        assert u.move(address_of(dst), address_of(src), 2 * P) == 2 * P
        assert dst[:2 * P] == content(0) + content(1)
        assert src[:2 * P] == bytes(2 * P)  # moved away, not copied
        with pytest.raises(OSError) as err:  # no page to move, holes not allowed
            u.move(address_of(dst) + 2 * P, address_of(src) + 2 * P, P)
        assert err.value.errno == errno.ENOENT and "UFFDIO_MOVE" in str(err.value)
    dst.close()
    src.close()


def test_batches_install_in_one_call_and_refuse_damage() -> None:
    """BatchDecoder.install: a raw and a compressed batch land exactly; a batch with
    one flipped data byte, or bytes that are no batch, are refused (BatchError
    naming the request when it can be read) and install nothing."""
    from migrate.batches import BatchDecoder, BatchEncoder, BatchError

    n = 16
    src = bytearray(os.urandom(n * P))
    src[3 * P:5 * P] = bytes(2 * P)  # zero pages travel as a run
    fd = os.memfd_create("batch-install")
    os.ftruncate(fd, n * P)
    mem = mmap.mmap(fd, n * P, mmap.MAP_SHARED)
    bitmap = SharedBitmap.create(n)
    try:
        with U.Uffd.create() as uffd:
            uffd.register(address_of(mem), n * P)
            io = U.FaultReader(uffd, [U.Region(base=address_of(mem), size=n * P)], P)
            decoder = BatchDecoder(n, P)
            raw = BatchEncoder(memoryview(src), P, None).encode(0, 8, req_id=5).wire
            text = b"compressible " * (n * P // 13 + 1)
            packed = BatchEncoder(memoryview(text[:n * P]), P, 1).encode(8, 8, req_id=6)
            assert packed.compressed
            damaged = bytearray(raw)
            damaged[-P] ^= 1
            with pytest.raises(BatchError) as refused:
                decoder.install(bytes(damaged), io, bitmap)
            assert refused.value.req_id == 5 and bitmap.count() == 0
            with pytest.raises(BatchError) as garbage:
                decoder.install(b"\xff" * 40, io, bitmap)
            assert garbage.value.req_id is None
            assert decoder.install(raw, io, bitmap).req_id == 5
            assert decoder.install(packed.wire, io, bitmap).done.installed == 8
            assert bitmap.count() == n
            assert mem[:8 * P] == bytes(src[:8 * P]) and mem[8 * P:] == text[8 * P:n * P]
            uffd.unregister(address_of(mem), n * P)
    finally:
        bitmap.close()
        mem.close()
        os.close(fd)


def test_the_example_in_docs_uffd_md_runs() -> None:
    """docs/uffd.md's example: register anonymous memory, fault from a thread, copy the page in."""
    doc = Path(__file__).resolve().parent.parent / "docs" / "uffd.md"
    found = re.search(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert found, "docs/uffd.md has no python block"
    exec(compile(found.group(1), str(doc), "exec"), {"__name__": "docs_uffd_example"})  # noqa: S102 - our docs
