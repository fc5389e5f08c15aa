"""The gRPC fault path's requests (migrate.dest.faults.FaultServer), without a source: what each
fault asks for, in how many messages, and when the fault loop needs to look again soon; and the
whole path (FaultLoop) serving a guest from a Fetch server in this process."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import grpc
import pytest
from test_dataplane_dest import paused, restored  # noqa: F401 - restored: a fixture

from migrate import rpc, spawn
from migrate.batches import BatchEncoder, add_pages_servicer
from migrate.bitmap import SharedBitmap
from migrate.dest import bulk
from migrate.dest.faults import NEIGHBOURHOOD, FaultLoop, FaultServer
from migrate.guest.process import GuestSpec
from migrate.local import LocalAgent
from migrate.source.outgoing import UrgentPages

PAGES = 1024


@contextmanager
def fault_server(asked: SharedBitmap | None = None) -> Iterator[tuple[FaultServer, list[tuple[int, int]]]]:
    """A FaultServer over PAGES missing pages, and the (first_page, count) of each request it sends."""
    received = SharedBitmap.create(PAGES)
    mem = SimpleNamespace(bitmap=received, page_count=PAGES, page_size=4096,
                          io=SimpleNamespace(regions=[SimpleNamespace(first_page=0, pages=PAGES)]))
    sent: list[tuple[int, int]] = []
    server = FaultServer(mem, SimpleNamespace(), "run", jump=lambda page: None,
                         send=lambda msg: sent.append((msg.first_page, msg.count)), asked=asked)
    try:
        yield server, sent
    finally:
        server.close()
        received.close()


def test_a_fault_and_its_neighbours_next_to_it_go_in_one_request():
    """A clustered fault asks for its page with the missing neighbours right next to it in one
    request (one message each way, one install), the rest of its block apart."""
    with fault_server() as (server, sent):
        server.on_faults([(100, 1, 0)])  # scattered: the page alone
        assert sent == [(100, 1)]
        sent.clear()
        server.on_faults([(90, 1, 0)])  # clustered: its block [80, 96), the page in it
        assert sent == [(80, NEIGHBOURHOOD)]
        assert [f[0] for f in server._waiting[server._covers[90]]] == [90]
        sent.clear()
        server.on_faults([(120, 1, 0)])  # clustered: its block [112, 128), page 100's neighbours apart
        assert sent == [(112, NEIGHBOURHOOD)]
        assert server.counters["prefetched"] == 2 * (NEIGHBOURHOOD - 1) and server.counters["requests"] == 3


def test_a_sequential_readers_fault_carries_at_most_a_neighbourhood_with_it():
    """The readahead after a fault joins the fault's request up to NEIGHBOURHOOD pages (its reply
    stays small); the rest goes in requests of its own."""
    with fault_server() as (server, sent):
        server.on_faults([(200, 1, 0)])
        sent.clear()
        server.on_faults([(201, 1, 0)])  # where the reader was expected: the readahead doubles
        assert sent == [(201, NEIGHBOURHOOD), (201 + NEIGHBOURHOOD, NEIGHBOURHOOD + 1)]


def test_the_fault_loop_polls_only_for_faults_another_path_may_answer():
    """With the bulk path's `asked` bitmap, a fault waiting for its own urgent reply is closed by the
    receiver: the fault loop need not wake every millisecond for it; one waiting for a page the bulk
    has in flight, or any fault without that bitmap, keeps it looking."""
    asked = SharedBitmap.create(PAGES)
    try:
        with fault_server(asked) as (server, sent):
            server.on_faults([(100, 1, 0)])
            assert sent == [(100, 1)] and asked.test(100)
            assert not server.resolve_arrived()
            asked.set_range(500, 1)  # the bulk asked it
            server.on_faults([(500, 1, 0)])
            assert sent == [(100, 1)]
            assert server.resolve_arrived()
    finally:
        asked.close()
    with fault_server() as (server, sent):
        server.on_faults([(100, 1, 0)])
        assert server.resolve_arrived()


def test_the_grpc_bulk_path_signals_installs_and_write_offs_while_faults_wait(monkeypatch):
    """The gRPC plane's bulk path wakes a gRPC fault loop as the native one does: its installs
    and its write-offs (the faults then ask for their pages themselves) signal installed_fd,
    only while faults wait for its pages."""
    monkeypatch.setattr(bulk, "SourceLink", lambda *args: SimpleNamespace(close=lambda: None))
    received = SharedBitmap.create(PAGES)
    loop = bulk.BulkLoop(SimpleNamespace(bitmap=received), "127.0.0.1:1", "run", 1.0)
    try:
        loop._installed.signal()
        with pytest.raises(BlockingIOError):
            os.eventfd_read(loop.installed_fd)
        loop.watch(1)
        loop._installed.signal()
        loop._installed.signal()
        assert os.eventfd_read(loop.installed_fd) == 2
        signals = []
        monkeypatch.setattr(bulk, "BatchDecoder", lambda *args: None)
        mem = SimpleNamespace(page_count=PAGES, page_size=4096)
        puller = bulk.BulkPuller(mem, loop.planner, SimpleNamespace(client=SimpleNamespace(bytes_wire=0)), "run", 0,
                                 on_install=lambda: signals.append(1))
        puller.write_off_inflight()
        assert signals == [1]
    finally:
        loop.stop()
        received.close()


class _Fetch:
    """Pages.Fetch over a copy of a source's memory: the urgent path's peer, without an agent."""

    def __init__(self, mem: bytes) -> None:
        self._encoder = BatchEncoder(memoryview(mem), mmap.PAGESIZE, None)

    def Fetch(self, requests, context):
        for req in requests:
            yield self._encoder.encode(req.first_page, req.count, req.req_id).wire

    def Bulk(self, requests, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "urgent requests only")


def test_the_grpc_fault_path_serves_a_guest_from_its_two_threads(memfds, restored, reference_digest):  # noqa: F811
    """The urgent path runs on two threads of its own, each doing its own gRPC I/O on the Fetch call
    (dest/faults.py): the fault thread reads the faults and sends the requests, the reply thread
    receives and installs the replies; no thread of ours or gRPC's hands them messages, and none is
    left once it stopped; both run at spawn.URGENT_NICE. The guest, faulting on every page it reads,
    ends with its memory whole."""
    spec = GuestSpec(size=16 << 20, workload="random-read", seed=13, ops=20_000, threads=1)
    with paused(memfds, spec) as (src_fd, state):
        with mmap.mmap(src_fd, spec.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            fetch = _Fetch(bytes(m))
        server = rpc.server()
        add_pages_servicer(fetch, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        guest = restored(spec, memfds(spec.size))
        # Not ours: the Fetch server's threads, and gRPC's own (a channel's connectivity watcher, "(_run)").
        ours = lambda: {t for t in threading.enumerate()  # noqa: E731
                        if not t.name.startswith("grpc") and not t.name.endswith("(_run)")}
        before = ours()
        faults = FaultLoop(guest.mem, f"127.0.0.1:{port}", "run", jump=lambda page: None, recovery_timeout=10)
        try:
            guest.proc.resume(state)
            assert guest.proc.wait_finished(300)
            during = sorted(t.name for t in ours() - before)
            nice = {os.getpriority(os.PRIO_PROCESS, t.native_id) for t in ours() - before}
            digest = guest.proc.digest(timeout=300)  # faults in every page still missing
        finally:
            faults.stop()
            server.stop(0).wait()
    assert during == ["urgent-faults", "urgent-replies"]
    assert nice == ({spawn.URGENT_NICE} if may_lower_niceness() else {os.getpriority(os.PRIO_PROCESS, 0)})
    assert ours() - before == set()
    last = faults.last
    assert "error" not in last and last["faults"] > 0 and last["latency_us"]["count"] > 0
    assert digest == reference_digest(spec)


def may_lower_niceness() -> bool:
    """Whether this process may lower a thread's niceness (root, CAP_SYS_NICE, RLIMIT_NICE); tried on a
    throwaway thread."""
    allowed = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, spawn.URGENT_NICE)
            allowed.append(True)
        except OSError:
            allowed.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return allowed[0]


def test_the_sources_urgent_handler_runs_above_the_bulk_and_gives_its_thread_back():
    """Pages.Fetch serves on a gRPC pool thread at spawn.URGENT_NICE (the bulk threads keep the agent's
    niceness, so an urgent reply must not wait behind them), and the thread goes back to the pool at its
    niceness from before."""
    seen: list[int] = []

    def requests() -> Iterator:
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))  # 0: the calling thread
        yield from ()

    def serve() -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))
        assert list(UrgentPages(runs=None).Fetch(requests(), context=None)) == []
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))

    pool_thread = threading.Thread(target=serve)
    pool_thread.start()
    pool_thread.join()
    before, serving, after = seen
    assert serving == (spawn.URGENT_NICE if may_lower_niceness() else before)
    assert after == before


def _epoll_descriptors(pid: int) -> int:
    fds = f"/proc/{pid}/fd"
    return sum(os.readlink(f"{fds}/{fd}") == "anon_inode:[eventpoll]" for fd in os.listdir(fds))


def test_agents_poll_only_their_own_calls_sockets_and_clients_keep_epoll(monkeypatch) -> None:
    """An agent's gRPC polls with "poll" (migrate/__init__.py): with epoll1, which polls with an epoll
    descriptor, a destination's Control server thread read the urgent stream's replies and handed each
    to the urgent path's poller. A client keeps epoll1 (under "poll" an idle channel is watched by
    nobody: after its agent restarted, its next call went out on the dead connection)."""
    monkeypatch.delenv("GRPC_POLL_STRATEGY", raising=False)
    with LocalAgent("dest") as agent:
        assert _epoll_descriptors(agent.pid) == 0
    client = subprocess.run([sys.executable, "-P", "-c", "import os, migrate; print(os.environ.get("
                             "'GRPC_POLL_STRATEGY', 'default'))"], env=spawn.child_env(), capture_output=True,
                            text=True, timeout=60, check=True)
    assert client.stdout.strip() == "default"


def test_the_grpc_planes_bulk_yields_to_faults_by_policy_at_the_agents_niceness():
    """spawn.yield_cpu_to_urgent_work (the gRPC plane's bulk server and destination bulk threads) asks for
    SCHED_BATCH and keeps the caller's niceness: niced, the guests a drain had moved (nice 0) took most
    of a core from the bulk, so the bulk competes with them as an equal while faults stay raised above."""
    seen: list[tuple[int, int]] = []

    def bulk() -> None:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        spawn.yield_cpu_to_urgent_work()
        seen.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0) - before))

    t = threading.Thread(target=bulk)
    t.start()
    t.join()
    assert seen == [(os.SCHED_BATCH, 0)]
