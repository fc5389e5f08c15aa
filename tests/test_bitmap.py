"""SharedBitmap: word boundaries, a model-based property test, sharing across processes."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.bitmap import SharedBitmap


@pytest.mark.parametrize("nbits", [1, 63, 64, 65, 130])
def test_ranges_across_word_boundaries(nbits: int) -> None:
    with SharedBitmap.create(nbits) as bm:
        assert bm.count() == 0 and not bm.is_full()
        assert bm.next_set() == nbits and bm.next_clear() == 0
        bm.set_range(0, nbits)
        assert bm.count() == nbits and bm.is_full()
        assert bm.next_clear() == nbits and bm.next_set(nbits - 1) == nbits - 1
        bm.clear_range(nbits - 1)
        assert bm.next_clear() == nbits - 1 and not bm.is_full()
        assert bm.next_set(nbits - 1) == nbits
        bm.clear_range(0, nbits)
        assert bm.count() == 0
        assert bm.next_set(nbits + 5) == nbits and bm.next_clear(nbits + 5) == nbits


@pytest.mark.parametrize("nbits", [1, 64, 70, 130])
def test_take_clears_the_bits_of_a_mask_and_counts_those_it_found(nbits: int) -> None:
    with SharedBitmap.create(nbits) as bm, SharedBitmap.create(nbits) as mask, SharedBitmap.create(nbits + 64) as wide:
        bm.set_range(0, nbits)
        mask.set_range(nbits // 2, nbits - nbits // 2)
        assert bm.take(mask) == nbits - nbits // 2
        assert bm.count() == nbits // 2 and bm.next_set(nbits // 2) == nbits
        assert bm.take(mask) == 0  # each bit is taken once
        wide.set_range(0, nbits + 64)
        assert bm.take(wide) == nbits // 2 and bm.count() == 0  # a longer mask: only this bitmap's bits


def test_bits_past_the_end_are_neither_counted_nor_found() -> None:
    """The last word's spare bits read as clear; next_clear must not report them."""
    with SharedBitmap.create(70) as bm:
        bm.set_range(0, 70)
        assert bm.next_clear(64) == 70 and bm.count() == 70


def test_out_of_range_is_refused() -> None:
    with SharedBitmap.create(10) as bm:
        for call in (lambda: bm.set_range(5, 6), lambda: bm.clear_range(-1, 2), lambda: bm.test(10)):
            with pytest.raises(IndexError):
                call()
        assert bm.count() == 0


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 199), st.integers(0, 80)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(nbits=st.integers(1, 200), ops=ops, starts=st.lists(st.integers(0, 210), max_size=8))
def test_matches_a_set_model(nbits: int, ops: list[tuple[bool, int, int]], starts: list[int]) -> None:
    model: set[int] = set()
    with SharedBitmap.create(nbits) as bm:
        for is_set, first, count in ops:
            first = first % nbits
            count = min(count, nbits - first)
            span = set(range(first, first + count))
            if is_set:
                bm.set_range(first, count)
                model |= span
            else:
                bm.clear_range(first, count)
                model -= span
        assert bm.count() == len(model)
        assert [bm.test(i) for i in range(nbits)] == [i in model for i in range(nbits)]
        assert bm.is_full() == (len(model) == nbits)
        for s in starts:
            assert bm.next_set(s) == min((i for i in model if i >= s), default=nbits)
            assert bm.next_clear(s) == min((i for i in range(s, nbits) if i not in model), default=nbits)
        wire = bm.to_bytes()
        assert {i for i in range(nbits) if wire[i // 8] >> (i % 8) & 1} == model


def test_wire_format_round_trip_and_checks() -> None:
    with SharedBitmap.create(70) as a, SharedBitmap.create(70) as b:
        a.set_range(9)
        a.set_range(64, 6)
        wire = a.to_bytes()
        assert len(wire) == 16 and wire[1] == 0x02 and wire[8] == 0x3F
        b.load_bytes(wire)
        assert b.to_bytes() == wire and b.count() == 7
        with pytest.raises(ValueError):
            b.load_bytes(wire[:8])
        with pytest.raises(ValueError):  # bit 70 does not exist
            b.load_bytes(wire[:8] + bytes([0x40]) + bytes(7))
        assert b.to_bytes() == wire


def test_attach_refuses_a_memfd_too_small() -> None:
    fd = os.memfd_create("small", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8)
    with pytest.raises(ValueError):
        SharedBitmap.attach(fd, 65)
    with pytest.raises(OSError):  # attach took the fd and closed it
        os.fstat(fd)


def test_processes_share_bits_and_never_lose_concurrent_updates() -> None:
    """A child toggles bit 0 and checks each set sticks while the parent toggles
    bit 1 of the same word: a non-atomic read-modify-write in the parent would
    now and then store a stale word over the child's bit."""
    with SharedBitmap.create(64) as bm:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                child = SharedBitmap.attach(os.dup(bm.fd), 64)
                lost = 0
                for _ in range(20000):
                    child.set_range(0)
                    lost += not child.test(0)
                    child.clear_range(0)
                child.set_range(2)  # seen by the parent through its own mapping
                child.close()
                os.write(w, str(lost).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        while not bm.test(2):
            bm.set_range(1)
            bm.clear_range(1)
        lost = int(os.read(r, 64))
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert lost == 0
        assert bm.next_set() == 2


def test_bulk_planner_asks_for_missing_pages_once_and_jumps_to_faults() -> None:
    """The bulk path's Planner: runs of missing, unasked pages from its cursor;
    a jump (where the guest faults) moves the cursor; forgotten pages are asked again."""
    from migrate.dest.bulk import Planner

    received = SharedBitmap.create(1000)
    received.set_range(10, 5)
    planner = Planner(received)
    try:
        assert planner.next_runs(100) == [(0, 10), (15, 90)]   # around the received run
        assert planner.next_runs(10, max_runs=1) == [(105, 10)]
        planner.jump(600)
        assert planner.next_runs(50) == [(600, 50)]
        planner.forget(15, 100)
        assert planner.next_runs(1000) == [(650, 350), (15, 585)]  # on from the cursor first, then from 0
        assert planner.next_runs(1000) == []
    finally:
        planner.close()
        received.close()


def test_bulk_planner_asks_for_a_scattered_set_in_few_requests() -> None:
    """Scattered missing pages come many runs at a time, bounded in runs and pages; pages the plan queue
    names first; a page another path asked is left out."""
    from migrate.dest.bulk import Planner

    received = SharedBitmap.create(4096)
    received.set_range(0, 4096)
    for page in range(0, 4096, 3):
        received.clear_range(page)
    asked = SharedBitmap.create(4096)
    asked.set_range(6)  # the urgent path asked for page 6
    planner = Planner(received, asked)
    try:
        planner.plan([(3000, 10)])
        assert planner.next_runs(100, max_runs=5) == [(3000, 1), (3003, 1), (3006, 1), (3009, 1), (0, 1)]
        assert planner.next_runs(3, max_runs=256) == [(3, 1), (9, 1), (12, 1)]
        got = planner.next_runs(4096, max_runs=256)
        assert len(got) == 256 and got[0] == (15, 1)
        rest = [run for runs in iter(lambda: planner.next_runs(4096), []) for run in runs]
        asked_pages = {3000, 3003, 3006, 3009, 0, 3, 9, 12} | {p for p, _ in got} | {p for p, _ in rest}
        assert asked_pages == set(range(0, 4096, 3)) - {6}  # each missing page once, none the urgent path asked
        assert planner.planned == 4
    finally:
        planner.close()
        asked.close()
        received.close()
