"""`migrate abort`: the way out of a post-copy that cannot finish, and never a guest split in two.

A destination agent killed mid-post-copy (no --state-dir: its runner dies
with it) leaves the guest paused on the source; `migrate run` says what to
do next and `migrate abort` resumes the guest there, where it finishes with
the memory of a run never migrated. A run whose guest runs (or completed)
on the destination is refused.
"""
from __future__ import annotations

import mmap
import os
import signal
import subprocess
import threading
import time

import pytest
from by_hand import resumed_on_destination

from migrate import orchestrator, spawn
from migrate.abort import abort
from migrate.client import AgentClient
from migrate.dest.incoming import IncomingRun
from migrate.guest.process import GuestSpec
from migrate.local import LocalAgent, wait_for
from migrate.planes import PageRoute
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import AgentError

MiB = 1 << 20


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(spawn.module_argv("migrate", *args), env=spawn.child_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_of(agent: str, name: str) -> str:
    with AgentClient(agent) as c:
        return c.call("InspectGuest", pb.GuestRef(name=name)).run_id


def received(dst: str, run_id: str) -> float:
    """Share of the run's pages the destination has (0 until it has prepared the run)."""
    with AgentClient(dst) as c:
        try:
            st = c.call("IncomingStatus", pb.RunRef(run_id=run_id))
        except AgentError:
            return 0.0
    return st.pages_received / max(st.pages_total, 1)


def finished_digest(agent: str, name: str) -> str:
    with AgentClient(agent) as c:
        assert wait_for(lambda: c.call("InspectGuest", pb.GuestRef(name=name)).finished, timeout=120)
        return c.call("GuestDigest", pb.GuestRef(name=name), timeout=120).digest


SPEC = pb.GuestSpec(size=32 * MiB, workload="random-write", seed=8, ops=8_000, threads=2, ops_per_sec=2_000,
                    page_size=mmap.PAGESIZE)


def test_destination_killed_mid_postcopy_then_abort_resumes_on_the_source(tmp_path):
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src:
        dst = LocalAgent("dest", log_path=str(tmp_path / "dst.log"))
        try:
            with AgentClient(src.address) as c:
                c.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=SPEC), timeout=120)
            run = subprocess.Popen(
                spawn.module_argv("migrate", "run", "vm", "--from", src.address, "--to", dst.address, "--mode",
                                  "postcopy", "--max-bandwidth", "2M", "--recovery-timeout", "1"),
                env=spawn.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                assert wait_for(lambda: run_of(src.address, "vm") != "", timeout=60)
                run_id = run_of(src.address, "vm")
                assert wait_for(lambda: received(dst.address, run_id) > 0.2, timeout=60)
                os.kill(dst.pid, signal.SIGKILL)  # no --state-dir: its runner dies with it
                _, err = run.communicate(timeout=120)
            finally:
                if run.poll() is None:
                    run.kill()
                    run.wait()
            assert run.returncode == 1
            assert f"next: `migrate run vm --from {src.address} --to {dst.address} --resume`" in err, err
            assert f"`migrate abort vm --from {src.address} --to {dst.address}`" in err, err

            refused = cli("abort", "vm", "--from", src.address, "--to", dst.address)
            assert refused.returncode == 1 and "cannot reach the destination" in refused.stderr, refused.stderr
            assert "--force" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
            with AgentClient(src.address) as c:
                assert c.call("InspectGuest", pb.GuestRef(name="vm")).state == "migrating-out"

            done = cli("abort", "vm", "--from", src.address, "--to", dst.address, "--force")
            assert done.returncode == 0, done.stderr
            assert f"runs on {src.address} again" in done.stdout
            with AgentClient(src.address) as c:
                info = c.call("InspectGuest", pb.GuestRef(name="vm"))
                assert info.state in ("running", "finished") and not info.run_id
            migrated = finished_digest(src.address, "vm")
            ref = pb.GuestSpec()
            ref.CopyFrom(SPEC)
            ref.ops_per_sec = 0
            with AgentClient(src.address) as c:
                c.call("LaunchGuest", pb.LaunchGuestRequest(name="ref", spec=ref), timeout=120)
            assert migrated == finished_digest(src.address, "ref")
        finally:
            dst.stop()
            with AgentClient(src.address) as c:
                for name in ("vm", "ref"):
                    c.stop_if_hosted(name)


def test_abort_after_the_destination_lost_the_run_needs_no_force(tmp_path):
    """A destination restarted without --state-dir knows neither the run nor the guest: safe to resume."""
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src:
        dst = LocalAgent("dest", log_path=str(tmp_path / "dst1.log"))
        second = None
        try:
            with AgentClient(src.address) as c:
                c.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=SPEC), timeout=120)
            opts = orchestrator.RunOptions(mode="postcopy", max_bandwidth=2 * MiB, recovery_timeout=1.0)
            run_id = {}

            def kill_when_underway(status: pb.MigrationStatus) -> None:
                run_id["id"] = status.run_id
                if status.pages_received > status.pages_total // 5 and dst.proc.poll() is None:
                    os.kill(dst.pid, signal.SIGKILL)

            with pytest.raises(orchestrator.RunFailed) as failed:
                orchestrator.migrate("vm", src.address, dst.address, opts, on_status=kill_when_underway)
            assert "--resume" in failed.value.next_step
            dst.proc.wait()
            second = LocalAgent("dest", listen=dst.address, log_path=str(tmp_path / "dst2.log"))
            note = abort("vm", src.address, dst.address)
            assert "had lost the run" in note
            with AgentClient(src.address) as c:
                assert not c.call("InspectGuest", pb.GuestRef(name="vm")).run_id
        finally:
            if second is not None:
                second.stop()
            dst.stop()
            with AgentClient(src.address) as c:
                c.stop_if_hosted("vm")


def test_abort_is_refused_while_the_guest_runs_on_the_destination_and_once_it_completed(agents):
    src, dst = agents
    spec = pb.GuestSpec(size=16 * MiB, workload="random-write", seed=2, ops=4_000, threads=1, ops_per_sec=2_000,
                        page_size=mmap.PAGESIZE)
    with AgentClient(src.address) as s, AgentClient(dst.address) as d:
        s.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=spec), timeout=120)
        run = resumed_on_destination(s, d, "vm", 2 * MiB)  # and the orchestrator died
        try:
            with pytest.raises(AgentError, match="would split it in two"):
                abort("vm", src.address, dst.address)
            with pytest.raises(AgentError, match="name it with --to"):
                abort("vm", src.address)
            assert wait_for(lambda: d.call("IncomingStatus", run).phase == "complete", timeout=120)
            refused = cli("abort", "vm", "--from", src.address, "--to", dst.address)
            assert refused.returncode == 1 and "completed: the guest runs on" in refused.stderr, refused.stderr
            assert "--resume" in refused.stderr
            assert s.call("InspectGuest", pb.GuestRef(name="vm")).state == "migrating-out"  # still paused here
            orchestrator.resume("vm", src.address, dst.address, orchestrator.RunOptions())
            with pytest.raises(AgentError, match="no longer holds"):
                abort("vm", src.address, dst.address)
        finally:
            d.stop_if_hosted("vm")
            s.stop_if_hosted("vm")


class _SlowPath:
    """A path whose stop takes a while and notes how many stops overlap (a unit-test stand-in)."""

    def __init__(self) -> None:
        self.active = self.most = self.stops = 0
        self.lock = threading.Lock()
        self.last: dict = {}

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.active += 1
            self.stops += 1
            self.most = max(self.most, self.active)
        time.sleep(0.2)
        with self.lock:
            self.active -= 1


def test_a_failing_run_and_an_abort_never_stop_its_paths_at_once():
    """The watcher failing a run and an AbortIncoming closing it arrive together: two stops of
    one path closed its descriptors twice (CI saw EBADF reach AbortIncoming)."""
    run = IncomingRun("r", "vm", GuestSpec(size=16 * MiB), PageRoute("127.0.0.1:1"))
    paths = [_SlowPath(), _SlowPath()]
    run.paths = {"bulk": paths[0], "faults": paths[1]}  # type: ignore[dict-item]
    failing = threading.Thread(target=run._fail, args=("lost",))
    failing.start()
    time.sleep(0.05)  # the watcher is inside the first stop
    run.close()
    failing.join()
    assert run.phase == "failed" and run.error == "lost"
    assert [p.most for p in paths] == [1, 1] and all(p.stops >= 1 for p in paths)


def test_a_wait_for_the_end_returns_as_the_run_fails():
    """WaitIncoming wakes its callers when the run ends: a client learns of it at once, not at its next look."""
    run = IncomingRun("r", "vm", GuestSpec(size=16 * MiB), PageRoute("127.0.0.1:1"))
    seen: list = []
    waiter = threading.Thread(target=lambda: seen.append(run.wait_end(120)))
    waiter.start()
    run._fail("lost")
    waiter.join(60)
    assert not waiter.is_alive() and seen[0].phase == "failed" and seen[0].error == "lost"
    assert run.wait_end(120).phase == "failed"  # and at once after it
