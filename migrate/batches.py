"""The page-batch wire format, both ends of it.

A batch carries pages [first_page, first_page + count): zero pages as runs,
the other pages raw or as one zstd frame with a content checksum (so a
corrupted frame is refused, never installed). Incompressible data goes raw.
"""
from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import zstandard

from migrate import pages
from migrate._native import ffi, lib
from migrate.bitmap import SharedBitmap
from migrate.errors import os_error
from migrate.proto import migrate_pb2 as pb
from migrate.uffd import FaultReader, InstallStats, install_stats

#: Most pages one urgent request may ask for (a fault's readahead).
MAX_URGENT_PAGES = 64
#: Most pages in one batch (512 KiB of 4 KiB pages). 1 MiB batches moved
#: pages no faster and made faults wait longer behind the bulk stream (p99
#: with bulk on / off: 3.4x vs 2.5x, medians of 9 runs each); larger
#: batches also cost memory on both ends.
MAX_BULK_PAGES = 128
#: Most pages one bulk request may ask for: few requests keep the stream
#: flowing like a push, without a round trip per batch.
MAX_REQUEST_PAGES = 4096
#: Most runs one bulk request may carry: a scattered set (a dirty set, the
#: holes faults leave) travels in few requests, as on the native plane.
MAX_REQUEST_RUNS = 256
#: Compress only when it saves at least this fraction of the bytes.
_WORTH_IT = 0.92


Run = tuple[int, int]  # (first page, count)


def bulk_request(run_id: str, req_id: int, runs: list[Run]) -> pb.BulkRequest:
    """A Pages.Bulk request for `runs`, in order (at most MAX_REQUEST_RUNS runs, MAX_REQUEST_PAGES pages)."""
    (first, count), rest = runs[0], runs[1:]
    return pb.BulkRequest(run_id=run_id, req_id=req_id, first_page=first, count=count,
                          runs=[pb.PageRun(first_page=f, count=c) for f, c in rest])


class BulkRequestError(ValueError):
    """A Pages.Bulk request the source refuses: too large, an empty run, pages out of range."""


def request_runs(req: pb.BulkRequest, page_count: int) -> list[Run]:
    """The runs a Pages.Bulk request asks for, in order; BulkRequestError if it breaks a limit."""
    runs = [(req.first_page, req.count)] if req.count else []
    runs.extend((r.first_page, r.count) for r in req.runs)
    pages = sum(count for _, count in runs)
    if not runs or len(runs) > MAX_REQUEST_RUNS or pages > MAX_REQUEST_PAGES:
        raise BulkRequestError(f"a request for {pages} pages in {len(runs)} runs (at most {MAX_REQUEST_PAGES} "
                               f"pages in {MAX_REQUEST_RUNS} runs)")
    for first, count in runs:
        if count == 0 or first + count > page_count:
            raise BulkRequestError(f"bad page range [{first}, +{count}) for {page_count} pages")
    return runs


class PagesClient:
    """The (de)serializers of a link's Pages.Fetch and Pages.Bulk calls, which count the exact bytes on the wire.

    Replies come back as the serialized PageBatch bytes: BatchDecoder parses
    them in C and installs straight from them, where a protobuf message
    would copy every megabyte twice (into the message, then out of its data
    field). Counting in the (de)serializers is free. Requests are serialized
    one at a time (on one thread, or under the urgent path's call lock) and
    replies received on one thread, so each counter has a single writer.
    The counters outlive the link's reconnects: the calls are made on
    whichever channel it has (SourceLink.bulk; the urgent path's _FetchCall).
    """

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.heard = time.monotonic()  # when the last reply arrived: a link outage starts there

    def bulk(self, channel: grpc.Channel) -> Any:
        """A Pages.Bulk stub on `channel` whose calls count here."""
        return channel.stream_stream("/migrate.v1.Pages/Bulk", request_serializer=self.serialize,
                                     response_deserializer=self.parse)

    @property
    def bytes_wire(self) -> int:
        return self.bytes_sent + self.bytes_received

    def serialize(self, msg: pb.PageRequest | pb.BulkRequest) -> bytes:
        raw = msg.SerializeToString()
        self.bytes_sent += len(raw)
        return raw

    def parse(self, raw: bytes) -> bytes:
        self.bytes_received += len(raw)
        self.heard = time.monotonic()
        return raw


def add_pages_servicer(servicer: Any, server: grpc.Server) -> None:
    """Register a Pages servicer whose methods yield EncodedBatch.wire bytes.

    The bytes go out as they are: no PageBatch message is built and
    serialized again, which would copy every megabyte twice more.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {
        "Fetch": grpc.stream_stream_rpc_method_handler(servicer.Fetch, request_deserializer=pb.PageRequest.FromString),
        "Bulk": grpc.stream_stream_rpc_method_handler(servicer.Bulk, request_deserializer=pb.BulkRequest.FromString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("migrate.v1.Pages", handlers),))


@dataclass(frozen=True)
class EncodedBatch:
    """A PageBatch serialized for the wire, with what its sender counts."""

    wire: bytes
    count: int
    compressed: bool


#: The key of PageBatch.data (field 6, length-delimited) on the wire.
_DATA_KEY = bytes([6 << 3 | 2])


#: The key of PageBatches.batches (field 1, length-delimited) on the wire: a bulk stream's batches
#: are encoded as such fields (BatchEncoder.encode_runs), and any run of them, joined, is a serialized
#: PageBatches.
_BATCHES_KEY = 1 << 3 | 2


def batch_at(message: bytes | memoryview, pos: int) -> tuple[memoryview, int]:
    """The serialized PageBatch in the `batches` field at offset `pos` of a serialized PageBatches, without
    copying it, and the offset after it; BatchError if no such field is there whole."""
    length = ffi.new("uint64_t *")
    with ffi.from_buffer("uint8_t[]", message) as src:
        at = lib.mig_next_field(src, len(message), pos, _BATCHES_KEY, length)
    if at < 0:
        raise BatchError(f"no whole batch at byte {pos} of a {len(message)}-byte bulk message")
    end = at + length[0]
    return memoryview(message)[at:end], end


def unframe(message: bytes | memoryview) -> Iterator[memoryview]:
    """The serialized PageBatch messages in a serialized PageBatches, in order, without copying them;
    BatchError (once those before are yielded) if it is not one."""
    pos = 0
    while pos < len(message):
        raw, pos = batch_at(message, pos)
        yield raw


class BatchError(ValueError):
    """A batch that must not be installed (bad shape, checksum, size).

    `req_id` names the request it answered, None when even that could not
    be read.
    """

    def __init__(self, message: str, req_id: int | None = None) -> None:
        super().__init__(message)
        self.req_id = req_id


class BatchEncoder:
    """Builds PageBatch messages from a guest memory mapping (source side).

    One encoder per thread: zstd contexts are not thread-safe.
    """

    def __init__(self, mem: memoryview, page_size: int, level: int | None) -> None:
        self._mem = mem
        self._page_size = page_size
        self._cctx = None
        if level is not None:
            self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)

    def encode(self, first_page: int, count: int, req_id: int = 0) -> EncodedBatch:
        """Pages [first_page, first_page + count) as one serialized PageBatch.

        Raw batches are serialized natively (pages.encode_batch). For one
        that may be compressed, the small fields are serialized as a message
        and the data field is appended by hand: a parser merges the two, and
        the page bytes are copied once, from the packing buffer into the
        wire bytes.
        """
        if self._cctx is None:
            return EncodedBatch(pages.encode_batch(self._mem, first_page, count, self._page_size, req_id), count,
                                False)
        zero_runs, data, checksum = pages.pack_pages(self._mem, first_page, count, self._page_size)
        header = pb.PageBatch(req_id=req_id, first_page=first_page, count=count, zero_runs=zero_runs,
                              raw_len=len(data), checksum=checksum)
        payload: bytes | memoryview = data
        if len(data):
            packed = self._cctx.compress(data)
            if len(packed) < _WORTH_IT * len(data):
                header.encoding = pb.ZSTD
                payload = packed
        parts: list[bytes | memoryview] = [header.SerializeToString()]
        if len(payload):
            parts += [_DATA_KEY, pages.varint(len(payload)), payload]
        return EncodedBatch(b"".join(parts), count, header.encoding == pb.ZSTD)

    def encode_runs(self, runs: list[Run], req_id: int) -> EncodedBatch:
        """A batch for each run (at most MAX_BULK_PAGES pages each), as one serialized PageBatches: raw, in
        one native call; compressed, a batch at a time."""
        count = sum(n for _, n in runs)
        if self._cctx is None:
            return EncodedBatch(pages.encode_runs(self._mem, runs, self._page_size, req_id, _BATCHES_KEY), count,
                                False)
        parts: list[bytes] = []
        compressed = False
        for first, n in runs:
            batch = self.encode(first, n, req_id)
            parts += [bytes([_BATCHES_KEY]), pages.varint(len(batch.wire)), batch.wire]
            compressed = compressed or batch.compressed
        return EncodedBatch(b"".join(parts), count, compressed)


@dataclass
class InstalledBatch:
    """What BatchDecoder.install put in place, and which request it answered."""

    req_id: int
    count: int
    done: InstallStats


@dataclass
class InstalledBatches:
    """What BatchDecoder.install_batches put in place, and where it stopped."""

    answered: list[tuple[int, int]]  # (req_id, pages) of each batch installed, in order
    done: InstallStats
    pos: int                         # offset of the first batch not installed (the message's length: none)
    error: int                       # why that batch was not: 0 (none), -EBADMSG, -EPROTONOSUPPORT (compressed)


@dataclass
class DecodedBatch:
    req_id: int
    first_page: int
    count: int
    zero_runs: list[int]
    data: bytes | memoryview  # raw batches: a view into the received bytes
    zero_pages: int


#: Most zero_runs values a batch may carry (a batch of N pages needs at most N).
_MAX_RUN_VALUES = 4096


class _ParseBuffers(threading.local):
    def __init__(self) -> None:
        self.batch = ffi.new("struct mig_batch *")
        self.runs = ffi.new("uint32_t[]", _MAX_RUN_VALUES)
        self.stats = ffi.new("struct mig_install_stats *")
        self.data_bytes = ffi.new("uint64_t *")
        self.bad_run = ffi.new("uint32_t *")
        self.dctx = zstandard.ZstdDecompressor()
        self.pos = ffi.new("uint64_t *")
        self.err = ffi.new("int64_t *")
        self.ids = ffi.new("uint64_t[]", 2 * MAX_BULK_PAGES)


class BatchDecoder:
    """Parses, validates and decompresses serialized PageBatch messages (destination side)."""

    def __init__(self, page_count: int, page_size: int) -> None:
        self._page_count = page_count
        self._page_size = page_size
        self._local = _ParseBuffers()

    def install(self, raw: bytes | memoryview, reader: FaultReader, bitmap: SharedBitmap) -> InstalledBatch:
        """Check and install the batch in `raw`; raises BatchError (refused) or OSError.

        A raw batch is parsed, checked and installed by one native call:
        on the urgent path every GIL release costs a wait for the GIL back.
        """
        buf = self._local
        with ffi.from_buffer("uint8_t[]", raw) as src:
            r = lib.mig_install_batch(*reader.target(bitmap), self._page_count, src, len(raw), buf.runs,
                                      _MAX_RUN_VALUES, buf.batch, buf.stats)
        if r == -errno.EPROTONOSUPPORT:  # compressed: decompress here, then install
            batch = self.decode(raw)
            done = reader.install(bitmap, batch.first_page, batch.count, batch.zero_runs, batch.data)
            return InstalledBatch(batch.req_id, batch.count, done)
        if r == -errno.EBADMSG:
            self.decode(raw)  # says what is wrong with it
            raise BatchError("batch refused", buf.batch.req_id)
        if r < 0:
            raise os_error(-r, f"mig_install_batch first_page={buf.batch.first_page} count={buf.batch.count}")
        return InstalledBatch(buf.batch.req_id, buf.batch.count, install_stats(buf.stats))

    def install_batches(self, message: bytes, pos: int, reader: FaultReader, bitmap: SharedBitmap) -> InstalledBatches:
        """Install the raw batches of a serialized PageBatches message from offset `pos` on, in one native call.

        Stops at a batch it cannot install: its offset and error say which
        (install it with `install`, which refuses it or decompresses it);
        raises OSError for an install that failed.
        """
        buf = self._local
        buf.pos[0] = pos
        with ffi.from_buffer("uint8_t[]", message) as src:
            n = lib.mig_install_batches(*reader.target(bitmap), self._page_count, src, len(message), _BATCHES_KEY,
                                        buf.pos, buf.runs, _MAX_RUN_VALUES, buf.batch, buf.ids, MAX_BULK_PAGES,
                                        buf.err, buf.stats)
        err = int(buf.err[0])
        if err < 0 and err not in (-errno.EBADMSG, -errno.EPROTONOSUPPORT):
            raise os_error(-err, f"mig_install_batches first_page={buf.batch.first_page} count={buf.batch.count}")
        ids = buf.ids
        return InstalledBatches([(ids[2 * i], ids[2 * i + 1]) for i in range(n)], install_stats(buf.stats),
                                int(buf.pos[0]), err)

    def decode(self, raw: bytes | memoryview) -> DecodedBatch:
        """The batch in `raw`, checked (shape, size, checksum); raises BatchError."""
        buf = self._local
        with ffi.from_buffer("uint8_t[]", raw) as src:
            r = lib.mig_parse_batch(src, len(raw), buf.batch, buf.runs, _MAX_RUN_VALUES)
        if r < 0:
            raise BatchError("not a PageBatch" if r == -errno.EINVAL else "too many zero runs in a batch")
        b = buf.batch
        first, count, req_id = b.first_page, b.count, b.req_id
        runs = ffi.unpack(buf.runs, b.nzero_runs)
        fault = lib.mig_check_batch(b, buf.runs, self._page_count, self._page_size, buf.data_bytes, buf.bad_run)
        if fault == lib.MIG_BATCH_RANGE:
            raise BatchError(f"batch pages [{first}, {first + count}) outside the guest's {self._page_count} pages",
                             req_id)
        if fault == lib.MIG_BATCH_RUN_PAIRS:
            raise BatchError("zero_runs must hold (start, length) pairs", req_id)
        if fault == lib.MIG_BATCH_RUN:
            start, length = runs[2 * buf.bad_run[0]:2 * buf.bad_run[0] + 2]
            raise BatchError(f"bad zero run ({start}, {length}) in a batch of {count} pages", req_id)
        if fault == lib.MIG_BATCH_SIZE:
            raise BatchError(f"batch declares {b.raw_len} data bytes, its shape needs {buf.data_bytes[0]}", req_id)
        expected = buf.data_bytes[0]
        zero = count - expected // self._page_size
        payload = memoryview(raw)[b.data_off:b.data_off + b.data_len]
        if b.encoding == pb.ZSTD:
            try:
                data: bytes | memoryview = buf.dctx.decompress(payload, max_output_size=expected)
            except zstandard.ZstdError as err:
                raise BatchError(f"corrupt zstd frame: {err}", req_id) from None
        elif b.encoding == pb.RAW:
            data = payload
        else:
            raise BatchError(f"unknown encoding {b.encoding}", req_id)
        if len(data) != expected:
            raise BatchError(f"batch data is {len(data)} bytes, expected {expected}", req_id)
        digest = b.data_digest if b.encoding == pb.RAW else pages.checksum(data)
        if digest != b.checksum:
            raise BatchError(f"checksum mismatch in batch of pages [{first}, {first + count})", req_id)
        return DecodedBatch(req_id, first, count, runs, data, zero)
