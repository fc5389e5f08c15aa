"""Shared fixtures: local agents, and a leak check around every test.

After each test no process started by it may still run, and this process
may hold no more memfds or sockets than before: every test and tool cleans
up after itself.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from migrate.guest.process import GuestSpec
from migrate.guest.warm import WAITING_NAME
from migrate.guest.workloads import Workload, digest, fill_realistic
from migrate.local import LocalAgent


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> set[int]:
    """PIDs of every living descendant of `pid` (from /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(int(entry))) is not None and fields[0] != "Z":
            parent[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        frontier.extend(kids)
    return found


def fd_kinds() -> dict[str, int]:
    """How many memfds and sockets this process holds."""
    kinds = {"memfd": 0, "socket": 0}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            kinds["memfd"] += 1
        elif target.startswith("socket:"):
            kinds["socket"] += 1
    return kinds


def refilled_warm_runner(pid: int, before: set[int]) -> bool:
    """A waiting warm runner that an agent older than the test started (a module-scoped agent
    refills its pool when a test's run takes one): the agent's, not the test's."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            name = f.read().strip()
    except OSError:
        return True  # gone meanwhile
    fields = stat_fields(pid)
    return fields is None or (name == WAITING_NAME and int(fields[1]) in before)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves processes, memfds or sockets behind."""
    before_procs = descendants(os.getpid())
    before_fds = fd_kinds()
    yield
    if request.node.get_closest_marker("allow_shared_agents"):
        return
    deadline = time.monotonic() + 10
    while True:
        left = {pid for pid in descendants(os.getpid()) - before_procs if not refilled_warm_runner(pid, before_procs)}
        fds = fd_kinds()
        grew = {k: fds[k] - before_fds[k] for k in fds if fds[k] > before_fds[k]}
        if not left and not grew.get("memfd"):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"test left behind processes {sorted(left)} / fds {grew}")
        time.sleep(0.1)


@pytest.fixture
def memfds() -> Iterator[Callable[[int], int]]:
    """make(size): a fresh memfd of `size` bytes, closed after the test."""
    made: list[int] = []

    def make(size: int) -> int:
        fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        os.close(fd)


@pytest.fixture
def reference_digest() -> Callable[[GuestSpec], str]:
    """digest(spec): the memory digest of a never-migrated, never-paused run of `spec`, computed in-process."""

    def compute(spec: GuestSpec) -> str:
        buf = bytearray(spec.size)
        fill_realistic(buf, spec.page_size, spec.seed)
        with Workload(buf, workload=spec.workload, seed=spec.seed, ops=spec.ops, threads=spec.threads,
                      page_size=spec.page_size) as wl:
            wl.start()
            assert wl.wait_finished(300)
        return digest(buf)

    return compute


@pytest.fixture
def agents(tmp_path) -> Iterator[tuple[LocalAgent, LocalAgent]]:
    """A source and a destination agent on loopback, stopped after the test."""
    with LocalAgent("source", log_path=str(tmp_path / "source.log")) as src, \
            LocalAgent("dest", log_path=str(tmp_path / "dest.log")) as dst:
        yield src, dst


@pytest.fixture(params=["native", "grpc"])
def plane(request: pytest.FixtureRequest) -> str:
    """The data plane a migration test runs on: every core case runs on both."""
    return request.param
