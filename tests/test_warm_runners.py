"""Warm guest runners (migrate.guest.warm): a destination's run takes a pre-started runner, the pool refills,
a runner that died idle is replaced and never handed out, and nothing outlives the pool or the agent."""
from __future__ import annotations

import mmap
import os
import signal

import pytest
from conftest import descendants
from test_kvm import SIZE as KVM_SIZE
from test_kvm import needs_image, needs_kvm

from migrate import orchestrator, spawn
from migrate.client import AgentClient
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guest.warm import RUNNER_NAME, WAITING_NAME, WarmPool
from migrate.local import LocalAgent, wait_for
from migrate.proto import migrate_pb2 as pb

RUNNER = "migrate.guest.runner"
SPEC = GuestSpec(size=64 * mmap.PAGESIZE, workload="hotset", ops=10**12, ops_per_sec=1000.0)


def warm_pids(agent_pid: int, module: str = "") -> set[int]:
    """The agent's children started as warm runners (of `module`; idle, or since taken by a guest)."""
    found = set()
    for pid in descendants(agent_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"migrate.guest.warm" in argv and (not module or module.encode() in argv):
                found.add(pid)
        except OSError:
            pass
    return found


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_a_restore_guest_takes_a_warm_runner_and_the_pool_refills(memfds) -> None:
    with WarmPool(1, (RUNNER,)) as pool:
        assert wait_for(lambda: len(pool.idle(RUNNER)) == 1, 60)
        [ready] = pool.idle(RUNNER)
        # it imports with the CPU time others leave (where the agent may bring it back), and runs a guest normally
        assert os.sched_getscheduler(ready) == (os.SCHED_IDLE if pool.lie_low else os.SCHED_OTHER)
        assert comm(ready) == WAITING_NAME  # ps tells a waiting runner (and the leak check lets a refill be)
        guest = GuestProcess.launch(SPEC, memfds(SPEC.size), restore=True, warm=pool)
        try:
            assert guest.warm and guest.pid == ready
            assert os.sched_getscheduler(guest.pid) == os.SCHED_OTHER
            assert comm(guest.pid) == RUNNER_NAME
            assert guest.uffd is not None and guest.regions[0].size == SPEC.size  # its handshake came through
            assert wait_for(lambda: len(pool.idle(RUNNER)) == 1, 60), "the pool did not start another"
            assert pool.idle(RUNNER) != [ready]
        finally:
            if guest.uffd is not None:
                os.close(guest.uffd)
            guest.stop()
        assert not spawn.alive(ready)


def test_a_warm_runner_runs_a_paused_guest_it_is_given(memfds) -> None:
    """The pre-copy mode's runner (paused, RAM untouched) from the pool: it resumes and its workload runs."""
    with WarmPool(1, (RUNNER,)) as pool:
        assert wait_for(lambda: pool.idle(RUNNER), 60)
        guest = GuestProcess.launch(SPEC, memfds(SPEC.size), start_paused=True, fill=False, warm=pool)
        try:
            assert guest.warm
            guest.resume()
            assert wait_for(lambda: guest.stats()["ops_done"] > 0, 60)
        finally:
            guest.stop()


def test_a_warm_runner_that_died_is_replaced_not_handed_out(memfds) -> None:
    with WarmPool(1, (RUNNER,)) as pool:
        assert wait_for(lambda: pool.idle(RUNNER), 60)
        [dead] = pool.idle(RUNNER)
        os.kill(dead, signal.SIGKILL)
        assert wait_for(lambda: not spawn.alive(dead), 60)  # a zombie: the pool has not looked yet, or has
        guest = GuestProcess.launch(SPEC, memfds(SPEC.size), restore=True, warm=pool)
        try:
            assert guest.pid != dead and guest.uffd is not None  # a replacement, or a fresh start
        finally:
            if guest.uffd is not None:
                os.close(guest.uffd)
            guest.stop()
        assert wait_for(lambda: len(pool.idle(RUNNER)) == 1, 60), "the dead one was not replaced"
        assert dead not in pool.idle(RUNNER)


def test_closing_the_pool_ends_its_idle_runners() -> None:
    pool = WarmPool(2, (RUNNER,))
    assert wait_for(lambda: len(pool.idle(RUNNER)) == 2, 60)
    pids = pool.idle(RUNNER)
    pool.close()
    assert not any(spawn.alive(pid) for pid in pids)
    assert pool.take(RUNNER) is None


def test_a_pool_of_none_starts_nothing(memfds) -> None:
    with WarmPool(0, (RUNNER,)) as pool:
        guest = GuestProcess.launch(SPEC, memfds(SPEC.size), start_paused=True, fill=False, warm=pool)
        try:
            assert not guest.warm
        finally:
            guest.stop()
    with pytest.raises(ValueError, match="warm runners"):
        WarmPool(-1, (RUNNER,))


def _migrate(src: LocalAgent, dst: LocalAgent, name: str) -> dict:
    spec = pb.GuestSpec(size=SPEC.size, workload="hotset", ops=10**12, ops_per_sec=1000.0,
                        page_size=mmap.PAGESIZE)
    with AgentClient(src.address) as client:
        client.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec))
    return orchestrator.migrate(name, src.address, dst.address, orchestrator.RunOptions(timeout=120))


@pytest.mark.parametrize("warm", [2, 0])
def test_an_incoming_run_says_whether_its_runner_was_warm(tmp_path, warm: int) -> None:
    """The destination's log and the run's report say which runner took the guest; stopping the agent leaves
    no runner, warm or taken, behind."""
    log = tmp_path / "dest.log"
    with LocalAgent("source", log_path=str(tmp_path / "source.log")) as src, \
            LocalAgent("dest", "--warm-runners", str(warm), log_path=str(log)) as dst:
        assert wait_for(lambda: len(warm_pids(dst.pid)) >= warm, 60)
        before = warm_pids(dst.pid)
        doc = _migrate(src, dst, "w")
        assert doc["warm_runner"] is bool(warm)
        assert wait_for(lambda: len(warm_pids(dst.pid) - before) >= min(warm, 1), 60), "not refilled"
        started = warm_pids(dst.pid)
    assert ("warm (pre-started)" in log.read_text()) is bool(warm)
    assert not any(spawn.alive(pid) for pid in started)


@needs_kvm
@needs_image
def test_a_kvm_guest_arrives_in_a_warm_kvm_runner(agents) -> None:
    """Where /dev/kvm works the destination keeps the kvm kind's runners warm too."""
    src, dst = agents
    assert wait_for(lambda: warm_pids(dst.pid, "migrate.guest.kvm"), 60)
    spec = pb.GuestSpec(size=KVM_SIZE, workload="random-write", seed=3, ops=10**12, threads=1,
                        page_size=mmap.PAGESIZE, kind="kvm")
    with AgentClient(src.address) as client:
        client.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=spec), timeout=600)
    try:
        doc = orchestrator.migrate("vm", src.address, dst.address, orchestrator.RunOptions(timeout=120))
    finally:
        with AgentClient(dst.address) as client:
            client.stop_if_hosted("vm")
    assert doc["warm_runner"] is True and doc["guest"]["kind"] == "kvm"
