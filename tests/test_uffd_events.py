"""Non-cooperative userfaultfd events (REMOVE, UNMAP, REMAP, FORK) at the native layer.

The guest is a forked child (tests/test_uffd.py's harness) whose own calls
(madvise, munmap, mremap, fork) raise the events; each blocks in the kernel
until the event is read, so every step here is ordered by the kernel, not by
timing.
"""
from __future__ import annotations

import ctypes
import mmap
import os

from test_uffd import GuestContext, P, child_dontneed, child_read_pages, content, digest, guest_factory, wait_readable  # noqa: F401

from migrate import pages
from migrate import uffd as U
from migrate.bitmap import SharedBitmap

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mremap.restype = ctypes.c_void_p
LIBC.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
ZERO = digest(bytes(P))


def install(reader: U.FaultReader, bm: SharedBitmap, first: int, count: int) -> U.InstallStats:
    data = b"".join(content(p) for p in range(first, first + count))
    zero_runs, packed, _ = pages.pack_pages(data, 0, count, P)
    return reader.install(bm, first, count, list(zero_runs), bytes(packed))


def serve_until_done(g, reader: U.FaultReader, bm: SharedBitmap) -> object:
    """Answer the child's faults (installing the image's pages) until its command replies."""
    while not g.done():
        for page, _, _ in reader.read(bm, 20):
            install(reader, bm, page, 1)
    return g.result()


def child_move(ctx: GuestContext, first: int, count: int) -> int:
    """mremap pages [first, first + count) of region 0 to a fresh address; returns it."""
    dst = LIBC.mmap(None, count * P, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    got = LIBC.mremap(ctx.bases[0] + first * P, count * P, count * P, MREMAP_MAYMOVE | MREMAP_FIXED, dst)
    assert got == dst, ctypes.get_errno()
    return dst


def child_read_at(ctx: GuestContext, addrs: list[int]) -> list[str]:
    return [digest(ctypes.string_at(a, P)) for a in addrs]


def child_unmap(ctx: GuestContext, first: int, count: int) -> None:
    assert LIBC.munmap(ctx.bases[0] + first * P, count * P) == 0


def child_fork(ctx: GuestContext) -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_remove_beats_an_install_in_flight_and_discarded_pages_read_zero(guest_factory) -> None:
    """The image's bytes never come back over a discard: an install racing the
    REMOVE (told -EAGAIN) reads the event itself and skips the range; every
    later fault there, on pages that had arrived or not, gets a zero page."""
    g = guest_factory("anon", (8,), U.FEATURE_EVENT_REMOVE)
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    assert install(reader, bm, 0, 4).installed == 4  # pages 0-3 arrived, 4-7 are on their way
    g.start(child_dontneed, 0)
    wait_readable(g.uffd.fd)  # the child sleeps in madvise until its REMOVE is read
    late = install(reader, bm, 4, 4)  # -EAGAIN: reads the event, finds the range discarded
    assert late.installed == 0 and late.skipped == 4
    g.result()
    assert bm.count() == 8 and reader.events()["removed_pages"] == 8
    g.start(child_read_pages, list(range(8)))
    assert serve_until_done(g, reader, bm) == [ZERO] * 8
    ev = reader.events()
    assert (ev["remove"], ev["zero_served"]) == (1, 8)
    bm.close()


def test_remap_moves_a_piece_of_a_region(guest_factory) -> None:
    g = guest_factory("anon", (8,), U.FEATURE_EVENT_REMAP)
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    install(reader, bm, 2, 1)  # arrived before the move: moves with its page table entry
    g.start(child_move, 2, 3)  # sleeps in mremap until its REMAP is read
    assert reader.read(bm, 5000) == []
    dst = g.result()
    base = g.regions[0].base
    assert reader.current_regions() == [U.Region(base, 2 * P, 0), U.Region(dst, 3 * P, 2 * P),
                                        U.Region(base + 5 * P, 3 * P, 5 * P)]
    g.start(child_read_at, [dst, dst + P, dst + 2 * P, base, base + 7 * P])
    assert serve_until_done(g, reader, bm) == [digest(content(p)) for p in (2, 3, 4, 0, 7)]
    assert reader.events()["remap"] == 1 and reader.events()["remapped_pages"] == 3
    bm.close()


def test_unmap_takes_pages_out_and_marks_them(guest_factory) -> None:
    g = guest_factory("anon", (8,), U.FEATURE_EVENT_UNMAP)
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    g.start(child_unmap, 6, 2)
    assert reader.read(bm, 5000) == []
    g.result()
    assert reader.current_regions() == [U.Region(g.regions[0].base, 6 * P, 0)]
    assert [bm.test(p) for p in range(8)] == [False] * 6 + [True] * 2
    assert reader.events()["unmap"] == 1 and reader.events()["unmapped_pages"] == 2
    assert install(reader, bm, 0, 8).installed == 6  # the rest still arrives
    bm.close()


def uffds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))


def test_fork_is_refused_and_its_fd_closed(guest_factory) -> None:
    g = guest_factory("anon", (4,), U.FEATURE_EVENT_FORK)
    bm = SharedBitmap.create(g.npages)
    reader = U.FaultReader(g.uffd.fd, g.regions, P)
    before = uffds()
    g.start(child_fork)  # sleeps in fork until its FORK is read
    while not g.done():
        reader.read(bm, 20)
    assert g.result() == 0  # the child ran and exited
    assert reader.events()["fork"] == 1 and uffds() == before
    bm.close()


def test_features_come_from_the_fd() -> None:
    with U.Uffd.create(U.FEATURE_EVENT_REMOVE | U.FEATURE_EVENT_UNMAP) as u:
        reader = U.FaultReader(u, [U.Region(0x10000, P, 0)], P)
        assert reader.features & U.FEATURE_EVENT_REMOVE and reader.features & U.FEATURE_EVENT_UNMAP


def test_lazy_zero_pages_are_served_a_block_at_a_time(guest_factory) -> None:
    """With lazy zero pages an install of zero runs only marks them received; a fault on one
    is answered with a zero page, and so are the received pages after it in its aligned
    64-page block, up to the first page not received: a guest sweeping zero RAM faults once
    a block, not once a page (each fault a round trip through the fault loop)."""
    g = guest_factory("shmem", (160,))
    bm = SharedBitmap.create(g.npages)
    try:
        reader = U.FaultReader(g.uffd.fd, g.regions, P)
        reader.lazy_zero()
        done = reader.install(bm, 0, 100, [0, 100], b"")
        assert (done.zeroed, done.lazy) == (100, 100) and bm.count() == 100
        g.start(child_read_pages, list(range(100)))
        assert serve_until_done(g, reader, bm) == [ZERO] * 100
        assert reader.events()["zero_served"] == 100
        assert reader.stats.msgs == 2  # pages 0 (0-63 filled) and 64 (64-99: 100 is still to come)
    finally:
        bm.close()
