"""Starting our own Python child processes (runners, bulk page servers, agents).

A child must import exactly the `migrate` package its parent runs, not
whatever `migrate/` directory happens to be in the current directory (a
source checkout without the compiled extension, say). So children run with
-P (no current directory on sys.path) and PYTHONPATH pointing at the
parent's package root.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import migrate

_ROOT = str(Path(migrate.__file__).resolve().parent.parent)


def module_argv(module: str, *args: str) -> list[str]:
    """argv running `python -m module args...` in a child."""
    return [sys.executable, "-P", "-m", module, *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours, with our package root first on PYTHONPATH."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _ROOT + (os.pathsep + old if old else "")
    if extra:
        env.update(extra)
    return env


#: prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def die_with_parent(enabled: bool = True) -> None:
    """Be killed (SIGKILL) when the parent dies, even by SIGKILL, so that no
    orphan keeps serving, or keeps guest memory mapped (`enabled` False:
    no longer; a warm runner becoming one that outlives its agent).

    Linux sends the signal when the parent *thread* that started this
    process ends: agents start their children from the main thread or from
    gRPC's pool threads, which live as long as the agent. Call it first
    thing; a parent that died before the call is noticed some other way
    (the bulk page server's stdin is at EOF then).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL if enabled else 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def yield_cpu_to_urgent_work() -> None:
    """Let the fault path preempt the gRPC plane's bulk path: SCHED_BATCH, at the caller's niceness.

    On Linux the policy belongs to the calling thread and passes to the
    threads it starts: the source's bulk server calls this first thing (the
    whole process), the destination's bulk path from its own thread. A
    SCHED_BATCH thread never preempts a thread that wakes, so a fault
    thread (raised: urgent_thread) gets the CPU first; at the guests'
    niceness the bulk still competes with them as an equal. Niced (+10,
    weight 110 against a guest's 1024), busy guests took ~90 % of a core
    from it and a drain's runs grew with each guest moved (docs/performance.md,
    "Bulk priority in a drain"), as on the native plane (native/dp_common.h).
    SCHED_IDLE was tried too: faults got no faster, and a guest that keeps
    faulting starved the bulk stream (1 GiB post-copy took 20-30 % longer).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):
        pass  # not Linux: the bulk runs as any thread


#: The niceness the gRPC fault path's threads ask for (the native fault
#: threads ask for SCHED_FIFO, and this where that is refused).
URGENT_NICE = -10


@contextlib.contextmanager
def urgent_thread() -> Iterator[None]:
    """Run the calling thread at URGENT_NICE for the block, then at its niceness before.

    For the gRPC fault path's threads (the source's Pages.Fetch handler, a
    pool thread lent for the call; the destination's two urgent-path threads,
    which serve nothing else, stay raised): a fault must not wait behind
    the bulk threads, which run at the agent's niceness, nor behind the
    guests' own. Best effort: without the privilege to lower a
    niceness (root, CAP_SYS_NICE or RLIMIT_NICE) the thread stays as it is.
    """
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    raise_to_urgent()
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, tid, before)  # raising a niceness is always permitted


def raise_to_urgent() -> None:
    """Run the calling thread at URGENT_NICE from now on (best effort, as urgent_thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), URGENT_NICE)
    except OSError:
        pass  # not permitted: the fault path runs at the bulk's weight


#: Allocations below this come from the heap: page batches (up to 1 MiB) and gRPC's socket read buffers (up to 4 MiB).
_MMAP_THRESHOLD = 8 << 20
#: Free heap memory beyond this is given back to the kernel (more kept measured no faster).
_TRIM_THRESHOLD = 2 << 20
#: Malloc arenas: one, shared by all threads. With one per thread (gRPC's, the
#: installers), each arena keeps its own free megabytes: +10-40 MiB measured.
_ARENA_MAX = 1


def tune_allocator() -> None:
    """Reuse megabyte-sized message buffers instead of mapping each one afresh.

    For a process that moves pages through gRPC (agents, the bulk page
    server); call it first thing, before threads start. See native/alloc.c
    for why: by default every 1 MiB batch costs 256 page faults, twice.
    """
    from migrate._native import lib  # here: starting children (migrate.local) needs no native layer
    if lib.mig_tune_malloc(_MMAP_THRESHOLD, _TRIM_THRESHOLD, _ARENA_MAX) < 0:
        raise OSError("mallopt refused the allocator settings")


def alive(pid: int) -> bool:
    """True if `pid` runs (and is not a zombie), whoever its parent is."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
