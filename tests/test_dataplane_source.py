"""The native data plane's source side and its shared helpers (native/dp_common.c, native/dp_source.c)."""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
import zstandard
from migrate._native import ffi, lib

from migrate import spawn
from migrate.guest.workloads import Workload
from migrate.source.dataplane import DataServer

_M64 = (1 << 64) - 1
_P1, _P2, _P3, _P4 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def reference_digest(data: bytes) -> int:
    """mig_digest as docs/protocol.md ("Digest") defines it, word by word: what the SIMD code must compute."""
    key = [_mix64(_P1 * (j + 1) & _M64) for j in range(32)]  # KEY = key[0:23], SCRAMBLE = key[24:32]
    acc = [_mix64(_P2 * (i + 1) & _M64) for i in range(8)]
    padded = data + bytes(-len(data) % 64)
    for n in range(len(padded) // 64):
        s = n % 16
        for i, (w,) in enumerate(struct.iter_unpack("<Q", padded[64 * n:64 * n + 64])):
            wk = w ^ key[s + i]
            acc[i ^ 1] = (acc[i ^ 1] + w) & _M64
            acc[i] = (acc[i] + (wk & 0xFFFFFFFF) * (wk >> 32)) & _M64
        if s == 15:
            acc = [((a ^ (a >> 47) ^ key[24 + i]) * 0x9E3779B1) & _M64 for i, a in enumerate(acc)]
    f = (len(data) * _P3 + _P4) & _M64
    for a in acc:
        f ^= a
        f = (((f << 27) | (f >> 37)) & _M64) * _P1 & _M64
    return _mix64(f)


@pytest.mark.parametrize("size", [0, 1, 7, 63, 64, 65, 1023, 1024, 1025, 2 * 4096 + 64 * 5 + 3])
def test_digest_is_the_documented_function(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert lib.mig_digest(data, size) == reference_digest(data)


def test_digest_changes_with_any_flipped_byte_and_with_moved_data() -> None:
    page = 4096
    data = bytearray(random.Random(7).randbytes(2 * page))
    whole = lib.mig_digest(bytes(data), len(data))
    for i in range(len(data)):
        data[i] ^= 0x80
        assert lib.mig_digest(bytes(data), len(data)) != whole, i
        data[i] ^= 0x80
    for a, b, n in [(0, page, page), (0, 1024, 1024), (0, 64, 64), (128, 192, 64), (8, 16, 8)]:
        moved = bytearray(data)
        moved[a:a + n], moved[b:b + n] = data[b:b + n], data[a:a + n]
        assert lib.mig_digest(bytes(moved), len(moved)) != whole, (a, b, n)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 63, 64, 65, 100, 1024, 4096, 3 * 4096 + 17])
def test_streaming_digest_equals_digest_of_concatenation(size: int) -> None:
    rnd = random.Random(size)
    data = rnd.randbytes(size)
    whole = lib.mig_digest(data, size)
    for _ in range(10):
        state = ffi.new("struct dp_digest *")
        lib.dp_digest_init(state)
        i = 0
        while i < size:
            piece = data[i:i + rnd.randint(1, 200)]
            lib.dp_digest_update(state, piece, len(piece))
            i += len(piece)
        assert lib.dp_digest_final(state) == whole


def test_zstd_is_found_at_run_time() -> None:
    assert lib.dp_zstd_available() == 1
    assert lib.dp_zstd_why_not() == ffi.NULL


# ---------------------------------------------------------------- the source

PAGE = 4096
NPAGES = 300
HELLO = struct.Struct("<8sII32s")
REPLY = struct.Struct("<8sIIQ")
REQUEST = struct.Struct("<IIQ")
RUN = struct.Struct("<QII")
BATCH = struct.Struct("<IIQIIIIIIQ")
MAGIC = b"MIGDP\0\0\1"
REQ_MAGIC, BATCH_MAGIC = 0x54535152, 0x48435442
BULK, FAULT = 1, 2
KEY = bytes(range(32))


def guest_content() -> bytes:
    """Zero pages (alone and in runs), random pages and text-like pages that compress."""
    rnd = random.Random(11)
    pages = []
    for i in range(NPAGES):
        kind = i % 7
        if kind in (0, 3) or 40 <= i < 60:
            pages.append(bytes(PAGE))
        elif kind == 5:
            pages.append(rnd.randbytes(PAGE))
        else:
            pages.append((b"page %06d of the guest, text that compresses. " % i * 100)[:PAGE])
    return b"".join(pages)


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.write(fd, guest_content())
    yield fd
    os.close(fd)


@pytest.fixture
def server(memfd: int, request: pytest.FixtureRequest) -> Iterator[DataServer]:
    compress = getattr(request, "param", "never")
    with DataServer(memfd, NPAGES * PAGE, PAGE, "127.0.0.1", key=KEY, compress=compress) as srv:
        yield srv


class Client:
    """A destination speaking the wire format (docs/protocol.md, "Native data plane")."""

    def __init__(self, server: DataServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port))
        self.sock.settimeout(60)

    def close(self) -> None:
        self.sock.close()

    def hello(self, key: bytes = KEY, kind: int = BULK, magic: bytes = MAGIC,
              version: int = lib.DP_VERSION) -> tuple[int, int]:
        """(page_size, npages) from the source's reply."""
        self.sock.sendall(HELLO.pack(magic, version, kind, key))
        magic_back, status, page_size, npages = REPLY.unpack(self.read(REPLY.size))
        assert (magic_back, status) == (MAGIC, 0)
        return page_size, npages

    def read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise EOFError(f"the source closed after {len(data)} of {n} bytes")
            data += more
        return data

    def request(self, runs: list[tuple[int, int]], req_id: int = 7) -> None:
        self.sock.sendall(REQUEST.pack(REQ_MAGIC, len(runs), req_id) + b"".join(RUN.pack(f, c, 0) for f, c in runs))

    def batches(self, npages: int) -> list[dict]:
        """Read batches until they cover npages pages; each checked and expanded into its pages."""
        out = []
        while npages > 0:
            magic, encoding, req_id, nruns, pad, count, npairs, raw_len, data_len, checksum = BATCH.unpack(
                self.read(BATCH.size))
            assert magic == BATCH_MAGIC and 0 < count <= 128 and 0 < nruns <= count and pad == 0
            page_runs = self.read(RUN.size * nruns)
            runs = [(first, n) for first, n, _ in RUN.iter_unpack(page_runs)]
            assert sum(n for _, n in runs) == count
            zero_runs = self.read(8 * npairs)
            data = self.read(data_len)
            if encoding == 1:
                params = zstandard.get_frame_parameters(data)
                assert params.has_checksum and params.content_size == raw_len
                data = zstandard.ZstdDecompressor().decompress(data)
            assert len(data) == raw_len
            covered = page_runs + data + zero_runs  # the checksum's order: page runs, raw data, zero runs
            assert lib.mig_digest(covered, len(covered)) == checksum
            pairs = struct.unpack(f"<{2 * npairs}I", zero_runs)
            zero = {start + k for start, n in zip(pairs[::2], pairs[1::2]) for k in range(n)}
            pages, it = [], iter(range(0, raw_len, PAGE))
            for i in range(count):
                pages.append(bytes(PAGE) if i in zero else data[next(it):][:PAGE])
            out.append({"req_id": req_id, "runs": runs, "count": count, "encoding": encoding, "zero": len(zero),
                        "pages": pages, "wire": BATCH.size + RUN.size * nruns + 8 * npairs + data_len})
            npages -= count
        return out

    def closed_by_source(self) -> bool:
        """Does the source close this connection (EOF or reset) before sending anything more?"""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@contextlib.contextmanager
def client(server: DataServer) -> Iterator[Client]:
    c = Client(server)
    try:
        yield c
    finally:
        c.close()


def expected(first: int, count: int) -> list[bytes]:
    content = guest_content()
    return [content[p * PAGE:(p + 1) * PAGE] for p in range(first, first + count)]


def test_wrong_key_is_refused_and_counted_then_the_right_key_works(server: DataServer) -> None:
    with client(server) as bad:
        bad.sock.sendall(HELLO.pack(MAGIC, 1, BULK, bytes(32)))
        assert bad.closed_by_source()
    assert server.counters()["rejected"] == 1
    with client(server) as good:
        assert good.hello() == (PAGE, NPAGES)
        good.request([(0, 1)])
        assert good.batches(1)[0]["pages"] == expected(0, 1)
    assert server.counters()["connections"] == 1


@pytest.mark.parametrize("hello", [dict(magic=b"MIGDP\0\0\2"), dict(version=2), dict(version=4), dict(kind=3),
                                   dict(kind=0)])
def test_a_malformed_hello_is_refused(server: DataServer, hello: dict) -> None:
    with client(server) as c:
        fields = {"magic": MAGIC, "version": lib.DP_VERSION, "kind": BULK, "key": KEY} | hello
        c.sock.sendall(HELLO.pack(fields["magic"], fields["version"], fields["kind"], fields["key"]))
        assert c.closed_by_source()
    assert server.counters()["rejected"] == 1


def test_a_silent_connection_is_dropped_after_the_hello_timeout(server: DataServer) -> None:
    with client(server) as c:
        c.sock.sendall(MAGIC)  # the start of a hello, then nothing
        assert c.closed_by_source()
    assert server.counters()["rejected"] == 1


def test_a_multi_run_request_returns_its_pages_in_order(server: DataServer) -> None:
    runs = [(0, 5), (40, 20), (250, 50), (7, 1), (60, 200)]
    with client(server) as c:
        c.hello()
        c.request(runs, req_id=99)
        got = c.batches(sum(n for _, n in runs))
    assert {b["req_id"] for b in got} == {99}
    assert all(b["encoding"] == 0 for b in got)
    assert [b["runs"] for b in got] == [  # runs in order, many to a batch of at most 128 pages
        [(0, 5), (40, 20), (250, 50), (7, 1), (60, 52)], [(112, 128)], [(240, 20)]]
    pages = [p for b in got for p in b["pages"]]
    assert pages == [p for f, n in runs for p in expected(f, n)]
    counters = server.counters()
    assert counters["requests"] == 1 and counters["pages"] == len(pages)
    assert counters["zero_pages"] == sum(b["zero"] for b in got) == sum(p == bytes(PAGE) for p in pages)
    assert counters["bytes"] == sum(b["wire"] for b in got)


def test_holes_in_the_memfd_are_sent_as_zero_runs_without_being_allocated() -> None:
    """Never-written pages are zero: reading them through the mapping would allocate them at the source."""
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, NPAGES * PAGE)
        written = {5: b"a", 6: b"b", 130: b"c", NPAGES - 1: b"d"}
        for page, fill in written.items():
            os.pwrite(fd, fill * PAGE, page * PAGE)
        blocks = os.fstat(fd).st_blocks
        with DataServer(fd, NPAGES * PAGE, PAGE, "127.0.0.1", key=KEY) as srv, client(srv) as c:
            c.hello()
            c.request([(0, NPAGES), (6, 1)])
            got = [p for b in c.batches(NPAGES + 1) for p in b["pages"]]
            assert srv.counters()["zero_pages"] == NPAGES - len(written)
        assert got == [written.get(i, b"\0") * PAGE for i in range(NPAGES)] + [b"b" * PAGE]
        assert os.fstat(fd).st_blocks == blocks
    finally:
        os.close(fd)


@pytest.fixture
def sparse_server() -> Iterator[DataServer]:
    """The guest's content with its run of zero pages [40, 60) never written: a hole in the memfd."""
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, NPAGES * PAGE)
        content = guest_content()
        os.pwrite(fd, content[:40 * PAGE], 0)
        os.pwrite(fd, content[60 * PAGE:], 60 * PAGE)
        with DataServer(fd, NPAGES * PAGE, PAGE, "127.0.0.1", key=KEY, compress="never") as srv:
            yield srv
    finally:
        os.close(fd)


def test_once_frozen_where_data_lies_is_asked_of_the_memfd_once_for_all_connections(
        sparse_server: DataServer) -> None:
    """SEEK_HOLE walks the file up to its next hole (all of a guest's RAM, once written): a frozen guest's
    data extents are remembered across connections, so a new connection, or a request behind an earlier one
    (a fault, the cursor jumping back), does not walk the file again."""
    server = sparse_server
    server.freeze()
    with client(server) as c:
        c.hello()
        c.request([(NPAGES - 1, 1), (0, NPAGES)])
        assert [p for b in c.batches(NPAGES + 1) for p in b["pages"]] == expected(NPAGES - 1, 1) + expected(0, NPAGES)
    asked = server.counters()["hole_queries"]
    assert asked <= 4  # at pages 299, 0, 40 (the hole, asked again any time) and 60
    with client(server) as c:
        c.hello()
        c.request([(200, 3), (100, 1), (0, 5)])
        assert [p for b in c.batches(9) for p in b["pages"]] == expected(200, 3) + expected(100, 1) + expected(0, 5)
    assert server.counters()["hole_queries"] == asked


def test_a_frozen_memfd_without_holes_is_never_asked_where_its_data_lies(server: DataServer) -> None:
    """Every block allocated (all of RAM written, zero pages too): nothing to find, no walk of the file."""
    server.freeze()
    with client(server) as c:
        c.hello()
        c.request([(NPAGES - 1, 1), (0, NPAGES)])
        assert [p for b in c.batches(NPAGES + 1) for p in b["pages"]] == expected(NPAGES - 1, 1) + expected(0, NPAGES)
    assert server.counters()["hole_queries"] == 0


@pytest.mark.parametrize("server", ["never", "always"], indirect=True)
def test_scattered_one_page_runs_come_back_in_order_128_pages_to_a_batch(server: DataServer) -> None:
    """A scattered set (many one-page runs, in no order) is answered in full batches of many runs each,
    not one batch per run, with every counter exact."""
    rnd = random.Random(3)
    requests = {21: rnd.sample(range(NPAGES), 256), 22: rnd.sample(range(NPAGES), 100)}
    with client(server) as c:
        c.hello()
        for req_id, pages in requests.items():
            c.request([(p, 1) for p in pages], req_id=req_id)
        got = c.batches(sum(len(pages) for pages in requests.values()))
    assert [(b["req_id"], b["count"]) for b in got] == [(21, 128), (21, 128), (22, 100)]
    assert [p for b in got for first, n in b["runs"] for p in range(first, first + n)] == [
        p for pages in requests.values() for p in pages]
    assert all(n == 1 for b in got for _, n in b["runs"])  # each a piece of a run asked for, never two merged
    assert [p for b in got for p in b["pages"]] == [expected(p, 1)[0] for pages in requests.values() for p in pages]
    counters = server.counters()
    compressed = sum(b["encoding"] == 1 for b in got)
    assert counters["requests"] == 2 and counters["pages"] == 356
    assert counters["zero_pages"] == sum(b["zero"] for b in got)
    assert counters["bytes"] == sum(b["wire"] for b in got)
    assert counters["compressed_batches"] == compressed
    assert compressed <= counters["sends"] <= len(got)


@pytest.mark.parametrize("server", ["always"], indirect=True)
def test_compression_always_sends_valid_zstd_frames(server: DataServer) -> None:
    with client(server) as c:
        c.hello()
        c.request([(0, NPAGES - 44)])
        got = c.batches(NPAGES - 44)
    assert [p for b in got for p in b["pages"]] == expected(0, NPAGES - 44)
    assert all(b["encoding"] == 1 for b in got)
    assert server.counters()["compressed_batches"] == len(got)


@pytest.mark.parametrize("server", ["auto"], indirect=True)
def test_auto_never_compresses_for_a_peer_on_this_host(server: DataServer) -> None:
    with client(server) as c:
        c.hello()
        c.request([(0, NPAGES)])
        assert all(b["encoding"] == 0 for b in c.batches(NPAGES))


@pytest.mark.parametrize("server", ["always"], indirect=True)
def test_fault_connections_are_served_raw_and_counted_apart(server: DataServer) -> None:
    with client(server) as c:
        c.hello(kind=FAULT)
        c.request([(1, 1), (2, 16)])
        got = c.batches(17)
    assert [p for b in got for p in b["pages"]] == expected(1, 17)
    assert all(b["encoding"] == 0 for b in got)
    counters = server.counters()
    assert (counters["fault_requests"], counters["fault_pages"], counters["requests"]) == (1, 17, 0)


BAD_REQUESTS = {
    "magic": REQUEST.pack(0x12345678, 1, 0) + RUN.pack(0, 1, 0),
    "no runs": REQUEST.pack(REQ_MAGIC, 0, 0),
    "too many runs": REQUEST.pack(REQ_MAGIC, 257, 0) + RUN.pack(0, 1, 0) * 257,
    "past the end": REQUEST.pack(REQ_MAGIC, 1, 0) + RUN.pack(NPAGES - 1, 2, 0),
    "first page past the end": REQUEST.pack(REQ_MAGIC, 1, 0) + RUN.pack(NPAGES, 1, 0),
    "overflow": REQUEST.pack(REQ_MAGIC, 1, 0) + RUN.pack(2**64 - 1, 2, 0),
    "empty run": REQUEST.pack(REQ_MAGIC, 1, 0) + RUN.pack(0, 0, 0),
    "too many pages": REQUEST.pack(REQ_MAGIC, 2, 0) + RUN.pack(0, 4000, 0) + RUN.pack(0, 97, 0),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_closes_its_connection_and_others_go_on(memfd: int, name: str) -> None:
    with DataServer(memfd, NPAGES * PAGE, PAGE, "127.0.0.1", key=KEY) as big, client(big) as other:
        other.hello()
        with client(big) as c:
            c.hello()
            c.sock.sendall(BAD_REQUESTS[name])
            assert c.closed_by_source()
        other.request([(3, 4)])
        assert [p for b in other.batches(4) for p in b["pages"]] == expected(3, 4)
        assert big.counters()["bad_requests"] == 1


def test_hostile_bytes_never_break_the_server(server: DataServer) -> None:
    rnd = random.Random(3)
    good_request = REQUEST.pack(REQ_MAGIC, 2, 5) + RUN.pack(0, 3, 0) + RUN.pack(100, 2, 0)
    for trial in range(60):
        with client(server) as c:
            if trial % 3 == 0:  # garbage instead of a hello
                c.sock.sendall(rnd.randbytes(rnd.randint(1, 200)))
            else:  # a hello, then garbage or a truncated request, then the client goes away
                c.hello()
                junk = rnd.randbytes(rnd.randint(1, 300)) if trial % 3 == 1 else good_request[:rnd.randint(1, 47)]
                c.sock.sendall(junk)
    with client(server) as c:
        c.hello()
        c.request([(0, 3), (100, 2)])
        assert [p for b in c.batches(5) for p in b["pages"]] == expected(0, 3) + expected(100, 2)


def test_close_returns_with_clients_connected(memfd: int) -> None:
    srv = DataServer(memfd, NPAGES * PAGE, PAGE, "127.0.0.1", key=KEY)
    with client(srv) as idle, client(srv) as silent, client(srv) as reader:
        idle.hello()
        reader.hello()
        reader.request([(0, NPAGES)] * 13)  # more than the sockets hold: the source blocks sending
        srv.close()
        srv.close()
        for c in (idle, silent):
            assert c.closed_by_source()
    assert srv.counters()["connections"] == 2


def test_server_errors_carry_errno_and_context(memfd: int) -> None:
    with pytest.raises(OSError) as err:
        DataServer(memfd, NPAGES * PAGE + 1, PAGE, "127.0.0.1")
    assert err.value.errno == errno.EINVAL and "memfd" in str(err.value)
    with DataServer(memfd, NPAGES * PAGE, PAGE, "127.0.0.1") as first:
        with pytest.raises(OSError) as err:
            DataServer(memfd, NPAGES * PAGE, PAGE, "127.0.0.1", port=first.port)
        assert err.value.errno == errno.EADDRINUSE and str(first.port) in str(err.value)
        assert len(first.key) == 32 and first.endpoint == f"127.0.0.1:{first.port}"


RECEIVER = """
import socket, sys
from migrate._native import lib
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
    print(lib.mig_dp_raw_recv(s.fileno(), int(sys.argv[2])))
"""


def test_raw_baseline_moves_bytes_between_two_processes() -> None:
    total = 64 << 20
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)  # a receiver that cannot start must fail the test, not hang it
        proc = subprocess.Popen([sys.executable, "-P", "-c", RECEIVER, str(listener.getsockname()[1]), str(total)],
                                stdout=subprocess.PIPE, text=True, env=spawn.child_env())
        conn, _ = listener.accept()
        with conn:
            buf = bytes(1 << 20)
            assert lib.mig_dp_raw_send(conn.fileno(), buf, len(buf), total) == total
        out, _ = proc.communicate(timeout=120)
    assert int(out) == total


def test_pages_of_a_guest_writing_meanwhile_always_match_their_checksum(memfd: int) -> None:
    """Pre-copy reads a guest that keeps writing: a live server copies each page before its
    checksum, so no batch is ever torn between checksum and send (the destination would refuse
    it again and again); the copy may be stale, which the next dirty scan catches."""
    size = NPAGES * PAGE
    ram = mmap.mmap(memfd, size, mmap.MAP_SHARED)
    writer = Workload(ram, workload="random-write", seed=3, ops=1 << 40, threads=2, ops_per_sec=0, page_size=PAGE)
    writer.start()
    try:
        with DataServer(memfd, size, PAGE, "127.0.0.1", key=KEY) as srv:
            c = Client(srv)
            try:
                c.hello()
                for _ in range(20):
                    c.request([(0, NPAGES)])
                    c.batches(NPAGES)  # asserts each batch's checksum
            finally:
                c.close()
    finally:
        writer.close()
        ram.close()
