"""pack_pages / expand_pages and page batches: zero runs, data layout, round trips."""
from __future__ import annotations

import errno
import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from migrate._native import ffi, lib

from migrate.batches import BatchDecoder, BatchEncoder, BatchError
from migrate.pages import checksum as digest_of
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
    zero_runs, packed, digest = pack_pages(buf, first, count, size)
    window = page_list[first:first + count]
    assert zero_runs == zero_runs_of([p == bytes(size) for p in window])
    assert bytes(packed) == b"".join(p for p in window if p != bytes(size))
    assert expand_pages(count, size, zero_runs, packed) == b"".join(window)
    assert digest == digest_of(packed)


def test_pack_reads_an_mmap_and_checks_bounds() -> None:
    mem = mmap.mmap(-1, 4 * 4096)
    mem[2 * 4096 + 4095] = 7
    zero_runs, data, _ = pack_pages(mem, 1, 3, 4096)
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
    digest = ffi.new("uint64_t *")
    assert lib.mig_pack_pages(src, 3, size, runs, 1, nruns, dst, digest) == -errno.ENOSPC
    assert lib.mig_pack_pages(src, 2, size, runs, 1, nruns, dst, digest) == size
    assert (nruns[0], runs[0], runs[1]) == (1, 0, 1)


def test_native_encode_refuses_an_output_buffer_too_small() -> None:
    size = 64
    src = ffi.from_buffer("uint8_t[]", bytearray(b"x" * 2 * size))
    runs = ffi.new("uint32_t[]", 2)
    end = ffi.new("uint64_t *")
    room = 2 * size + 64 + 10 * (2 + 2)
    assert 2 * (size + lib.MIG_BATCH_ROOM_PER_PAGE) + lib.MIG_BATCH_ROOM_FIXED == room  # what Python allocates
    out = ffi.new("uint8_t[]", room)
    assert lib.mig_encode_batch(src, 2, size, 1, 0, runs, 1, out, room - 1, end) == -errno.ENOSPC
    start = lib.mig_encode_batch(src, 2, size, 1, 0, runs, 1, out, room, end)
    assert start >= 0 and pb.PageBatch.FromString(ffi.buffer(out + start, end[0] - start)[:]).count == 2


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
    decoded = BatchDecoder(len(page_list), size).decode(encoded.wire)
    assert (decoded.req_id, decoded.first_page, decoded.count) == (req_id, 0, len(page_list))
    assert expand_pages(decoded.count, size, decoded.zero_runs, decoded.data) == memory


u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


@settings(max_examples=300, deadline=None)
@given(u64, u64, u32, st.lists(u32, max_size=40), st.integers(-2**31, 2**31 - 1), st.binary(max_size=300), u32, u64,
       st.booleans(), st.lists(st.tuples(st.integers(9, 2**29 - 1), st.integers(0, 5), st.binary(max_size=20)),
                               max_size=3))
def test_native_parser_reads_what_protobuf_writes(req_id, first, count, runs, encoding, data, raw_len, checksum,
                                                  unpacked, unknown) -> None:
    """mig_parse_batch agrees with protobuf: any field values, packed or unpacked
    zero_runs, unknown fields of every wire type anywhere, fields repeated."""
    msg = pb.PageBatch(req_id=req_id, first_page=first, count=count, zero_runs=runs, encoding=encoding, data=data,
                       raw_len=raw_len, checksum=checksum)
    wire = msg.SerializeToString()
    if unpacked and runs:  # the same runs as separate varint fields, after the rest
        wire = pb.PageBatch(**{k: getattr(msg, k) for k in ("req_id", "first_page", "count", "encoding", "data",
                                                            "raw_len", "checksum")}).SerializeToString()
        wire += b"".join(_key(4, 0) + _varint(r) for r in runs)
    for field, kind, payload in unknown:
        wire = _unknown_field(field, kind, payload) + wire
    wire += pb.PageBatch(first_page=first).SerializeToString()  # a repeated scalar: the last one wins
    out = ffi.new("struct mig_batch *")
    values = ffi.new("uint32_t[]", 64)
    assert lib.mig_parse_batch(wire, len(wire), out, values, 64) == 0
    assert (out.req_id, out.first_page, out.count, out.encoding, out.raw_len, out.checksum) == \
        (req_id, first, count, encoding, raw_len, checksum)
    assert ffi.unpack(values, out.nzero_runs) == runs
    assert wire[out.data_off:out.data_off + out.data_len] == data
    assert out.data_digest == digest_of(data)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _unknown_field(field: int, kind: int, payload: bytes) -> bytes:
    """A field this message does not have, of any wire type (kind 4 and 5: a known field, wrong wire type)."""
    if kind == 0:
        return _key(field, 0) + _varint(len(payload))
    if kind == 1:
        return _key(field, 1) + payload.ljust(8, b"x")[:8]
    if kind == 2:
        return _key(field, 2) + _varint(len(payload)) + payload
    if kind == 3:
        return _key(field, 5) + payload.ljust(4, b"x")[:4]
    return _key(1 + kind, 1 if kind == 4 else 5) + payload.ljust(8, b"x")[:8 if kind == 4 else 4]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_native_parser_refuses_garbage_cleanly(junk: bytes) -> None:
    """Random bytes parse or are refused with EINVAL/ENOSPC, never read out of bounds,
    and a parsed data field always lies inside the buffer."""
    out = ffi.new("struct mig_batch *")
    values = ffi.new("uint32_t[]", 8)
    r = lib.mig_parse_batch(junk, len(junk), out, values, 8)
    assert r in (0, -errno.EINVAL, -errno.ENOSPC)
    if r == 0:
        assert out.data_off + out.data_len <= len(junk)


@pytest.mark.parametrize("fields, says", [
    ({"first_page": 6, "count": 4}, "outside the guest's 8 pages"),
    ({"count": 0}, "outside the guest's 8 pages"),
    ({"zero_runs": [1]}, "must hold (start, length) pairs"),
    ({"zero_runs": [2, 1, 1, 1]}, "bad zero run (1, 1)"),     # out of order
    ({"zero_runs": [0, 0]}, "bad zero run (0, 0)"),           # empty
    ({"zero_runs": [3, 2]}, "bad zero run (3, 2)"),           # past the batch's end
    ({"zero_runs": [0, 1]}, "declares 256 data bytes, its shape needs 192"),
])
def test_decoder_names_the_shape_rule_a_batch_breaks(fields: dict, says: str) -> None:
    """A raw batch of 4 pages of 64 bytes, sound but for `fields`: refused by the
    decoder with the rule it breaks; mig_check_batch, which the one-call installer
    applies, refuses it too."""
    data = bytes(range(256))
    sound = {"req_id": 9, "first_page": 0, "count": 4, "encoding": pb.RAW, "raw_len": len(data), "data": data,
             "checksum": digest_of(data)}
    wire = pb.PageBatch(**{**sound, **fields}).SerializeToString()
    with pytest.raises(BatchError) as refused:
        BatchDecoder(8, 64).decode(wire)
    assert says in str(refused.value) and refused.value.req_id == 9
    batch, runs = ffi.new("struct mig_batch *"), ffi.new("uint32_t[]", 8)
    assert lib.mig_parse_batch(wire, len(wire), batch, runs, 8) == 0
    assert lib.mig_check_batch(batch, runs, 8, 64, ffi.new("uint64_t *"), ffi.new("uint32_t *")) != lib.MIG_BATCH_OK
