"""Hostile input against real agents: every servicer, random and boundary messages.

Messages are built from the protobuf descriptors, so every field of every
request is covered, including ones added later. The oracle: each call ends
within its timeout with a status code that names the problem (never UNKNOWN,
the mark of an unhandled exception, nor INTERNAL), and the agent still
answers Hello afterwards. Out-of-order calls get their own scenarios, and so
does the Firecracker handshake socket.

Deterministic (hypothesis derandomized), agents shared by the whole module;
every guest an example creates is stopped after it.
"""
from __future__ import annotations

import array
import json
import mmap
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate import rpc
from migrate.local import LocalAgent
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc

PAGE = mmap.PAGESIZE
CALL_TIMEOUT = 30.0
#: Codes that mean "handled": anything but a crash (UNKNOWN, INTERNAL) or a hang (DEADLINE_EXCEEDED).
HANDLED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ------------------------------------------------------------- strategies
U64 = st.one_of(st.sampled_from([0, 1, 255, 256, 257, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]),
                st.integers(0, 2**64 - 1))
U32 = st.one_of(st.sampled_from([0, 1, 16, 64, 65, 256, 257, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
I64 = st.integers(-2**63, 2**63 - 1)
DOUBLE = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.one_of(st.sampled_from(["", "a", "vm1", "a" * 64, "a" * 65, "../../etc", "-x", "a\x00b", "é" * 40,
                                  "0" * 32, "127.0.0.1:1", "[::1]:0", "host:99999"]),
                 st.text(max_size=100))
BLOB = st.one_of(st.sampled_from([b"", b"{}", b"[]", b"null", b"{", b"\xff\xfe", b"[" * 5000, b'{"threads": 7}']),
                 st.binary(max_size=512))
#: GuestSpec fields a valid-looking spec would make expensive: keep real guests small.
SPEC_FIELDS = {
    "size": st.one_of(st.sampled_from([0, 1, PAGE - 1, PAGE + 1, 2**40, 2**63, 2**64 - 1]),
                      st.integers(0, 64).map(lambda n: n * PAGE)),
    "page_size": st.sampled_from([0, 1, 4095, PAGE, 8192, 2**31, 2**32 - 1]),
    "threads": st.sampled_from([0, 1, 2, 64, 65, 10_000, 2**32 - 1]),
    "workload": st.one_of(st.sampled_from(["idle", "seq-write", "random-write", "zipf"]), TEXT),
    "content": st.one_of(st.sampled_from(["", "realistic", "random"]), TEXT),
}
_SCALARS = {
    FieldDescriptor.TYPE_STRING: TEXT, FieldDescriptor.TYPE_BYTES: BLOB, FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_UINT64: U64, FieldDescriptor.TYPE_UINT32: U32, FieldDescriptor.TYPE_INT64: I64,
    FieldDescriptor.TYPE_DOUBLE: DOUBLE, FieldDescriptor.TYPE_ENUM: st.integers(-2, 5),
}


def messages(cls: type, depth: int = 0) -> st.SearchStrategy:
    """Any message of type `cls`: each field absent, a boundary value or random."""
    fields = {}
    for f in cls.DESCRIPTOR.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(pb, f.message_type.name)
            value = messages(sub, depth + 1) if depth < 2 else st.just(sub())
        elif cls is pb.GuestSpec and f.name in SPEC_FIELDS:
            value = SPEC_FIELDS[f.name]
        else:
            value = _SCALARS[f.type]
        if f.is_repeated:
            value = st.lists(value, max_size=8)
        fields[f.name] = st.one_of(st.none(), value)

    def build(values: dict) -> object:
        msg = cls()
        for name, value in values.items():
            if value is None:
                continue
            if isinstance(value, list):
                target = getattr(msg, name)
                if not value or not hasattr(value[0], "DESCRIPTOR"):
                    target.extend(value)
                else:
                    for x in value:
                        target.add().CopyFrom(x)
            elif hasattr(value, "DESCRIPTOR"):
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries(fields).map(build)


def _field_strategy(cls: type, f: FieldDescriptor) -> st.SearchStrategy:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(getattr(pb, f.message_type.name))
    if cls is pb.GuestSpec and f.name in SPEC_FIELDS:
        return SPEC_FIELDS[f.name]
    return _SCALARS[f.type]


def mutants(base: object) -> st.SearchStrategy:
    """`base` (a valid message) with one field, or one field of its GuestSpec, set at random:
    examples that pass every check but one, so each check is reached."""
    targets = [(None, f) for f in base.DESCRIPTOR.fields if not f.is_repeated]
    if "spec" in base.DESCRIPTOR.fields_by_name:
        targets += [("spec", f) for f in pb.GuestSpec.DESCRIPTOR.fields]

    def mutate(target: tuple[str | None, FieldDescriptor]) -> st.SearchStrategy:
        sub, f = target
        owner = pb.GuestSpec if sub else type(base)

        def apply(value: object) -> object:
            msg = type(base)()
            msg.CopyFrom(base)
            holder = getattr(msg, sub) if sub else msg
            if hasattr(value, "DESCRIPTOR"):
                getattr(holder, f.name).CopyFrom(value)
            else:
                setattr(holder, f.name, value)
            return msg

        return _field_strategy(owner, f).map(apply)

    return st.sampled_from(targets).flatmap(mutate)


def valid_requests(source: str) -> dict[type, object]:
    """A request of each kind that an agent would act on (for `mutants`)."""
    spec = pb.GuestSpec(size=16 * PAGE, workload="idle", seed=1, ops=10, threads=1, page_size=PAGE)
    return {
        pb.LaunchGuestRequest: pb.LaunchGuestRequest(name="fz", spec=spec),
        pb.PrepareIncomingRequest: pb.PrepareIncomingRequest(run_id="f" * 32, name="fz", spec=spec,
                                                             source_endpoint=source, bulk_endpoint=source),
        pb.PrecopyRoundRequest: pb.PrecopyRoundRequest(run_id="f" * 32, pull=True, deadline_s=1.0),
        pb.StartIncomingRequest: pb.StartIncomingRequest(run_id="f" * 32, state_json=b"{}"),
    }


# --------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fuzz_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalAgent, LocalAgent, Path]]:
    """A source serving an image too, and a destination restoring it over a uffd socket."""
    d = tmp_path_factory.mktemp("fuzz")
    image = d / "mem.img"
    image.write_bytes(random.Random(5).randbytes(64 * PAGE))
    sock = d / "uffd.sock"
    with LocalAgent("source", "--image", f"img={image}", log_path=str(d / "source.log")) as src, \
            LocalAgent("dest", "--uffd-socket", str(sock), "--restore-from", src.address, "--image", "img",
                       log_path=str(d / "dest.log")) as dst:
        yield src, dst, sock


@pytest.fixture(scope="module")
def stubs(fuzz_agents) -> Iterator[dict[str, pb_grpc.ControlStub]]:
    src, dst, _ = fuzz_agents
    channels = {"source": rpc.channel(src.address), "dest": rpc.channel(dst.address)}
    yield {role: pb_grpc.ControlStub(ch) for role, ch in channels.items()}
    for ch in channels.values():
        ch.close()


def call(stub: object, method: str, request: object, timeout: float = CALL_TIMEOUT) -> tuple[grpc.StatusCode, object]:
    """(status, reply or error details) of one unary call, which must end in time."""
    try:
        return grpc.StatusCode.OK, getattr(stub, method)(request, metadata=rpc.METADATA, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details()


def assert_handled(code: grpc.StatusCode, what: object) -> None:
    assert code in HANDLED, f"{code.name}: {what}"


def alive_and_clean(stubs: dict[str, pb_grpc.ControlStub]) -> None:
    """Each agent still answers; every run and guest an example made is gone."""
    for role, stub in stubs.items():
        code, reply = call(stub, "Hello", pb.HelloRequest(), timeout=10)
        assert code == grpc.StatusCode.OK, f"{role} agent stopped answering: {reply}"
        for g in call(stub, "ListGuests", pb.ListGuestsRequest())[1].guests:
            if g.kind == "image":
                continue
            if g.run_id:
                abort = "AbortOutgoing" if role == "source" else "AbortIncoming"
                assert_handled(*call(stub, abort, pb.RunRef(run_id=g.run_id)))
            # AbortIncoming drops the guest itself.
            assert call(stub, "StopGuest", pb.GuestRef(name=g.name))[0] in (grpc.StatusCode.OK,
                                                                             grpc.StatusCode.NOT_FOUND)


# ------------------------------------------------------- Control service
CONTROL = [(m.name, getattr(pb, m.input_type.name)) for m in pb.DESCRIPTOR.services_by_name["Control"].methods]


@pytest.mark.parametrize("role", ["source", "dest"])
@pytest.mark.parametrize("method, request_type", CONTROL, ids=[m for m, _ in CONTROL])
def test_control_random_messages(fuzz_agents, stubs, role: str, method: str, request_type: type) -> None:
    base = valid_requests(fuzz_agents[0].address).get(request_type)
    requests = messages(request_type) if base is None else st.one_of(messages(request_type), mutants(base))

    @FUZZ
    @given(request=requests)
    def check(request: object) -> None:
        try:
            assert_handled(*call(stubs[role], method, request))
        finally:
            alive_and_clean(stubs)

    check()


def test_oversized_messages_are_refused(fuzz_agents, stubs) -> None:
    """A message over the limit is refused by the server itself (the client here allows more)."""
    src = fuzz_agents[0]
    big = 2 * rpc.MAX_MESSAGE
    ch = grpc.insecure_channel(src.address, options=[("grpc.max_send_message_length", 4 * rpc.MAX_MESSAGE)])
    try:
        code, _ = call(pb_grpc.ControlStub(ch), "InspectGuest", pb.GuestRef(name="x" * big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.PagesStub(ch).Fetch(iter([pb.PageRequest(run_id="r" * big)]), metadata=rpc.METADATA,
                                              timeout=CALL_TIMEOUT))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        ch.close()
    alive_and_clean(stubs)


# ---------------------------------------------------------- page streams
@pytest.fixture
def switched_run(fuzz_agents, stubs) -> Iterator[tuple[str, str, int]]:
    """(run id, bulk endpoint, pages) of a small guest switched over on the source."""
    src = fuzz_agents[0]
    source = stubs["source"]
    spec = pb.GuestSpec(size=32 * PAGE, workload="idle", ops=0, page_size=PAGE)
    assert call(source, "LaunchGuest", pb.LaunchGuestRequest(name="pages", spec=spec))[0] == grpc.StatusCode.OK
    code, prep = call(source, "PrepareOutgoing", pb.PrepareOutgoingRequest(name="pages"))
    assert code == grpc.StatusCode.OK, prep
    assert call(source, "Switchover", pb.RunRef(run_id=prep.run_id))[0] == grpc.StatusCode.OK
    host = src.address.rsplit(":", 1)[0]
    try:
        yield prep.run_id, f"{host}:{prep.bulk_endpoint.rsplit(':', 1)[1]}", prep.page_count
    finally:
        alive_and_clean(stubs)


def page_requests(kind: type, run_id: str, pages: int) -> st.SearchStrategy:
    fields = {"run_id": st.one_of(st.just(run_id), TEXT),
              "first_page": st.one_of(st.integers(0, pages + 1), U64),
              "count": st.one_of(st.integers(0, 300), U32)}
    if kind is pb.PageRequest:
        fields["req_id"] = U64
    return st.lists(st.builds(kind, **fields), min_size=1, max_size=6)


def stream(address: str, method: str, requests: list) -> tuple[grpc.StatusCode, list[pb.PageBatch]]:
    ch = rpc.channel(address, purpose="fuzz")
    replies: list[pb.PageBatch] = []
    try:
        for batch in getattr(pb_grpc.PagesStub(ch), method)(iter(requests), metadata=rpc.METADATA,
                                                              timeout=CALL_TIMEOUT):
            replies.append(batch)
        return grpc.StatusCode.OK, replies
    except grpc.RpcError as err:
        return err.code(), replies
    finally:
        ch.close()


@pytest.mark.parametrize("method, kind", [("Fetch", pb.PageRequest), ("Bulk", pb.BulkRequest)])
def test_page_streams_random_requests(fuzz_agents, stubs, switched_run, method: str, kind: type) -> None:
    run_id, bulk_endpoint, pages = switched_run
    address = fuzz_agents[0].address if method == "Fetch" else bulk_endpoint

    @FUZZ
    @given(requests=page_requests(kind, run_id, pages))
    def check(requests: list) -> None:
        code, replies = stream(address, method, requests)
        assert_handled(code, requests)
        # Replies come in order, each exactly the range asked, until the first bad request.
        for req, batch in zip(requests, replies):
            assert (batch.first_page, batch.count) == (req.first_page, req.count)
            assert req.run_id == run_id and 0 < req.count and req.first_page + req.count <= pages
        valid = [r.run_id == run_id and 0 < r.count <= 64 and r.first_page + r.count <= pages for r in requests]
        if all(valid):
            assert code == grpc.StatusCode.OK and len(replies) == len(requests)
        assert call(stubs["source"], "Hello", pb.HelloRequest())[0] == grpc.StatusCode.OK

    check()


# ------------------------------------------------------- out-of-order calls
def expect(stub: object, method: str, request: object, code: grpc.StatusCode) -> object:
    got, reply = call(stub, method, request)
    assert got == code, f"{method}: {got.name}: {reply}"
    return reply


def test_out_of_order_calls(fuzz_agents, stubs) -> None:
    """Each step of a migration refused when it comes too early or twice; a
    bad state leaves the incoming run startable; a complete run keeps its guest."""
    src = fuzz_agents[0]
    source, dest = stubs["source"], stubs["dest"]
    OK, PRE = grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION
    nobody = pb.RunRef(run_id="0" * 32)
    for method in ("Switchover", "ScanDirty", "CompleteOutgoing", "AbortOutgoing"):
        expect(source, method, nobody, grpc.StatusCode.NOT_FOUND)
    for method in ("StartIncoming", "IncomingStatus", "AbortIncoming", "PrecopyRound"):
        expect(dest, method, getattr(pb, {"StartIncoming": "StartIncomingRequest",
                                          "PrecopyRound": "PrecopyRoundRequest"}.get(method, "RunRef"))(
            run_id=nobody.run_id), grpc.StatusCode.NOT_FOUND)
    spec = pb.GuestSpec(size=64 * PAGE, workload="seq-write", seed=9, ops=2000, page_size=PAGE)
    try:
        expect(source, "LaunchGuest", pb.LaunchGuestRequest(name="order", spec=spec), OK)
        prep = expect(source, "PrepareOutgoing", pb.PrepareOutgoingRequest(name="order"), OK)
        run = pb.RunRef(run_id=prep.run_id)
        expect(source, "PrepareOutgoing", pb.PrepareOutgoingRequest(name="order"), PRE)
        expect(source, "CompleteOutgoing", run, PRE)  # before switchover: the guest would be lost
        expect(source, "StopGuest", pb.GuestRef(name="order"), PRE)
        bulk = f"{src.address.rsplit(':', 1)[0]}:{prep.bulk_endpoint.rsplit(':', 1)[1]}"
        expect(dest, "PrepareIncoming", pb.PrepareIncomingRequest(
            run_id=prep.run_id, name="order", spec=prep.spec, source_endpoint=src.address, bulk_endpoint=bulk), OK)
        expect(dest, "PrepareIncoming", pb.PrepareIncomingRequest(
            run_id=prep.run_id, name="order", spec=prep.spec, source_endpoint=src.address, bulk_endpoint=bulk),
            grpc.StatusCode.ALREADY_EXISTS)
        switch = expect(source, "Switchover", run, OK)
        expect(source, "Switchover", run, PRE)
        for bad in (b"{", b"[1, 2]", b"\xff", b"[" * 100_000, b'"state"'):
            expect(dest, "StartIncoming", pb.StartIncomingRequest(run_id=prep.run_id, state_json=bad),
                   grpc.StatusCode.INVALID_ARGUMENT)
        expect(dest, "StartIncoming", pb.StartIncomingRequest(run_id=prep.run_id, state_json=b'{"threads": 7}'),
               PRE)  # the runner refuses a state that does not fit; the run stays prepared
        expect(dest, "StartIncoming", pb.StartIncomingRequest(run_id=prep.run_id, state_json=switch.state_json), OK)
        expect(dest, "StartIncoming", pb.StartIncomingRequest(run_id=prep.run_id, state_json=switch.state_json), PRE)
        for _ in range(600):
            status = expect(dest, "IncomingStatus", run, OK)
            if status.phase != "running":
                break
            call(dest, "InspectGuest", pb.GuestRef(name="order"))
            time.sleep(0.05)
        assert status.phase == "complete", status
        expect(source, "CompleteOutgoing", run, OK)
        expect(source, "CompleteOutgoing", run, grpc.StatusCode.NOT_FOUND)
        expect(dest, "AbortIncoming", run, PRE)  # the guest lives here now
        expect(dest, "InspectGuest", pb.GuestRef(name="order"), OK)
    finally:
        alive_and_clean(stubs)


# ------------------------------------------------------ handshake socket
def handshakes() -> st.SearchStrategy:
    region = st.fixed_dictionaries({"base_host_virt_addr": st.one_of(U64, st.text(max_size=4)),
                                    "size": U64, "offset": U64, "page_size": st.sampled_from([0, 4096, 4097])})
    bodies = st.one_of(st.binary(max_size=300), st.lists(region, max_size=3).map(lambda r: repr(r).encode()),
                       st.lists(region, min_size=1, max_size=2).map(lambda r: json.dumps(r).encode()))
    return st.tuples(bodies, st.sampled_from(["none", "pipe", "two"]))


def test_uffd_socket_hostile_handshakes(fuzz_agents, stubs) -> None:
    """Garbage, wrong fds (a pipe is no userfaultfd), early closes: the agent logs and goes on."""
    sock_path = fuzz_agents[2]

    @FUZZ
    @given(case=handshakes())
    def check(case: tuple[bytes, str]) -> None:
        body, fds = case
        r, w = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock_path))
                send = {"none": [], "pipe": [r], "two": [r, w]}[fds]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", send).tobytes())] if send else []
                if body or anc:
                    s.sendmsg([body or b" "], anc)
        finally:
            os.close(r)
            os.close(w)
        alive_and_clean(stubs)

    check()
