"""The process trees under given roots, read from /proc: what the benchmark scripts measure an agent (or a
VMM) by, its bulk servers, workers and guest runners included.

Standard library only: scripts/ started as `python -P` import it beside their own helpers, and it must not
load the native layer (migrate._native) they may not need.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable


def children(pid: int) -> list[int]:
    """The child processes of every thread of `pid` (an agent starts its guest runners and bulk servers from
    any of its threads; /proc/PID/task/PID/children lists the main thread's only). [] once it is gone."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return out


def descendants(roots: Iterable[int], enter: Callable[[int], bool] = lambda pid: True) -> dict[int, int]:
    """Each root and every process below it, mapped to the root it is under (the first root, should trees
    share a process). `enter(pid)`, asked once of each process found: whether to walk its children too (a
    benchmark leaves a guest runner's own children out, or a process it cannot tell yet). Only the trees'
    processes are read, not all of /proc, so sampling every 50 ms costs the measured machine little."""
    out: dict[int, int] = {}
    for root in roots:
        todo = [root]
        while todo:
            pid = todo.pop()
            if pid in out:
                continue
            out[pid] = root
            if enter(pid):
                todo += children(pid)
    return out
