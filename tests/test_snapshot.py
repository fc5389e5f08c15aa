"""Live snapshots (synchronous userfaultfd write-protect) and restoring them elsewhere.

The oracle: the workloads are deterministic, so a fresh guest run to exactly
the op counts the runner recorded at the write-protect instant holds the
memory the image must hold (migrate.snapshot_image.reference_digest).
"""
from __future__ import annotations

import json
import mmap
import os
import threading
import time

import pytest
from migrate._native import ffi, lib
from test_dataplane_dest import thread_policies
from test_uffd import address_of

from migrate import checkpoint, orchestrator
from migrate import uffd as U
from migrate.client import AgentClient
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guest.workloads import WORKLOADS, digest
from migrate.local import LocalAgent, wait_for
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import AgentError
from migrate.snapshot_image import STATE_SUFFIX, read_state, reference_digest, state_doc

MiB = 1 << 20


def snapshot_to(gp: GuestProcess, path: str, size: int) -> tuple[dict, dict]:
    """Snapshot a runner into a new file at `path`: (what the runner took, its final counters)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        taken = gp.snapshot(fd)
    finally:
        os.close(fd)
    while not (status := gp.snapshot_status())["done"]:
        time.sleep(0.01)
    return taken, status


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return digest(f.read())


@pytest.fixture
def guest(request: pytest.FixtureRequest):
    """A runner on a fresh memfd, from the test's spec (indirect parametrization)."""
    spec: GuestSpec = request.param
    fd = os.memfd_create("snap-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, spec.size)
    gp = GuestProcess.launch(spec, fd)
    yield gp
    gp.stop()
    os.close(fd)


def _paced(workload: str) -> GuestSpec:
    # ~1 s of work at this pace: snapshots land before, during and after the run
    return GuestSpec(size=8 * MiB, workload=workload, seed=11, ops=3_000_000, threads=2, ops_per_sec=3_000_000)


@pytest.mark.parametrize("guest", [pytest.param(_paced(w), id=w) for w in WORKLOADS], indirect=True)
def test_snapshot_is_the_memory_at_the_write_protect_instant(guest: GuestProcess, tmp_path) -> None:
    """Each workload, three moments (early, mid-run, after it finished): each image is exact."""
    moments = []
    for i, delay in enumerate((0.05, 0.3)):
        time.sleep(delay)
        moments.append(snapshot_to(guest, str(tmp_path / f"s{i}"), guest.spec.size))
    assert guest.wait_finished(300)
    moments.append(snapshot_to(guest, str(tmp_path / "s2"), guest.spec.size))
    for i, (taken, status) in enumerate(moments):
        assert status["error"] == "" and status["pages_saved"] == status["pages_total"]
        assert file_digest(str(tmp_path / f"s{i}")) == reference_digest(guest.spec, "realistic", taken["state"])
    assert moments[-1][0]["ops"] == guest.spec.ops
    assert guest.digest() == file_digest(str(tmp_path / "s2"))  # after the last one: nothing changed since


@pytest.mark.parametrize("guest", [GuestSpec(size=64 * MiB, workload="random-write", seed=7, ops=1 << 40,
                                             threads=4)], indirect=True)
def test_a_writer_hammering_unsaved_pages_loses_nothing(guest: GuestProcess, tmp_path) -> None:
    """Every thread writes at random, unthrottled, as the stream walks: writes hit pages not yet
    saved, each is saved before its writer goes on, and the image is still exact (no torn page)."""
    time.sleep(0.2)
    taken, status = snapshot_to(guest, str(tmp_path / "img"), guest.spec.size)
    assert status["error"] == ""
    assert status["wp_faults"] > 0 and status["pages_faulted"] > 0
    assert status["pages_streamed"] + status["pages_faulted"] == status["pages_total"]
    assert status["ops_done"] > taken["ops"]  # the guest ran during the save
    assert file_digest(str(tmp_path / "img")) == reference_digest(guest.spec, "realistic", taken["state"])
    # the guest runs on, unprotected: a second snapshot works the same way
    taken2, status2 = snapshot_to(guest, str(tmp_path / "img2"), guest.spec.size)
    assert status2["error"] == "" and taken2["ops"] > taken["ops"]
    assert file_digest(str(tmp_path / "img2")) == reference_digest(guest.spec, "realistic", taken2["state"])


def test_snapshot_restored_on_another_agent_finishes_like_an_unmigrated_run(tmp_path) -> None:
    room = tmp_path / "snaps"
    spec = pb.GuestSpec(size=32 * MiB, workload="hotset", seed=3, ops=6_000_000, threads=2, ops_per_sec=4_000_000,
                        page_size=4096, content="random")
    with LocalAgent("source", "--snapshot-dir", str(room), log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", log_path=str(tmp_path / "dst.log")) as dst:
        with AgentClient(src.address) as client:
            client.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=spec))
            time.sleep(0.3)
            doc = checkpoint.take("vm", src.address, "vm.snap")
            client.call("StopGuest", pb.GuestRef(name="vm"))  # the original is gone: only the snapshot is left
        assert doc["pages"] == spec.size // 4096 and doc["downtime_ms"] > 0
        saved = read_state(str(room / "vm.snap"), spec.size)
        assert saved["ops"] == doc["ops_at_snapshot"] and saved["content"] == "random"
        restored = checkpoint.restore("vm.snap", src.address, dst.address, "vm2",
                                      orchestrator.RunOptions(verify=True))
        assert restored["verified"] is True
        with AgentClient(dst.address) as client:
            info = client.call("InspectGuest", pb.GuestRef(name="vm2"))
            assert info.ops_done == spec.ops and info.spec.workload == "hotset"
            client.call("StopGuest", pb.GuestRef(name="vm2"))
        with AgentClient(src.address) as client:  # the image guest is gone, its files stay
            assert not client.call("ListGuests", pb.ListGuestsRequest()).guests
        assert (room / "vm.snap").exists() and (room / ("vm.snap" + STATE_SUFFIX)).exists()


def test_served_image_with_a_state_file_is_its_guest(tmp_path) -> None:
    """`source serve --image NAME=PATH` takes a snapshot's spec from PATH.state.json."""
    fd = os.memfd_create("snap-guest", os.MFD_CLOEXEC)
    spec = GuestSpec(size=4 * MiB, workload="zipf", seed=2, ops=100_000, threads=1)
    os.ftruncate(fd, spec.size)
    with GuestProcess.launch(spec, fd) as gp:
        assert gp.wait_finished(60)
        taken, _ = snapshot_to(gp, str(tmp_path / "img"), spec.size)
    os.close(fd)
    (tmp_path / ("img" + STATE_SUFFIX)).write_text(json.dumps(state_doc("g", spec, "realistic", taken)))
    with LocalAgent("source", "--image", f"img={tmp_path / 'img'}", log_path=str(tmp_path / "src.log")) as src, \
            AgentClient(src.address) as client:
        info = client.call("InspectGuest", pb.GuestRef(name="img"))
    assert (info.kind, info.spec.workload, info.spec.ops, info.spec.seed) == ("image", "zipf", 100_000, 2)


def test_snapshot_files_follow_the_backing_rules(tmp_path) -> None:
    room = tmp_path / "snaps"
    room.mkdir()
    (room / "taken").write_bytes(b"")
    os.symlink(str(tmp_path / "elsewhere"), str(room / "link"))
    spec = pb.GuestSpec(size=4 * MiB, workload="idle", ops=0, threads=1, page_size=4096)
    with LocalAgent("source", log_path=str(tmp_path / "bare.log")) as bare, AgentClient(bare.address) as client:
        client.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=spec))
        with pytest.raises(AgentError, match="--snapshot-dir"):
            client.call("StartSnapshot", pb.SnapshotRequest(name="vm", file="x"))
        client.call("StopGuest", pb.GuestRef(name="vm"))
    with LocalAgent("source", "--snapshot-dir", str(room), log_path=str(tmp_path / "src.log")) as src, \
            AgentClient(src.address) as client:
        client.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=spec))
        for bad in ("../x", ".hidden", "a/b", "x" * 60):
            with pytest.raises(AgentError, match="bad snapshot name"):
                client.call("StartSnapshot", pb.SnapshotRequest(name="vm", file=bad))
        for taken in ("taken", "link"):
            with pytest.raises(AgentError, match="already exists"):
                client.call("StartSnapshot", pb.SnapshotRequest(name="vm", file=taken))
        with pytest.raises(AgentError, match="no guest named"):
            client.call("StartSnapshot", pb.SnapshotRequest(name="nobody", file="y"))
        client.call("StopGuest", pb.GuestRef(name="vm"))
    assert sorted(os.listdir(room)) == ["link", "taken"]
    assert not (tmp_path / "elsewhere").exists()


def test_cli_snapshot_reports_and_fails_in_one_line(tmp_path) -> None:
    from test_cli import assert_clean_error, run_cli

    room = tmp_path / "snaps"
    with LocalAgent("source", "--snapshot-dir", str(room), log_path=str(tmp_path / "src.log")) as src:
        assert run_cli("guest", "start", "vm", "--agent", src.address, "--size", "8M", "--workload", "seq-write",
                       "--ops", "100000000", "--ops-per-sec", "1000000").returncode == 0
        out = run_cli("snapshot", "vm", "--agent", src.address, "-o", "vm.snap", "--report", str(tmp_path / "r.json"))
        assert out.returncode == 0, out.stderr
        assert "downtime" in out.stdout and "WP faults" in out.stdout and "100.0%" in out.stderr
        doc = json.loads((tmp_path / "r.json").read_text())
        assert doc["pages"] == 2048 and doc["bytes"] == 8 * MiB and doc["guest_ops_per_s_during"] > 0
        assert_clean_error(run_cli("snapshot", "vm", "--agent", src.address, "-o", "vm.snap"), "already exists")
        assert_clean_error(run_cli("snapshot", "vm", "--agent", src.address, "-o", "../up"), "bad snapshot name")
        assert_clean_error(run_cli("restore", "nothing", "--from", src.address, "--to", src.address),
                           "cannot open image")
        assert run_cli("guest", "stop", "vm", "--agent", src.address).returncode == 0


def test_the_savers_take_the_data_planes_bulk_and_fault_priorities(tmp_path) -> None:
    """native/snapshot.c's threads use dp_common.h's helpers: the stream SCHED_BATCH at the niceness of the
    thread that started it (it set nice 10 of its own: niced bulk starves behind busy guests), the fault
    thread SCHED_FIFO, or niced below the stream where that is refused; both named. The stream is held
    on the second page, which the test serves itself (a missing-mode userfaultfd of its own), while the
    test looks at the threads."""
    page = mmap.PAGESIZE
    mem = mmap.mmap(-1, 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address_of(mem)
    starter = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    out_fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    with U.Uffd.create() as wp, U.Uffd.create() as held:
        wp.register(base, page, U.MODE_WP)
        held.register(base + page, page, U.MODE_MISSING)  # the stream's read of it waits for the test
        snap = lib.mig_snap_start(wp.fd, out_fd, ffi.cast("uint8_t *", base), 2 * page, page, 1)
        assert snap != ffi.NULL
        try:
            wait_for(lambda: {"snap-stream", "snap-fault"} <= thread_policies().keys(), timeout=10)
            threads = thread_policies()
        finally:
            held.zeropage(base + page, page)  # the stream goes on (its unprotect there fails: not wp's range)
            while not lib.mig_snap_wait(snap, 1000):
                pass
            lib.mig_snap_free(snap)
            os.close(out_fd)
    mem.close()
    assert threads.get("snap-stream") == {(os.SCHED_BATCH, starter)}, threads
    assert threads["snap-fault"] and all(policy == os.SCHED_FIFO or nice < starter
                                         for policy, nice in threads["snap-fault"]), threads
