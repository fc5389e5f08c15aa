"""Post-copy migration end to end: real agents, runners, userfaultfd, gRPC
control and each data plane (the `plane` fixture: native and grpc).

The oracle: a guest migrated at any moment ends with the same memory digest
as the same guest never migrated (the orchestrator's --verify runs that
reference guest on the source agent and compares).
"""
from __future__ import annotations

import json
import mmap
import os
import socket
import struct

import pytest

from migrate import orchestrator, planes, report
from migrate.client import AgentClient
from migrate.local import LocalAgent, wait_for
from migrate.names import Workload
from migrate.proto import migrate_pb2 as pb

MiB = 1 << 20
#: Every workload but balloon, which test_modes migrates in each mode.
WORKLOADS = [w for w in Workload if w is not Workload.BALLOON]


def spec(workload: str, size: int = 16 * MiB, ops: int = 60_000, rate: float = 100_000, threads: int = 1):
    return pb.GuestSpec(size=size, workload=workload, seed=7, ops=ops, threads=threads, ops_per_sec=rate,
                        page_size=mmap.PAGESIZE)


def launch(src: str, name: str, s: pb.GuestSpec) -> None:
    with AgentClient(src) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=s), timeout=120)


def ops_done(addr: str, name: str) -> int:
    with AgentClient(addr) as c:
        return c.call("InspectGuest", pb.GuestRef(name=name)).ops_done


def stop(addr: str, name: str) -> None:
    with AgentClient(addr) as c:
        c.call("StopGuest", pb.GuestRef(name=name))


def migrate_at(agents, name: str, s: pb.GuestSpec, fraction: float, **opts) -> dict:
    """Launch, prepare, switch over once `fraction` of the work is done; --verify.

    Post-copy unless `mode` says otherwise (tests/test_modes.py covers the others).
    """
    opts.setdefault("mode", "postcopy")
    src, dst = agents
    launch(src.address, name, s)

    def at_fraction() -> None:
        assert wait_for(lambda: ops_done(src.address, name) >= fraction * s.ops, timeout=60)

    try:
        opts = orchestrator.RunOptions(verify=True, **opts)
        doc = orchestrator.migrate(name, src.address, dst.address, opts, before_switchover=at_fraction)
    except BaseException:
        abandon(agents, name)  # the failure itself is what the test reports
        raise
    stop(dst.address, name)
    return doc


def abandon(agents, name: str) -> None:
    """Clean up after a failed migration: abort it on both sides, stop the guest wherever it is."""
    for agent in agents:
        with AgentClient(agent.address) as c:
            for g in c.call("ListGuests", pb.ListGuestsRequest()).guests:
                if g.name != name:
                    continue
                for abort in ("AbortIncoming", "AbortOutgoing"):
                    if g.run_id:
                        try:
                            c.call(abort, pb.RunRef(run_id=g.run_id))
                        except orchestrator.AgentError:
                            pass  # not this side's kind of run
                try:
                    c.call("StopGuest", pb.GuestRef(name=name))
                except orchestrator.AgentError:
                    pass  # AbortIncoming already dropped it


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_at_three_moments(agents, plane, workload):
    for i, fraction in enumerate((0.1, 0.5, 0.9)):
        doc = migrate_at(agents, f"{workload}-{i}", spec(workload), fraction, data_plane=plane)
        assert doc["verified"] is True, (workload, fraction)
        assert doc["data_plane"] == plane and doc["fault_path"] == "grpc"
        p = doc["pages"]
        assert p["received"] == p["total"] == 16 * MiB // mmap.PAGESIZE
        assert p["pushed"] + p["faulted"] <= p["total"]


def test_multithreaded_guest_with_push_and_faults_racing(agents, plane):
    doc = migrate_at(agents, "racy", spec("random-write", size=32 * MiB, ops=200_000, rate=200_000, threads=4), 0.3,
                     data_plane=plane)
    assert doc["verified"] is True
    assert doc["faults"]["count"] > 0 and doc["pages"]["pushed"] > 0


def test_no_push_moves_every_page_by_fault(agents, plane):
    doc = migrate_at(agents, "nopush", spec("random-write", size=8 * MiB, ops=20_000, rate=50_000), 0.3,
                     no_push=True, data_plane=plane)
    assert doc["verified"] is True
    p = doc["pages"]
    assert p["pushed"] == 0
    assert p["faulted"] == p["total"]
    assert doc["faults"]["count"] > 0


def test_idle_guest_gets_everything_by_push(agents, plane):
    doc = migrate_at(agents, "idler", spec("idle", size=16 * MiB, ops=0, rate=0), 0.0, data_plane=plane)
    assert doc["verified"] is True
    p = doc["pages"]
    assert p["faulted"] == 0 and p["pushed"] == p["total"]
    assert doc["faults"]["count"] == 0
    assert p["zero"] > 0  # realistic memory has zero pages, sent as ranges
    # ~15 % zero pages; "auto" sends the rest raw to a destination on this host
    assert doc["compression_ratio"] > 1.1
    assert doc["source"]["compressed_batches"] == 0, doc["source"]
    # the transfer runs from the resume to the last page, inside the whole migration
    assert 0 < doc["transfer_s"] < doc["total_s"]
    assert report.transfer_mib_s(doc) == pytest.approx(16 / doc["transfer_s"], rel=0.01)


def test_agent_gives_back_a_completed_runs_descriptors(agents, plane):
    """A long-lived destination agent holds no descriptor of a migration once it completed
    (userfaultfd, bitmap memfd), and still answers that migration's status."""
    dst = agents[1]

    def fds() -> int:
        return len(os.listdir(f"/proc/{dst.pid}/fd"))

    migrate_at(agents, "first", spec("idle", size=4 * MiB, ops=0, rate=0), 0.0, data_plane=plane)
    before = fds()
    for i in range(3):
        doc = migrate_at(agents, f"again{i}", spec("random-write", size=4 * MiB, ops=2000), 0.5, data_plane=plane)
        assert doc["verified"] is True
    # No growth: a descriptor of the first run that gRPC or the kernel closes a little later may even go.
    assert wait_for(lambda: fds() <= before, timeout=10), (fds(), before)
    assert doc["pages"]["received"] == doc["pages"]["total"]  # the final status, after the release


def test_compressed_batches_arrive_intact(tmp_path, plane):
    """--compress always: every batch of realistic memory travels as a zstd frame."""
    with LocalAgent("source", "--compress", "always", log_path=str(tmp_path / "source.log")) as src, \
            LocalAgent("dest", log_path=str(tmp_path / "dest.log")) as dst:
        doc = migrate_at((src, dst), "packed", spec("idle", size=16 * MiB, ops=0, rate=0), 0.0, data_plane=plane)
    assert doc["verified"] is True
    assert doc["pages"]["pushed"] == doc["pages"]["total"]
    assert doc["source"]["compressed_batches"] > 0
    assert doc["compression_ratio"] > 2.0


def test_report_fields_contract(agents, plane, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    doc = migrate_at(agents, "reported", spec("hotset"), 0.5, data_plane=plane)
    path = tmp_path / "report.json"
    orchestrator.write_report(doc, str(path))
    check = Path(__file__).resolve().parents[2] / "shared" / "checks" / "report_fields.py"
    if not check.exists():
        pytest.skip("shared/checks not present beside the project")
    out = subprocess.run([sys.executable, str(check), str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_unreachable_source_leaves_guest_running_on_source(agents, plane):
    src, dst = agents
    launch(src.address, "stay", spec("random-write", ops=10_000_000, rate=50_000))
    try:
        # the destination cannot reach this
        opts = orchestrator.RunOptions(source_endpoint="127.0.0.1:1", mode="postcopy", data_plane=plane)
        with pytest.raises(orchestrator.AgentError, match="cannot reach the source"):
            orchestrator.migrate("stay", src.address, dst.address, opts)
        with AgentClient(src.address) as c:
            info = c.call("InspectGuest", pb.GuestRef(name="stay"))
            assert info.state == "running" and not info.run_id
        before = ops_done(src.address, "stay")
        assert wait_for(lambda: ops_done(src.address, "stay") > before, timeout=10)
        with AgentClient(dst.address) as c:
            assert not c.call("ListGuests", pb.ListGuestsRequest()).guests
    finally:
        stop(src.address, "stay")


@pytest.mark.parametrize("workload", WORKLOADS)
def test_native_fault_path_migrates_every_workload(agents, workload):
    doc = migrate_at(agents, f"nf-{workload}", spec(workload), 0.5, data_plane="native", fault_path="native")
    assert doc["verified"] is True
    assert doc["data_plane"] == "native" and doc["fault_path"] == "native"
    assert doc["pages"]["received"] == doc["pages"]["total"]


def test_a_data_connection_without_the_run_key_is_refused_and_the_run_goes_on(agents, monkeypatch, tmp_path):
    """Whoever reaches the data port without the run's key gets nothing: the source
    drops it (and logs it), the migration carries on undisturbed."""
    routes: list[planes.PageRoute] = []
    offered = planes.PageRoute.offered

    def record(cls, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        routes.append(offered(*args, **kw))
        return routes[-1]

    monkeypatch.setattr(planes.PageRoute, "offered", classmethod(record))
    src, dst = agents
    s = spec("random-write", ops=40_000, rate=50_000)
    launch(src.address, "guarded", s)

    def intrude() -> None:  # both sides prepared: the data server listens
        host, port = routes[0].data_endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"MIGDP\0\0\1" + struct.pack("<II", 1, 1) + os.urandom(planes.KEY_BYTES))
            try:
                assert sock.recv(64) == b""  # closed, no hello reply
            except ConnectionResetError:
                pass

    opts = orchestrator.RunOptions(verify=True, mode="postcopy", data_plane="native", max_bandwidth=8 * MiB)
    try:
        doc = orchestrator.migrate("guarded", src.address, dst.address, opts, before_switchover=intrude)
    except BaseException:
        abandon(agents, "guarded")
        raise
    stop(dst.address, "guarded")
    assert doc["verified"] is True
    assert "refused 1 data connection(s)" in (tmp_path / "source.log").read_text()


@pytest.mark.parametrize("fault_path", ["grpc", "native"])
def test_duplicates_on_the_wire_are_counted_and_below_one_percent(agents, fault_path):
    """A guest faulting all over its memory while the native bulk streams: the fault
    path's pages are not asked again by the bulk (nor its prefetch what the bulk asked),
    so what comes twice stays under 1 % of the pages, and so does the wire's excess.
    (The grpc plane's bulk does not share its asks with the fault path: it is not held to this.)"""
    doc = migrate_at(agents, "twice", spec("random-write", size=32 * MiB, ops=200_000, rate=200_000, threads=2), 0.3,
                     data_plane="native", fault_path=fault_path, max_bandwidth=32 * MiB)
    assert doc["verified"] is True
    p = doc["pages"]
    assert doc["faults"]["count"] > 0
    assert p["duplicates"] <= 0.01 * p["total"], p
    nonzero = (p["total"] - p["zero"]) * p["page_size"]
    assert doc["bytes"]["wire"] <= 1.01 * nonzero, (doc["bytes"], nonzero)


def memfd_bytes(agent_pid: int, name: str) -> int:
    """Bytes the kernel allocated for a guest's RAM memfd, as the agent holding it sees it."""
    for fd in os.listdir(f"/proc/{agent_pid}/fd"):
        path = f"/proc/{agent_pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith(f"/memfd:migrate-guest-{name} "):
                return os.stat(path).st_blocks * 512
        except FileNotFoundError:
            continue
    raise AssertionError(f"agent {agent_pid} holds no memfd for guest {name}")


@pytest.mark.parametrize("plane,fault_path", [("native", "grpc"), ("native", "native"), ("grpc", "grpc")])
def test_zero_pages_stay_holes_on_the_destination(agents, plane, fault_path):
    """A guest whose RAM is mostly zero (content "zero": it wrote a quarter of it before the
    switch and writes another quarter after, faulting on pages that arrived as zero) migrates
    intact, and its destination allocated only what the guest wrote: a zero page is only marked
    received (a hole reads as zeros), never installed."""
    src, dst = agents
    size, page = 64 * MiB, mmap.PAGESIZE
    s = spec("seq-write", size=size, ops=size // page // 2, rate=40_000)
    s.content = "zero"
    launch(src.address, "sparse", s)
    try:
        assert wait_for(lambda: ops_done(src.address, "sparse") >= s.ops // 2, timeout=60)
        doc = orchestrator.migrate("sparse", src.address, dst.address,
                                   orchestrator.RunOptions(mode="postcopy", data_plane=plane, fault_path=fault_path))
        with AgentClient(dst.address) as d:
            assert wait_for(lambda: d.call("InspectGuest", pb.GuestRef(name="sparse")).finished, timeout=60)
        # checked before the digest, which reads (and so allocates) every page
        written = s.ops * page
        assert memfd_bytes(dst.pid, "sparse") <= written + 4 * MiB, doc["pages"]
        p = doc["pages"]
        assert p["received"] == p["total"] and p["zero_lazy"] == p["zero"] >= p["total"] - s.ops, p
        with AgentClient(src.address) as source, AgentClient(dst.address) as dest:
            assert orchestrator.verify(source, dest, "sparse", s)
    finally:
        abandon(agents, "sparse")


def test_zero_ram_moves_in_few_requests(agents, plane):
    """The bulk window counts data pages: while the pages coming back are zero (free to move and,
    lazy, to install) it stretches, so an all-zero guest goes in requests of thousands of pages,
    not one data window (6-8 MiB) per round trip."""
    src, dst = agents
    s = spec("idle", size=64 * MiB, ops=0, rate=0)
    s.content = "zero"
    launch(src.address, "blank", s)
    seen: list[pb.MigrationStatus] = []
    try:
        doc = orchestrator.migrate("blank", src.address, dst.address,
                                   orchestrator.RunOptions(mode="postcopy", data_plane=plane), on_status=seen.append)
        p = doc["pages"]
        assert p["zero_lazy"] == p["zero"] == p["total"], p
        requests = json.loads(seen[-1].detail_json)["bulk"]["requests"]
        # unstretched: requests of 512 pages at most (native), ~200 on average (gRPC: 80 here)
        assert requests < p["total"] // 512, requests
    finally:
        abandon(agents, "blank")
