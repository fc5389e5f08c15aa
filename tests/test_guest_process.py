"""The guest runner process and its agent-side handle, with real processes
and (restore mode) a real userfaultfd resolved from this test."""
from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from migrate import spawn
from migrate import uffd as U
from migrate.errors import FailedPrecondition
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guest.workloads import digest, fill_realistic
from migrate.uffd import Region

PAGE = mmap.PAGESIZE
MiB = 1 << 20


def open_fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def memfd_digest(fd: int, size: int) -> str:
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return digest(m)


# ------------------------------------------------------------------ spec
def test_spec_validation_and_dict_roundtrip() -> None:
    spec = GuestSpec(size=16 * MiB, workload="zipf", seed=3, ops=10, threads=2, ops_per_sec=5.0)
    spec.validate()
    assert GuestSpec.from_dict(spec.to_dict()) == spec
    for bad, match in [
        (dict(size=0), "> 0"),
        (dict(size=PAGE + 1), "multiple of the page size"),
        (dict(size=PAGE, workload="nope"), "unknown workload"),
        (dict(size=PAGE, threads=0), "threads must be >= 1"),
        (dict(size=2 * PAGE, threads=3), "fewer than its 3 threads"),
        (dict(size=PAGE, ops=-1), "ops must be >= 0"),
        (dict(size=PAGE, ops_per_sec=-1.0), "ops_per_sec"),
        (dict(size=PAGE, page_size=5000), "power of two"),
    ]:
        with pytest.raises(ValueError, match=match):
            GuestSpec(**bad).validate()
    with pytest.raises(ValueError, match="unknown guest spec fields"):
        GuestSpec.from_dict({"size": PAGE, "colour": 1})


def test_runner_refuses_bad_size(memfds) -> None:
    fd = memfds(4 * PAGE)
    a, b = socket.socketpair()
    with a, b:
        r = subprocess.run(spawn.module_argv("migrate.guest.runner", "--memfd", str(fd), "--control-fd",
                                             str(b.fileno()), "--size", str(PAGE + 1)),
                           env=spawn.child_env(), pass_fds=(fd, b.fileno()), capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0
    assert "multiple of the page size" in r.stderr


def test_a_restore_runner_never_loads_grpc(memfds) -> None:
    """A runner needs the native layer, not the control plane: grpc's import is ~0.1 s of CPU per runner,
    and a drain starts several runners at once on each destination (their prepare times added up)."""
    spec = GuestSpec(size=16 * PAGE, workload="idle", ops=0)
    guest = GuestProcess.launch(spec, memfds(spec.size), restore=True)
    try:
        with open(f"/proc/{guest.pid}/maps") as f:
            loaded = f.read()
        assert "cygrpc" not in loaded and "_native" in loaded  # imported what it needs (its uffd), nothing more
    finally:
        os.close(guest.uffd)
        guest.stop()


def _ram_vm_flags(pid: int) -> set[str]:
    """The VmFlags of a runner's guest RAM mapping (the memfd), from /proc/PID/smaps."""
    with open(f"/proc/{pid}/smaps") as f:
        blocks = f.read().split("\n")
    in_ram = False
    for line in blocks:
        if "-" in line.split(" ", 1)[0] and ":" not in line.split(" ", 1)[0]:
            in_ram = "memfd:test-guest" in line
        elif in_ram and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError("no guest RAM mapping in the runner's smaps")


@pytest.mark.skipif(not U.probe_features() & U.FEATURE_WP_ASYNC, reason="the kernel has no async write-protect")
@pytest.mark.parametrize("watch", [False, True])
def test_a_restore_runner_registers_write_protect_only_when_writes_are_watched(memfds, watch: bool) -> None:
    """Unregistering a range registered WP walks all its page tables (~50-80 ms per GiB at the end of
    every run): a runner registers MISSING alone unless the run watches writes."""
    spec = GuestSpec(size=16 * PAGE, workload="idle", ops=0)
    guest = GuestProcess.launch(spec, memfds(spec.size), restore=True, watch_writes=watch)
    try:
        flags = _ram_vm_flags(guest.pid)
        assert "um" in flags  # userfaultfd MISSING
        assert ("uw" in flags) == watch  # userfaultfd write-protect
    finally:
        os.close(guest.uffd)
        guest.stop()


def test_runner_exits_when_control_socket_closes(memfds) -> None:
    fd = memfds(MiB)
    a, b = socket.socketpair()
    with a:
        with b:
            proc = subprocess.Popen(spawn.module_argv("migrate.guest.runner", "--memfd", str(fd), "--control-fd",
                                                      str(b.fileno()), "--size", str(MiB), "--ops", "10000000000",
                                                      "--ops-per-sec", "1000"),
                                    env=spawn.child_env(), pass_fds=(fd, b.fileno()))
        try:
            assert b'"ready"' in a.recv(4096)
        finally:
            a.close()
            assert proc.wait(60) == 0


# --------------------------------------------------------------- source
def test_launch_progress_pause_resume_digest_stop(memfds) -> None:
    spec = GuestSpec(size=16 * MiB, workload="random-write", seed=5, ops=10**12, threads=2, ops_per_sec=50_000)
    fd = memfds(spec.size)
    fds_before = open_fds()
    gp = GuestProcess.launch(spec, fd)
    try:
        pid = gp.pid
        wait_for(lambda: len(gp.progress) >= 3 and gp.progress[-1][1] > 0, what="progress events")
        times = [t for t, _ in gp.progress]
        assert times == sorted(times)
        st = gp.stats()
        assert st["running"] and not st["finished"] and st["ops_total"] == spec.ops
        assert st["first_op_ns"] > 0

        state = gp.pause()
        assert len(state["threads"]) == 2 and state["last_op_ns"] > 0
        paused_ops = sum(t["ops_done"] for t in state["threads"])
        assert 0 < paused_ops
        s1, s2 = gp.stats(), gp.stats()
        assert s1["ops_done"] == s2["ops_done"] == paused_ops and not s1["running"]
        assert gp.state()["threads"] == state["threads"]
        # the runner hashes the same memory this process sees through the memfd
        d = gp.digest(timeout=120)
        assert d == memfd_digest(fd, spec.size)
        assert gp.pause()["threads"] == state["threads"]      # pausing twice is harmless

        gp.resume()
        with pytest.raises(FailedPrecondition, match="already running"):
            gp.resume()
        wait_for(lambda: gp.stats()["ops_done"] > paused_ops, what="ops after resume")
    finally:
        gp.stop()
    gp.stop()                                                  # idempotent
    assert pid_gone(pid)
    assert open_fds() == fds_before
    with pytest.raises(RuntimeError):
        gp.stats()


def test_a_running_guest_reports_progress_no_more_than_20_times_a_second(memfds) -> None:
    """Each progress event wakes the runner and its agent's reader: at 50 a second, the 4-8 runners of a
    drain took ~0.1 CPU-s per GiB moved. The runner stamps each event after its sleep, so the gaps
    between its stamps are at least the period, however busy the machine."""
    spec = GuestSpec(size=4 * MiB, workload="random-write", seed=5, ops=10**12, threads=1, ops_per_sec=10_000)
    with GuestProcess.launch(spec, memfds(spec.size)) as gp:
        wait_for(lambda: len(gp.progress) >= 6, what="progress events")
        times = [t for t, _ in gp.progress]
    assert min(b - a for a, b in zip(times, times[1:])) >= 45_000_000, times


def test_a_paused_guest_does_not_wake_to_report_nothing(memfds) -> None:
    """A source guest stays paused from its switchover until its run completes: its progress loop used to
    wake every PROGRESS_EVERY meanwhile, per guest, to find nothing to report."""
    from migrate.guest.runner import PAUSED_LOOK_EVERY

    def wakeups(pid: int) -> int:
        return sum(int(line.split()[1]) for tid in os.listdir(f"/proc/{pid}/task")
                   for line in open(f"/proc/{pid}/task/{tid}/status") if line.startswith("voluntary_ctxt_switches"))

    spec = GuestSpec(size=4 * MiB, workload="random-write", seed=5, ops=10**12, threads=1, ops_per_sec=10_000)
    with GuestProcess.launch(spec, memfds(spec.size)) as gp:
        wait_for(lambda: len(gp.progress) >= 2, what="progress events")
        gp.pause()
        time.sleep(0.1)  # the loop's look after the pause's own event
        before, t0 = wakeups(gp.pid), time.monotonic()
        time.sleep(0.5)
        woken, seconds = wakeups(gp.pid) - before, time.monotonic() - t0
        gp.resume()
        ops = gp.progress[-1][1]
        wait_for(lambda: gp.progress[-1][1] > ops, what="progress after the resume")
    assert woken <= 1 + seconds / PAUSED_LOOK_EVERY, (woken, seconds)


def test_paused_runs_finish_with_the_reference_digest(memfds, reference_digest) -> None:
    spec = GuestSpec(size=16 * MiB, workload="hotset", seed=8, ops=120_000, threads=2, ops_per_sec=100_000)
    fd = memfds(spec.size)
    with GuestProcess.launch(spec, fd) as gp:
        wait_for(lambda: gp.progress and gp.progress[-1][1] > 0, what="progress")
        for _ in range(3):
            gp.pause()
            gp.resume()
        assert gp.wait_finished(300)
        st = gp.stats()
        assert st["finished"] and st["ops_done"] == spec.ops and not st["running"]
        assert gp.progress[-1][1] == spec.ops
        assert gp.digest() == reference_digest(spec)


def test_start_paused_without_fill(memfds) -> None:
    spec = GuestSpec(size=4 * MiB, workload="seq-write", seed=2, ops=1000)
    fd = memfds(spec.size)
    with mmap.mmap(fd, spec.size) as m:
        fill_realistic(m, PAGE, 77)       # content the runner must keep
    before = memfd_digest(fd, spec.size)
    with GuestProcess.launch(spec, fd, start_paused=True, fill=False) as gp:
        st = gp.stats()
        assert st["ops_done"] == 0 and not st["running"]
        assert gp.digest() == before
        gp.resume()
        assert gp.wait_finished(120)
        assert gp.digest() != before


def test_dead_runner_is_reported(memfds) -> None:
    spec = GuestSpec(size=4 * MiB, ops=10**12, ops_per_sec=1000)
    fd = memfds(spec.size)
    gp = GuestProcess.launch(spec, fd)
    try:
        os.kill(gp.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="exit status -9"):
            for _ in range(100):       # until the reader has seen the EOF
                gp.stats()
                time.sleep(0.05)
        with pytest.raises(RuntimeError):
            gp.wait_finished(5)
    finally:
        gp.stop()
    assert pid_gone(gp.pid)


def test_launch_failure_is_reported(memfds) -> None:
    spec = GuestSpec(size=4 * MiB)
    fd = memfds(MiB)                   # too small for the guest
    with pytest.raises(ValueError, match="less than"):
        GuestProcess.launch(spec, fd)


# -------------------------------------------------------------- restore
class FaultServer:
    """A minimal post-copy destination in this process: resolves the
    runner's faults from `source` (a 64 KiB neighbourhood each)."""

    def __init__(self, uffd_fd: int, regions: list[Region], source: mmap.mmap, page_size: int) -> None:
        from migrate.bitmap import SharedBitmap
        from migrate.uffd import FaultReader, Uffd

        r = regions[0]
        self.base, self.size, self.page = r.base, r.size, page_size
        self.npages = self.size // page_size
        self.uffd = Uffd(uffd_fd, page_size=page_size)      # takes ownership of the fd
        self.bitmap = SharedBitmap.create(self.npages)
        self.reader = FaultReader(uffd_fd, regions, page_size)
        self.source = source
        self.faults = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def push(self, first: int, count: int) -> None:
        count = min(count, self.npages - first)
        off = first * self.page
        self.uffd.copy(self.base + off, memoryview(self.source)[off:off + count * self.page])
        self.bitmap.set_range(first, count)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                for page, _, _ in self.reader.read(self.bitmap, 20):
                    self.faults += 1
                    first = page - page % 16
                    self.push(first, 16)
                    self.uffd.wake(self.base + first * self.page, 16 * self.page)
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.error = e

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.reader.close()
        self.bitmap.close()
        self.uffd.close()
        if self.error:
            raise self.error


def test_restore_mode_mini_postcopy(memfds, reference_digest) -> None:
    """Pause a source guest, resume it in a restore-mode runner whose faults
    this test resolves from the source memory: same digest as a run never
    migrated."""
    spec = GuestSpec(size=16 * MiB, workload="hotset", seed=13, ops=150_000, threads=2, ops_per_sec=100_000)
    fds_before = open_fds()
    src_fd, dst_fd = memfds(spec.size), memfds(spec.size)
    src = GuestProcess.launch(spec, src_fd)
    dst = server = None
    src_map = mmap.mmap(src_fd, spec.size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        wait_for(lambda: src.progress and src.progress[-1][1] > 0, what="source progress")
        state = src.pause()
        paused_ops = sum(t["ops_done"] for t in state["threads"])
        assert 0 < paused_ops < spec.ops

        dst = GuestProcess.launch(spec, dst_fd, restore=True)
        assert dst.uffd is not None
        assert dst.regions == [Region(dst.regions[0].base, spec.size, 0, spec.page_size)]
        # the restore runner touched nothing: the destination memfd is all holes
        # (checked with SEEK_DATA: reading through a mapping would allocate pages)
        with pytest.raises(OSError) as e:
            os.lseek(dst_fd, 0, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        server = FaultServer(dst.uffd, dst.regions, src_map, spec.page_size)
        dst.uffd = None                                   # the server owns it now
        # pre-copy a quarter; the rest (both threads' hot sets included) is faulted in
        server.push(server.npages // 4, server.npages // 4)
        server.start()
        dst.resume(state)
        assert dst.wait_finished(300)
        st = dst.stats()
        assert st["ops_done"] == spec.ops and st["first_op_ns"] > 0
        d = dst.digest(timeout=300)                      # faults in every page still missing
        assert server.faults > 0
        assert server.bitmap.is_full()
        assert d == reference_digest(spec) == memfd_digest(dst_fd, spec.size)
    finally:
        if dst is not None:
            dst.stop()
            if dst.uffd is not None:
                os.close(dst.uffd)
        if server is not None:
            server.close()
        src.stop()
        src_map.close()
    for fd in (src_fd, dst_fd):
        fds_before[fd] = open_fds()[fd]
    assert open_fds() == fds_before


def test_a_released_guest_stops_in_the_background_and_keeps_its_name_until_then(monkeypatch):
    """CompleteOutgoing releases the guest that left (GuestTable.release): its runner stops and its RAM
    is freed after the call returns; a guest of the same name arriving meanwhile waits for that."""
    from migrate.guests import GuestTable, HostedGuest, create_memfd

    closing, may_close = threading.Event(), threading.Event()
    real_close = HostedGuest.close

    def slow_close(self: HostedGuest, *, keep_backing: bool = False) -> None:
        closing.set()
        may_close.wait(30)
        real_close(self, keep_backing=keep_backing)

    monkeypatch.setattr(HostedGuest, "close", slow_close)
    table = GuestTable()
    spec = GuestSpec(size=16 * PAGE, workload="idle", seed=1, ops=0)
    table.adopt(HostedGuest("g", spec, "runner", create_memfd("g", spec.size)))
    table.release("g")  # returns while the guest is still being closed
    assert closing.wait(30) and [g.name for g in table.all()] == []
    arrived = threading.Event()
    back = HostedGuest("g", spec, "runner", create_memfd("g", spec.size))
    threading.Thread(target=lambda: (table.adopt(back), arrived.set()), daemon=True).start()
    assert not arrived.wait(0.2)  # the name is taken until the release is done
    may_close.set()
    assert arrived.wait(30) and table.get("g") is back
    monkeypatch.setattr(HostedGuest, "close", real_close)
    table.close_all()
