"""pack_pages / expand_pages and page batches: zero runs, data layout, round trips."""
from __future__ import annotations

import errno
import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate._native import ffi, lib
from migrate.batches import BatchDecoder, BatchEncoder
from migrate.pages import expand_pages, pack_pages
from migrate.proto import migrate_pb2 as pb


def zero_runs_of(flags: list[bool]) -> list[int]:
    """The model: maximal runs of True as flat (start, length) pairs."""
    runs: list[int] = []
    for i, zero in enumerate(flags):
        if not zero:
            continue
        if runs and runs[-2] + runs[-1] == i:
            runs[-1] += 1
        else:
            runs += [i, 1]
    return runs


# A page: all zero, or zero but for one byte anywhere (first and last bytes
# included: the zero check must look at every word), or random.
def page(size: int) -> st.SearchStrategy[bytes]:
    one_byte = st.tuples(st.integers(0, size - 1), st.integers(1, 255)).map(
        lambda t: bytes(t[0]) + bytes([t[1]]) + bytes(size - t[0] - 1))
    return st.one_of(st.just(bytes(size)), one_byte, st.binary(min_size=size, max_size=size))


@st.composite
def memories(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    size = draw(st.sampled_from([64, 128, 4096]))
    return size, draw(st.lists(page(size), max_size=40))


@settings(max_examples=300, deadline=None)
@given(memories(), st.data())
def test_pack_expand_round_trip(mem: tuple[int, list[bytes]], data: st.DataObject) -> None:
    size, page_list = mem
    first = data.draw(st.integers(0, len(page_list)))
    count = data.draw(st.integers(0, len(page_list) - first))
    buf = bytearray(b"".join(page_list))
    zero_runs, packed = pack_pages(buf, first, count, size)
    window = page_list[first:first + count]
    assert zero_runs == zero_runs_of([p == bytes(size) for p in window])
    assert bytes(packed) == b"".join(p for p in window if p != bytes(size))
    assert expand_pages(count, size, zero_runs, packed) == b"".join(window)


def test_pack_reads_an_mmap_and_checks_bounds() -> None:
    mem = mmap.mmap(-1, 4 * 4096)
    mem[2 * 4096 + 4095] = 7
    zero_runs, data = pack_pages(mem, 1, 3, 4096)
    assert zero_runs == [0, 1, 2, 1] and bytes(data) == mem[2 * 4096:3 * 4096]
    del data
    with pytest.raises(ValueError):
        pack_pages(mem, 2, 3, 4096)
    with pytest.raises(ValueError):
        pack_pages(mem, 0, 1, 100)
    mem.close()  # no buffer export left behind


def test_native_pack_reports_enospc_when_runs_overflow() -> None:
    size = 64
    src = ffi.from_buffer("uint8_t[]", bytearray(size) + bytearray(b"x" * size) + bytearray(size))
    runs = ffi.new("uint32_t[]", 2)
    nruns = ffi.new("uint32_t *")
    dst = ffi.new("uint8_t[]", 3 * size)
    assert lib.mig_pack_pages(src, 3, size, runs, 1, nruns, dst) == -errno.ENOSPC
    assert lib.mig_pack_pages(src, 2, size, runs, 1, nruns, dst) == size
    assert (nruns[0], runs[0], runs[1]) == (1, 0, 1)


@pytest.mark.parametrize("zero_runs, data_pages", [
    ([0], 3),           # not pairs
    ([1, 1, 0, 1], 1),  # unsorted
    ([2, 2], 2),        # past the end
    ([0, 1], 1),        # too little data
    ([0, 1], 3),        # too much data
])
def test_expand_refuses_inconsistent_shapes(zero_runs: list[int], data_pages: int) -> None:
    with pytest.raises(ValueError):
        expand_pages(3, 64, zero_runs, bytes(64 * data_pages))


@settings(max_examples=200, deadline=None)
@given(memories(), st.sampled_from([None, 1]), st.integers(0, 2**64 - 1))
def test_encoded_batches_parse_and_decode_to_the_pages(mem: tuple[int, list[bytes]], level: int | None,
                                                       req_id: int) -> None:
    """The encoder's hand-appended data field parses as a PageBatch, and the
    decoder gives back exactly the pages (raw or zstd, any zero pattern)."""
    size, page_list = mem
    if not page_list:
        return
    memory = b"".join(page_list)
    encoded = BatchEncoder(memoryview(memory), size, level).encode(0, len(page_list), req_id)
    batch = pb.PageBatch.FromString(encoded.wire)
    assert (batch.req_id, batch.first_page, batch.count) == (req_id, 0, len(page_list))
    assert encoded.compressed == (batch.encoding == pb.ZSTD)
    decoded = BatchDecoder(len(page_list), size).decode(batch)
    assert expand_pages(decoded.count, size, decoded.zero_runs, decoded.data) == memory
