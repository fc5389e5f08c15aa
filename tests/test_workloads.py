"""Native workload engine: fill, digest, determinism, pause/export/import."""
from __future__ import annotations

import mmap
import os
import random
import threading
import time

import pytest
import zstandard

from migrate.guest.workloads import WORKLOADS, Workload, digest, fill_realistic
from migrate.names import READ_ONLY

PAGE = 4096


def filled(size: int, seed: int = 5) -> bytearray:
    buf = bytearray(size)
    fill_realistic(buf, PAGE, seed)
    return buf


def run_to_end(buf: bytearray, workload: str, seed: int, ops: int, threads: int = 1,
               ops_per_sec: float = 0.0) -> dict:
    with Workload(buf, workload=workload, seed=seed, ops=ops, threads=threads, ops_per_sec=ops_per_sec,
                  page_size=PAGE) as wl:
        wl.start()
        assert wl.wait_finished(120)
        wl.pause()
        assert wl.ops_done == ops
        return wl.export_state()


# ----------------------------------------------------------------- digest
def test_digest_deterministic_and_sensitive() -> None:
    rng = random.Random(1)
    for size in list(range(0, 70)) + [4096, 65536 + 5]:
        data = bytearray(rng.randbytes(size))
        d = digest(data)
        assert len(d) == 16 and int(d, 16) >= 0
        assert digest(bytes(data)) == d
        positions = {0, size - 1, size // 2} if size else set()
        positions |= {rng.randrange(size) for _ in range(10)} if size else set()
        for pos in positions:
            for bit in (0, 7):
                data[pos] ^= 1 << bit
                assert digest(data) != d, (size, pos, bit)
                data[pos] ^= 1 << bit
        assert digest(data) == d


def test_digest_folds_length_and_position() -> None:
    assert digest(b"") != digest(b"\0")
    assert digest(bytes(8)) != digest(bytes(16))
    assert digest(bytes(4096)) != digest(bytes(4097))
    a = bytearray(64)
    b = bytearray(64)
    a[0] = 1
    b[32] = 1        # same lane, different position
    assert digest(a) != digest(b)


def test_digest_of_big_buffer_detects_one_flip() -> None:
    buf = filled(8 << 20)
    d = digest(buf)
    rng = random.Random(2)
    for _ in range(20):
        pos = rng.randrange(len(buf))
        old = buf[pos]
        buf[pos] = old ^ (1 << rng.randrange(8))
        assert digest(buf) != d
        buf[pos] = old
    assert digest(buf) == d


# ------------------------------------------------------------------- fill
def test_fill_is_deterministic_realistic_and_compressible() -> None:
    size = 8 << 20
    a, b, c = filled(size, 11), filled(size, 11), filled(size, 12)
    assert a == b
    assert a != c
    pages = [bytes(a[i:i + PAGE]) for i in range(0, size, PAGE)]
    zero = sum(1 for p in pages if not any(p))
    assert 0.05 * len(pages) < zero < 0.30 * len(pages)
    cctx = zstandard.ZstdCompressor(level=1)
    compressed = sum(len(cctx.compress(bytes(a[i:i + 65536]))) for i in range(0, size, 65536))
    ratio = size / compressed
    assert 1.5 < ratio < 6.0, ratio
    # some pages are incompressible (random), some highly compressible
    per_page = [len(cctx.compress(p)) for p in pages[:512] if any(p)]
    assert any(n >= PAGE for n in per_page)
    assert any(n < PAGE // 2 for n in per_page)


def test_fill_big_buffer_uses_threads_deterministically() -> None:
    size = 40 << 20                         # above the 2-thread threshold
    a = filled(size, 3)
    b = bytearray(size)
    fill_realistic(b, PAGE, 3)
    assert a == b
    # page content depends only on (seed, page): a small fill is a prefix
    assert filled(1 << 20, 3) == a[: 1 << 20]


# -------------------------------------------------------------- workloads
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_workload_deterministic_and_seeded(workload: str) -> None:
    size, ops = 2 << 20, 3000 if workload == "idle" else 50_000
    rate = 100_000.0 if workload == "idle" else 0.0
    base = digest(filled(size))
    results = []
    for seed in (7, 7, 8):
        buf = filled(size)
        state = run_to_end(buf, workload, seed, ops, threads=1, ops_per_sec=rate)
        results.append((digest(buf), state))
    (d1, s1), (d2, s2), (d3, s3) = results
    assert d1 == d2
    assert s1["threads"][0]["rng"] == s2["threads"][0]["rng"]
    assert s1["threads"][0]["acc"] == s2["threads"][0]["acc"]
    if workload in READ_ONLY:
        assert d1 == d3 == base
        if workload != "idle":   # reads are folded into the accumulator
            assert s1["threads"][0]["acc"] != 0
            assert s1["threads"][0]["acc"] != s3["threads"][0]["acc"]
    else:
        assert d1 != base
        assert d1 != d3


@pytest.mark.parametrize("workload", ["random-write", "hotset", "zipf", "seq-write", "random-read", "balloon"])
def test_multithreaded_determinism(workload: str) -> None:
    size, ops = 4 << 20, 80_001
    digests, accs = set(), set()
    for _ in range(3):
        buf = filled(size)
        state = run_to_end(buf, workload, 21, ops, threads=4)
        digests.add(digest(buf))
        accs.add(tuple(t["acc"] for t in state["threads"]))
        assert sum(t["ops_done"] for t in state["threads"]) == ops
    assert len(digests) == 1 and len(accs) == 1


def test_balloon_frees_memfd_pages_and_ends_as_on_private_memory() -> None:
    """On a memfd (a guest's RAM) the balloon's discards free pages (holes in the file);
    on private memory they are zeroed: the same final memory either way."""
    size = 4 << 20
    fd = os.memfd_create("balloon", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED) as shared:
            shared[:] = filled(size)
            run_to_end(shared, "balloon", 5, 20_000, threads=2)
            # (before anything reads them: a read fault on a hole fills it)
            assert os.lseek(fd, 0, os.SEEK_HOLE) < size  # discarded pages not written again
            private = filled(size)
            run_to_end(private, "balloon", 5, 20_000, threads=2)
            assert digest(shared) == digest(private) != digest(filled(size))
    finally:
        os.close(fd)


def test_skewed_workloads_concentrate_writes() -> None:
    size = 4 << 20
    npages = size // PAGE
    base = filled(size)
    touched = {}
    for workload in ("random-write", "hotset", "zipf"):
        buf = bytearray(base)
        run_to_end(buf, workload, 3, 2000)
        touched[workload] = sum(1 for i in range(0, size, PAGE) if buf[i:i + PAGE] != base[i:i + PAGE])
    # 2000 writes over 1024 pages: uniform touches most pages, skewed ones far fewer
    assert touched["random-write"] > 0.75 * npages
    assert touched["hotset"] < 0.5 * npages
    assert touched["zipf"] < 0.75 * touched["random-write"]


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_pause_export_import_equals_uninterrupted(workload: str) -> None:
    """The property migration relies on: pause anywhere, move memory and
    state to a fresh engine, finish there -> same memory, same state."""
    size, threads = 2 << 20, 3
    ops, rate = (600, 2000.0) if workload == "idle" else (20_000, 40_000.0)
    seed = 99
    ref = filled(size)
    ref_state = run_to_end(ref, workload, seed, ops, threads)

    rng = random.Random(hash(workload) & 0xffff)
    buf = filled(size)
    state = None
    hops = mid_run = 0
    while True:
        wl = Workload(buf, workload=workload, seed=seed, ops=ops, threads=threads, ops_per_sec=rate,
                      page_size=PAGE)
        try:
            if state is not None:
                wl.import_state(state)
            wl.start()
            if hops < 4:
                time.sleep(rng.uniform(0.005, 0.05))
            else:
                assert wl.wait_finished(120)
            wl.pause()
            state = wl.export_state()
        finally:
            wl.close()
        done = sum(t["ops_done"] for t in state["threads"])
        mid_run += 0 < done < ops
        hops += 1
        buf = bytearray(buf)                # "migrate": a copy of the memory
        if done == ops:
            break
    assert mid_run >= 1
    assert digest(buf) == digest(ref)
    for mine, theirs in zip(state["threads"], ref_state["threads"]):
        assert (mine["ops_done"], mine["rng"], mine["acc"]) == (theirs["ops_done"], theirs["rng"], theirs["acc"])


def test_pause_is_prompt_when_throttled() -> None:
    buf = filled(1 << 20)
    # one op per 1000 s per thread: a pause that waited for the next op would hang
    wl = Workload(buf, workload="random-write", seed=1, ops=100, threads=2, ops_per_sec=0.002, page_size=PAGE)
    try:
        wl.start()
        time.sleep(0.05)
        t = threading.Thread(target=wl.pause)
        t.start()
        t.join(30)
        assert not t.is_alive(), "pause did not return"
        assert not wl.running
        assert wl.ops_done <= 2
        first, last = wl.first_op_ns(), wl.last_op_ns()
        assert 0 < first <= last
    finally:
        wl.close()


def test_stats_and_repeated_pause_resume() -> None:
    buf = filled(1 << 20)
    with Workload(buf, workload="hotset", seed=4, ops=5000, threads=2, ops_per_sec=50_000,
                  page_size=PAGE) as wl:
        assert not wl.running and wl.ops_done == 0 and not wl.finished
        wl.pause()                          # pausing a paused engine is a no-op
        wl.start()
        with pytest.raises(RuntimeError):
            wl.start()
        with pytest.raises(RuntimeError):
            wl.import_state(wl.export_state())
        while not wl.finished:
            wl.pause()
            n = wl.ops_done
            assert wl.ops_done == n         # paused: nothing moves
            wl.start()
            time.sleep(0.01)
        wl.pause()
        assert wl.ops_done == 5000 and wl.finished
    ref = filled(1 << 20)
    run_to_end(ref, "hotset", 4, 5000, threads=2)
    assert digest(ref) == digest(buf)


def test_invalid_parameters() -> None:
    buf = bytearray(4 * PAGE)
    with pytest.raises(ValueError):
        Workload(buf, workload="nope", seed=1, ops=1, page_size=PAGE)
    with pytest.raises(ValueError):
        Workload(bytearray(PAGE + 8), workload="random-write", seed=1, ops=1, page_size=PAGE)
    with pytest.raises(ValueError):
        Workload(buf, workload="random-write", seed=1, ops=1, threads=5, page_size=PAGE)
    with pytest.raises(ValueError):
        Workload(buf, workload="random-write", seed=1, ops=1, threads=0, page_size=PAGE)
    with Workload(buf, workload="random-write", seed=1, ops=10, threads=2, page_size=PAGE) as wl:
        state = wl.export_state()
        with pytest.raises(ValueError):
            wl.import_state({**state, "seed": 2})
        with pytest.raises(ValueError):
            wl.import_state({**state, "threads": state["threads"][:1]})
        bad = [dict(t) for t in state["threads"]]
        bad[1]["ops_done"] = 6
        with pytest.raises(ValueError):
            wl.import_state({**state, "threads": bad})
        assert wl.export_state() == state    # nothing was half-imported
