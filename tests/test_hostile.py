"""Hostile clients that send nothing wrong: abandoned and idle streams, slow calls, floods.

Where tests/test_fuzz.py checks what an agent does with bad messages, this
checks what it does with too many good ones, or ones left hanging: no call
may pin a worker for good, a bound says RESOURCE_EXHAUSTED with a reason,
control calls keep answering, and a bulk page server never outlives its
agent. Loopback only; every test bounded in calls and in time.
"""
from __future__ import annotations

import mmap
import os
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator

import grpc
import pytest
from conftest import descendants

from migrate import rpc, spawn, validate
from migrate.admission import CallClass
from migrate.agent import CALLS as AGENT_CALLS
from migrate.local import LocalAgent, read_first_line, wait_for
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc
from migrate.security import Credentials
from migrate.source.bulk_server import CALLS as BULK_CALLS

PAGE = mmap.PAGESIZE
TOKEN = "hostile-test-token"
CREDS = Credentials(token=TOKEN)
#: Deadline of any one call here: far above what it needs, so only a hang reaches it.
CALL_TIMEOUT = 20.0
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
PAGE_STREAMS = next(c for c in AGENT_CALLS if c.name == "page streams")
SLOW = next(c for c in AGENT_CALLS if c.name == "slow control calls")
BULK_STREAMS = BULK_CALLS[0]
#: The largest bulk request (pages); the server splits it into many batches.
BIG_REQUEST = 4096


class OpenStream:
    """A Pages stream whose requests the test sends one at a time (or never)."""

    def __init__(self, channel: grpc.Channel, method: str, timeout: float = 120.0) -> None:
        self._requests: queue.Queue = queue.Queue()
        reply = pb.PageBatches if method == "Bulk" else pb.PageBatch
        multi = channel.stream_stream(f"/migrate.v1.Pages/{method}", request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=reply.FromString)
        self.call = multi(iter(self._requests.get, None), metadata=rpc.METADATA, timeout=timeout)

    def ask(self, request: object) -> pb.PageBatch:
        """The first batch of the reply."""
        self._requests.put(request)
        reply = next(self.call)
        return reply.batches[0] if isinstance(reply, pb.PageBatches) else reply

    def close(self) -> None:
        self.call.cancel()
        self._requests.put(None)  # ends the request iterator gRPC's thread reads


def first_ended(streams: list[OpenStream], timeout: float = CALL_TIMEOUT) -> grpc.Call:
    """The first of `streams` to end (the refused one), waiting at most `timeout`."""
    ended: queue.Queue = queue.Queue()
    for s in streams:
        s.call.add_done_callback(ended.put)
    return ended.get(timeout=timeout)


def hello(stub: pb_grpc.ControlStub) -> grpc.StatusCode:
    """Hello within its usual 5 s deadline."""
    try:
        stub.Hello(pb.HelloRequest(), metadata=rpc.METADATA, timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


@pytest.fixture
def source(tmp_path) -> Iterator[LocalAgent]:
    """A source agent that wants a token: every stream below is an authenticated one."""
    with LocalAgent("source", log_path=str(tmp_path / "source.log"), env=CREDS.env()) as agent:
        yield agent


@pytest.fixture
def channel(source) -> Iterator[grpc.Channel]:
    ch = rpc.channel(source.address, purpose="hostile", credentials=CREDS)
    yield ch
    ch.close()


@pytest.fixture
def bulk_run(source, channel) -> Iterator[tuple[str, str]]:
    """(run id, bulk server address) of a small guest switched over on the source."""
    control = pb_grpc.ControlStub(channel)
    spec = pb.GuestSpec(size=BIG_REQUEST * PAGE, workload="idle", ops=0, page_size=PAGE)
    control.LaunchGuest(pb.LaunchGuestRequest(name="h", spec=spec), metadata=rpc.METADATA, timeout=CALL_TIMEOUT)
    prep = control.PrepareOutgoing(pb.PrepareOutgoingRequest(name="h"), metadata=rpc.METADATA, timeout=CALL_TIMEOUT)
    control.Switchover(pb.RunRef(run_id=prep.run_id), metadata=rpc.METADATA, timeout=CALL_TIMEOUT)
    try:
        yield prep.run_id, validate.endpoint_with_port(source.address, prep.bulk_endpoint)
    finally:
        control.AbortOutgoing(pb.RunRef(run_id=prep.run_id), metadata=rpc.METADATA, timeout=CALL_TIMEOUT)
        control.StopGuest(pb.GuestRef(name="h"), metadata=rpc.METADATA, timeout=CALL_TIMEOUT)


# ------------------------------------------------------------ bulk server
def served_after_refusals(open_stream, request: object, tries: int = 50) -> pb.PageBatch:
    """A batch from a new stream; a stream refused because others are still being
    released (RESOURCE_EXHAUSTED) is opened again, a bounded number of times."""
    for _ in range(tries):
        stream = open_stream()
        try:
            return stream.ask(request)
        except grpc.RpcError as err:
            if err.code() != RE:
                raise
            threading.Event().wait(0.1)
        finally:
            stream.close()
    raise AssertionError(f"still refused after {tries} tries")


def test_cancelled_bulk_streams_free_their_workers(bulk_run) -> None:
    """Streams cancelled while the server waits for their next request come back: before,
    each pinned a worker for good, and the fifth stream was never served."""
    run_id, bulk = bulk_run
    ch = rpc.channel(bulk, purpose="hostile-bulk", credentials=CREDS)
    try:
        for i in range(BULK_STREAMS.total + 4):  # more than the server ever runs at once
            req = pb.BulkRequest(run_id=run_id, first_page=i, count=1, req_id=i)
            batch = served_after_refusals(lambda: OpenStream(ch, "Bulk", timeout=CALL_TIMEOUT), req)
            assert (batch.first_page, batch.count) == (i, 1)
    finally:
        ch.close()


def test_a_bulk_stream_that_ends_is_served_to_its_last_request(bulk_run) -> None:
    """More batches asked for than the server queues, then the end of the requests: every batch comes."""
    run_id, bulk = bulk_run
    requests = [pb.BulkRequest(run_id=run_id, first_page=0, count=BIG_REQUEST, req_id=i) for i in range(3)]
    ch = rpc.channel(bulk, purpose="hostile-bulk", credentials=CREDS)
    try:
        multi = ch.stream_stream("/migrate.v1.Pages/Bulk", request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=pb.PageBatches.FromString)
        messages = list(multi(iter(requests), metadata=rpc.METADATA, timeout=CALL_TIMEOUT))
    finally:
        ch.close()
    assert sum(b.count for m in messages for b in m.batches) == 3 * BIG_REQUEST


def test_idle_bulk_streams_are_bounded_per_peer(bulk_run) -> None:
    run_id, bulk = bulk_run
    ch = rpc.channel(bulk, purpose="hostile-bulk", credentials=CREDS)
    streams = [OpenStream(ch, "Bulk") for _ in range(BULK_STREAMS.per_peer + 1)]
    try:
        refused = first_ended(streams)
        assert refused.code() == RE
        assert f"too many bulk streams from 127.0.0.1: {BULK_STREAMS.per_peer}" in refused.details()
    finally:
        for s in streams:
            s.close()
        ch.close()


def test_bulk_server_dies_with_its_agent(tmp_path) -> None:
    """kill -9 of the source agent takes its bulk server along at once, even with a stream open on it."""
    log = tmp_path / "source.log"
    with LocalAgent("source", log_path=str(log)) as agent:
        ch = rpc.channel(agent.address, purpose="hostile")
        control = pb_grpc.ControlStub(ch)
        spec = pb.GuestSpec(size=64 * PAGE, workload="idle", ops=0, page_size=PAGE)
        control.LaunchGuest(pb.LaunchGuestRequest(name="k", spec=spec), metadata=rpc.METADATA, timeout=CALL_TIMEOUT)
        prep = control.PrepareOutgoing(pb.PrepareOutgoingRequest(name="k"), metadata=rpc.METADATA,
                                       timeout=CALL_TIMEOUT)
        [bulk_pid] = [p for p in descendants(agent.pid) if b"bulk_server" in open(f"/proc/{p}/cmdline", "rb").read()]
        bulk_ch = rpc.channel(validate.endpoint_with_port(agent.address, prep.bulk_endpoint), purpose="hostile-bulk")
        stream = OpenStream(bulk_ch, "Bulk")  # idle: its worker waits for a request
        try:
            wait_for(lambda: hello(control) == grpc.StatusCode.OK, CALL_TIMEOUT)
            os.kill(agent.pid, signal.SIGKILL)
            assert wait_for(lambda: not spawn.alive(bulk_pid), 10), "the bulk server outlived its agent"
        finally:
            stream.close()
            bulk_ch.close()
            ch.close()
    assert "Traceback" not in log.read_text()


def test_bulk_server_whose_agent_stopped_listening_exits_quietly() -> None:
    """Stdin's EOF stops it; with its stdout's reader gone too it exits 0 and says nothing on stderr."""
    fd = os.memfd_create("hostile", 0)
    os.ftruncate(fd, 16 * PAGE)
    try:
        proc = subprocess.Popen(
            spawn.module_argv("migrate.source.bulk_server", "--memfd", str(fd), "--size", str(16 * PAGE),
                              "--page-size", str(PAGE), "--run-id", "r", "--listen", "127.0.0.1:0"),
            pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=spawn.child_env())
    finally:
        os.close(fd)
    assert '"port"' in read_first_line(proc, CALL_TIMEOUT)
    proc.stdout.close()  # the reader of its last line is gone
    proc.stdin.close()
    try:
        assert proc.wait(timeout=CALL_TIMEOUT) == 0
    finally:
        proc.kill()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


# ------------------------------------------------------------------ agent
def test_idle_fetch_streams_leave_control_calls_answering(channel) -> None:
    """More idle urgent streams than a peer may hold: the one too many is refused at once, and
    Hello answers within its deadline (before, eight idle streams took every worker)."""
    control = pb_grpc.ControlStub(channel)
    streams = [OpenStream(channel, "Fetch") for _ in range(PAGE_STREAMS.per_peer + 1)]
    try:
        refused = first_ended(streams)
        assert refused.code() == RE
        assert f"too many page streams from 127.0.0.1: {PAGE_STREAMS.per_peer} in progress" in refused.details()
        assert hello(control) == grpc.StatusCode.OK
        assert control.ListGuests(pb.ListGuestsRequest(), metadata=rpc.METADATA, timeout=5) is not None
    finally:
        for s in streams:
            s.close()
    # Their slots come back: a new stream is served (NOT_FOUND: no such run, but admitted).
    with pytest.raises(grpc.RpcError) as err:
        served_after_refusals(lambda: OpenStream(channel, "Fetch", timeout=CALL_TIMEOUT),
                              pb.PageRequest(run_id="0" * 32, first_page=0, count=1))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_prepares_towards_a_silent_source_leave_control_calls_answering(tmp_path) -> None:
    """Prepares that each wait out the connect timeout: past the per-peer bound they are refused
    at once, and quick control calls keep their own workers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts nothing: the HTTP/2 handshake never completes
    endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
    spec = pb.GuestSpec(size=16 * PAGE, workload="idle", ops=0, page_size=PAGE)
    results: queue.Queue = queue.Queue()
    with LocalAgent("dest", log_path=str(tmp_path / "dest.log")) as dest:
        ch = rpc.channel(dest.address)
        control = pb_grpc.ControlStub(ch)

        def prepare(i: int) -> None:
            req = pb.PrepareIncomingRequest(run_id=f"{i:032x}", name=f"s{i}", spec=spec, source_endpoint=endpoint,
                                            bulk_endpoint=endpoint)
            try:
                control.PrepareIncoming(req, metadata=rpc.METADATA, timeout=60)
                results.put((grpc.StatusCode.OK, ""))
            except grpc.RpcError as err:
                results.put((err.code(), err.details()))

        threads = [threading.Thread(target=prepare, args=(i,)) for i in range(2 * SLOW.per_peer)]
        try:
            for t in threads:
                t.start()
            code, details = results.get(timeout=CALL_TIMEOUT)  # the first to end: one refused
            assert code == RE, details
            assert f"too many slow control calls from 127.0.0.1: {SLOW.per_peer}" in details
            assert hello(control) == grpc.StatusCode.OK
        finally:
            for t in threads:
                t.join(timeout=120)
            ch.close()
            silent.close()
    codes = [code] + [results.get_nowait()[0] for _ in range(len(threads) - 1)]
    assert set(codes) <= {RE, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes.count(grpc.StatusCode.UNAVAILABLE) <= SLOW.per_peer


def test_floods_are_answered_and_leave_the_agent_serving(source, channel) -> None:
    """Hundreds of calls at once, with and without the token, and streams opened and
    dropped at once: every call ends with an answer, and the agent serves on."""
    control = pb_grpc.ControlStub(channel)
    anonymous = rpc.channel(source.address, purpose="anonymous", credentials=Credentials())
    try:
        calls = [control.Hello.future(pb.HelloRequest(), metadata=rpc.METADATA, timeout=60) for _ in range(200)]
        calls += [pb_grpc.ControlStub(anonymous).Hello.future(pb.HelloRequest(), metadata=rpc.METADATA, timeout=60)
                  for _ in range(200)]
        codes = {c.code() for c in calls}
        assert codes <= {grpc.StatusCode.OK, RE, grpc.StatusCode.UNAUTHENTICATED}, codes
        assert grpc.StatusCode.UNAUTHENTICATED in codes
        for _ in range(100):
            OpenStream(channel, "Fetch").close()
        assert hello(control) == grpc.StatusCode.OK
    finally:
        anonymous.close()
    with pytest.raises(grpc.RpcError) as err:
        served_after_refusals(lambda: OpenStream(channel, "Fetch", timeout=CALL_TIMEOUT),
                              pb.PageRequest(run_id="0" * 32, first_page=0, count=1))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -------------------------------------------------------------- admission
def test_a_full_class_refuses_at_once() -> None:
    """Past a class's total bound a call is refused before it takes a worker."""
    release = threading.Event()

    def wait(request_iterator, context):
        release.wait(CALL_TIMEOUT)
        return iter(())

    cls = CallClass("test streams", ("/t.S/",), per_peer=10, total=2)
    server = rpc.server([cls], credentials=Credentials())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.S", {"Wait": grpc.stream_stream_rpc_method_handler(wait)}),))
    port = rpc.bind(server, "127.0.0.1:0", credentials=Credentials())
    server.start()
    ch = rpc.channel(f"127.0.0.1:{port}", credentials=Credentials())
    try:
        multi = ch.stream_stream("/t.S/Wait")
        calls = [multi(iter(()), metadata=rpc.METADATA, timeout=CALL_TIMEOUT) for _ in range(cls.total + 1)]
        ended: queue.Queue = queue.Queue()
        for c in calls:
            c.add_done_callback(ended.put)
        refused = ended.get(timeout=CALL_TIMEOUT)
        assert refused.code() == RE
        assert "server busy: 2 test streams in progress" in refused.details()
        release.set()
        assert all(c.code() in (grpc.StatusCode.OK, RE) for c in calls)
    finally:
        release.set()
        ch.close()
        server.stop(0).wait()
