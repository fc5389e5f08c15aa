"""Write tracking on the source: a real runner's RAM, async uffd-WP, PAGEMAP_SCAN.

The oracle is what the runner is known to have written: seq-write with one
thread writes page `op % pages` for op = 0, 1, ...; for other workloads, the
pages whose content changed.
"""
from __future__ import annotations

import mmap
import os
import threading

import pytest

from migrate.bitmap import SharedBitmap
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guests import create_memfd
from migrate.source.dirty import DirtyTracker

P = mmap.PAGESIZE
PAGES = 256


def pages_of(data: bytes) -> set[int]:
    """The set bits of a dirty bitmap in the wire format."""
    bits = int.from_bytes(data, "little")
    return {i for i in range(len(data) * 8) if bits >> i & 1}


def snapshot(fd: int) -> list[bytes]:
    """Every page of the memfd, read with pread (never through a mapping)."""
    return [os.pread(fd, P, i * P) for i in range(PAGES)]


class Tracked:
    """A runner on fresh RAM with write tracking on, started paused."""

    def __init__(self, workload: str, ops: int, *, fill: bool, rate: float = 0.0, threads: int = 1) -> None:
        self.fd = create_memfd("dirty", PAGES * P)
        spec = GuestSpec(size=PAGES * P, workload=workload, seed=3, ops=ops, threads=threads, ops_per_sec=rate)
        self.proc = GuestProcess.launch(spec, self.fd, start_paused=True, fill=fill)
        removed = SharedBitmap.create(PAGES)
        base = self.proc.track_writes(removed.fd)
        self.tracker = DirtyTracker(self.proc.pid, base, PAGES * P, P, removed)

    def dirty(self) -> set[int]:
        self.tracker.scan()
        data, count = self.tracker.take()
        found = pages_of(data)
        assert len(found) == count
        return found

    def close(self) -> None:
        self.tracker.close()
        self.proc.stop()
        os.close(self.fd)


@pytest.fixture
def tracked(request):
    made: list[Tracked] = []

    def make(*args, **kw) -> Tracked:
        made.append(Tracked(*args, **kw))
        return made[-1]

    yield make
    for t in made:
        t.close()


@pytest.mark.parametrize("fill", [False, True], ids=["never-touched", "filled"])
def test_finds_exactly_the_pages_written(tracked, fill):
    t = tracked("seq-write", 100, fill=fill)
    assert t.dirty() == set()
    t.proc.resume()
    assert t.proc.wait_finished(30)
    assert t.dirty() == set(range(100))
    assert t.dirty() == set()  # the scan protected them again


def test_each_scan_sees_only_writes_since_the_previous_one(tracked):
    t = tracked("seq-write", 10 * PAGES, fill=False, rate=4000)
    seen: list[set[int]] = []
    done = 0
    while done < 2 * PAGES // 3:
        t.proc.resume()
        t.proc.wait_finished(0.02)
        t.proc.pause()
        now = t.proc.stats()["ops_done"]
        assert t.dirty() == {op % PAGES for op in range(done, now)}
        seen.append(set(range(done, now)))
        done = now
    assert len(seen) > 1


def test_wrapping_writes_mark_every_page(tracked):
    t = tracked("seq-write", PAGES + 7, fill=True)
    t.proc.resume()
    assert t.proc.wait_finished(30)
    assert t.dirty() == set(range(PAGES))


@pytest.mark.parametrize("workload", ["random-write", "hotset", "zipf"])
def test_dirty_set_equals_the_pages_that_changed(tracked, workload):
    t = tracked(workload, 300, fill=True, threads=2)
    before = snapshot(t.fd)
    t.proc.resume()
    assert t.proc.wait_finished(30)
    after = snapshot(t.fd)
    changed = {i for i in range(PAGES) if before[i] != after[i]}
    assert changed and t.dirty() == changed


def test_discarded_pages_are_dirty_though_no_scan_sees_them(tracked):
    """balloon discards ranges (MADV_REMOVE) of filled, protected pages: a zap is no write,
    PAGEMAP_SCAN sees only a marker, yet the page now reads zeros. The runner reports each
    discard, so every page that changed is in the dirty set, the discarded ones included."""
    t = tracked("balloon", 400, fill=True, threads=2)
    before = snapshot(t.fd)
    t.proc.resume()
    assert t.proc.wait_finished(30)
    after = snapshot(t.fd)
    changed = {i for i in range(PAGES) if before[i] != after[i]}
    zeroed = {i for i in changed if after[i] == bytes(P)}
    assert zeroed and changed <= t.dirty()
    assert t.dirty() == set()  # taken once


def test_read_only_workload_dirties_nothing(tracked):
    t = tracked("random-read", 2000, fill=True)
    t.proc.resume()
    assert t.proc.wait_finished(30)
    assert t.dirty() == set()


def test_untrack_then_track_again_starts_clean(tracked):
    t = tracked("seq-write", 50, fill=False)
    t.proc.untrack_writes()
    t.proc.track_writes()
    t.proc.resume()
    assert t.proc.wait_finished(30)
    assert t.dirty() == set(range(50))


def test_discard_punches_pages_and_clears_their_bits():
    from migrate.dest.precopy import discard

    fd = create_memfd("discard", 8 * P)
    received = SharedBitmap.create(8)
    stale = SharedBitmap.create(8)
    try:
        os.pwrite(fd, b"\x5a" * (8 * P), 0)
        received.set_range(0, 8)
        for page in (1, 2, 6):
            stale.set_range(page)
        pages, runs = discard(fd, received, stale.to_bytes(), P)
        assert (pages, runs) == (3, 2)
        assert [received.test(i) for i in range(8)] == [i not in (1, 2, 6) for i in range(8)]
        # A punched page of a memfd is a hole again: SEEK_DATA skips it.
        assert os.lseek(fd, P, os.SEEK_DATA) == 3 * P
        assert os.pread(fd, P, 6 * P) == bytes(P)
    finally:
        received.close()
        stale.close()
        os.close(fd)


def test_a_pull_round_unmarks_stale_pages_and_punches_only_those_it_did_not_rewrite():
    """Before a pull the stale pages' bits are cleared without a punch (the round rewrites them);
    after it, the ones it did not rewrite (a round cut short) are punched: a clear bit is a hole again."""
    from migrate.dest.precopy import punch_left, unmark

    fd = create_memfd("unmark", 8 * P)
    received = SharedBitmap.create(8)
    stale = SharedBitmap.create(8)
    try:
        os.pwrite(fd, b"\x5a" * (8 * P), 0)
        received.set_range(0, 7)  # page 7 was never received: a hole already
        for page in (1, 2, 6, 7):
            stale.set_range(page)
        unmarked = unmark(received, stale.to_bytes())
        assert [received.test(i) for i in range(8)] == [i not in (1, 2, 6, 7) for i in range(8)]
        assert os.lseek(fd, P, os.SEEK_DATA) == P  # not punched: the round rewrites them
        os.pwrite(fd, b"\x33" * P, 2 * P)         # the round rewrote page 2, then was cut short
        received.set_range(2)
        punch_left(fd, received, unmarked, P)
        assert [received.test(i) for i in range(8)] == [i not in (1, 6, 7) for i in range(8)]
        assert os.lseek(fd, P, os.SEEK_DATA) == 2 * P  # page 1 is a hole again
        assert os.lseek(fd, 6 * P, os.SEEK_DATA) == 7 * P  # page 6 too (7, never received, is not ours)
        assert os.pread(fd, P, 2 * P) == b"\x33" * P
    finally:
        received.close()
        stale.close()
        os.close(fd)


class _PageServer:
    """Stands in for the run's page server: its start waits (bounded) for write tracking to be armed."""

    armed: threading.Event
    fail = False

    def __init__(self, *args: object) -> None:
        self.saw_tracking = self.armed.wait(30)
        self.closed = False
        if self.fail:
            raise RuntimeError("page server failed to start")

    def freeze(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("fail", [False, True])
def test_write_tracking_is_armed_while_the_page_server_starts(monkeypatch, fail):
    """PrepareOutgoing starts both at once (the gRPC plane's bulk server alone takes ~0.1 s to start);
    a page server that fails to start leaves no tracking behind."""
    from migrate.guests import HostedGuest
    from migrate.names import DataPlane
    from migrate.source import outgoing

    armed, stopped = threading.Event(), threading.Event()
    monkeypatch.setattr(_PageServer, "armed", armed, raising=False)
    monkeypatch.setattr(_PageServer, "fail", fail)
    monkeypatch.setattr(outgoing, "NativeServer", _PageServer)
    monkeypatch.setattr(outgoing.OutgoingRun, "_start_tracking", lambda self: armed.set())
    monkeypatch.setattr(outgoing.OutgoingRun, "_stop_tracking", lambda self: stopped.set())
    guest = HostedGuest("g", GuestSpec(size=PAGES * P, workload="idle", seed=1, ops=0), "runner", -1)
    if fail:
        with pytest.raises(RuntimeError, match="failed to start"):
            outgoing.OutgoingRun(guest, "127.0.0.1", 0, track_writes=True, plane=DataPlane.NATIVE)
        assert stopped.is_set()
    else:
        run = outgoing.OutgoingRun(guest, "127.0.0.1", 0, track_writes=True, plane=DataPlane.NATIVE)
        assert run.pages.saw_tracking and not stopped.is_set()
