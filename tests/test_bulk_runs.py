"""Pages.Bulk with scattered page sets: many runs in one request, answered as one stream.

The gRPC plane's requests carry up to 256 runs / 4096 pages, like the
native plane's; the bulk server answers the runs in order, each as batches
of contiguous pages, several short batches per PageBatches message.
"""
from __future__ import annotations

import mmap
import random

import grpc
import pytest

from migrate import pages, rpc
from migrate.batches import MAX_REQUEST_PAGES, MAX_REQUEST_RUNS, BatchDecoder, add_pages_servicer, bulk_request, unframe
from migrate.proto import migrate_pb2 as pb
from migrate.source.bulk_server import CALLS, BulkPages

PAGE = mmap.PAGESIZE
NPAGES = 8192
RUN_ID = "runs-test"


@pytest.fixture(scope="module")
def ram() -> bytes:
    """Guest RAM: random pages, every third one zero."""
    rng = random.Random(3)
    return b"".join(bytes(PAGE) if p % 3 == 0 else rng.randbytes(PAGE) for p in range(NPAGES))


@pytest.fixture(params=["never", "always"])
def bulk(ram: bytes, request: pytest.FixtureRequest):
    """A bulk server over `ram`, raw or compressing every batch; a function that streams requests to it."""
    server = rpc.server(CALLS)
    add_pages_servicer(BulkPages(memoryview(ram), PAGE, RUN_ID, 1, request.param, 2), server)
    port = rpc.bind(server, "127.0.0.1:0")
    server.start()
    channel = rpc.channel(f"127.0.0.1:{port}", purpose="test-bulk-runs")
    call = channel.stream_stream("/migrate.v1.Pages/Bulk", request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=lambda raw: raw)
    try:
        yield lambda requests: list(call(iter(requests), metadata=rpc.METADATA, timeout=60))
    finally:
        channel.close()
        server.stop(0).wait()


def scattered_runs(rng: random.Random, nruns: int, most: int) -> list[tuple[int, int]]:
    """`nruns` disjoint runs over all of RAM, in random order, each 1..most pages."""
    starts = sorted(rng.sample(range(0, NPAGES, most + 1), nruns))
    runs = [(s, rng.randint(1, most)) for s in starts]
    rng.shuffle(runs)
    return runs


def test_a_request_of_many_runs_is_served_in_order_with_the_right_pages(bulk, ram: bytes) -> None:
    runs = scattered_runs(random.Random(1), MAX_REQUEST_RUNS, 15)
    requests = [bulk_request(RUN_ID, 7, runs), bulk_request(RUN_ID, 8, [(NPAGES - 1, 1)])]
    decoder = BatchDecoder(NPAGES, PAGE)
    got: list[tuple[int, int, int]] = []  # (req_id, first, count) of each batch, in arrival order
    messages = bulk(requests)
    for message in messages:
        for raw in unframe(message):
            b = decoder.decode(raw)
            assert pages.expand_pages(b.count, PAGE, b.zero_runs, b.data) == \
                ram[b.first_page * PAGE:(b.first_page + b.count) * PAGE]
            got.append((b.req_id, b.first_page, b.count))
    assert got == [(7, first, count) for first, count in runs] + [(8, NPAGES - 1, 1)]
    assert any(b.zero_pages for b in map(decoder.decode, unframe(messages[0])))  # zero pages travel as runs
    assert len(messages) < len(got) / 4  # short batches share a message


def test_a_long_run_is_split_into_batches(bulk) -> None:
    decoder = BatchDecoder(NPAGES, PAGE)
    messages = bulk([bulk_request(RUN_ID, 1, [(100, MAX_REQUEST_PAGES)])])
    batches = [decoder.decode(raw) for m in messages for raw in unframe(m)]
    assert [(b.first_page, b.count) for b in batches] == [(100 + 128 * i, 128) for i in range(32)]


@pytest.mark.parametrize("runs, says", [
    ([(NPAGES - 2, 3)], "bad page range"),                          # past the end of RAM
    ([(0, 1), (5, 0)], "bad page range"),                           # an empty run
    ([(2 * i, 1) for i in range(MAX_REQUEST_RUNS + 1)], "runs"),    # too many runs
    ([(0, MAX_REQUEST_PAGES), (NPAGES - 1, 1)], "pages"),           # too many pages
])
def test_a_request_out_of_bounds_is_refused(bulk, runs: list[tuple[int, int]], says: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        bulk([bulk_request(RUN_ID, 1, runs)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in err.value.details()


def test_nothing_asked_is_refused(bulk) -> None:
    with pytest.raises(grpc.RpcError) as err:
        bulk([pb.BulkRequest(run_id=RUN_ID, req_id=1)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
