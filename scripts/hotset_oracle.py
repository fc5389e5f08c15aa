"""An oracle policy for the `hotset` workload: push every guest thread's hot tenth first.

No policy can know the hot set better than this one, which reads it off the
workload's definition (native/workload.c: each thread works on its own
slice of RAM and puts 90 % of its accesses on the slice's first tenth, the
rest uniformly over the other nine tenths). Its remote faults bound what
any push order can save on hotset under a bandwidth cap: the faults left
are the uniform cold accesses, which no order foresees.

    PYTHONPATH=.:scripts python scripts/bench_policies.py --workloads hotset --skip-reap \\
        --policies "sequential hotset_oracle:HotFirst bubble trend"

(`--policy hotset_oracle:HotFirst:threads=4` with `--threads 4`.)
"""
from __future__ import annotations

from migrate.policies.base import Decision, Policy, RunInfo


def hot_tenths(npages: int, threads: int) -> list[tuple[int, int]]:
    """(first page, count) of each thread's hot tenth, as native/workload.c lays them out."""
    slices = [(npages * i // threads, npages * (i + 1) // threads) for i in range(threads)]
    return [(first, max((end - first) // 10, 1)) for first, end in slices]


class HotFirst(Policy):
    """Queue each thread's hot tenth ahead of the cursor, then let the cursor walk on."""

    name = "hotset-oracle"
    params = {"threads": int}

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def start(self, run: RunInfo) -> Decision:
        return Decision(push=hot_tenths(run.npages, self.threads))
