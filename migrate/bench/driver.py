"""Runs a bench matrix, resumably: every finished run is on disk before the next starts."""
from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Callable

from migrate.bench import runs, summary
from migrate.bench.hosts import hosts
from migrate.bench.matrix import Cell, Matrix
from migrate.bench.results import Results
from migrate.rpc import AgentError

RESULTS, SUMMARY = "bench.jsonl", "summary.csv"


def _pending(res: Results, cell: Cell, reps: int) -> int:
    return (not res.done("baseline", cell)) + sum(not res.done("run", cell, r) for r in range(reps))


def run_matrix(m: Matrix, out_dir: str, say: Callable[[str], None]) -> list[dict]:
    """Run every cell not already in out_dir/bench.jsonl; write summary.csv; return its rows."""
    os.makedirs(out_dir, exist_ok=True)
    res = Results(os.path.join(out_dir, RESULTS))
    cells = []
    for c in m.cells():
        if runs.mode_supported(c.mode):
            cells.append(c)
        else:
            say(f"skipping {c.describe()}: this build's `migrate run` has no --mode (issue 3)")
    total = sum(1 + m.reps for _ in cells)
    todo = sum(_pending(res, c, m.reps) for c in cells)
    if todo < total:
        say(f"resuming: {total - todo} of {total} runs already in {res.path}")
    step = total - todo
    for (link, level), same_host in itertools.groupby(cells, key=lambda c: (c.link, c.level)):
        group = [c for c in same_host if _pending(res, c, m.reps)]
        if not group:
            continue
        say(f"starting agents for link {link}, zstd level {level}")
        with hosts(link, level, out_dir) as h:
            for cell in group:
                step = _run_cell(h, cell, m, res, step, total, say)
    rows = summary.cells(res.records)
    summary.write_csv(rows, os.path.join(out_dir, SUMMARY))
    return rows


def _run_cell(h, cell: Cell, m: Matrix, res: Results, step: int, total: int,
              say: Callable[[str], None]) -> int:
    """The cell's baseline (if not done) and its missing reps; returns the updated step count."""
    tag = f"g{zlib.crc32(cell.key.encode()) % 10**6}"
    if not res.done("baseline", cell):
        step += 1
        say(f"[{step}/{total}] {cell.describe()}: baseline (not migrated)")
        try:
            b = runs.baseline(h, cell, m, f"{tag}-base")
            res.add("baseline", cell, baseline=b)
            say(f"          {b['wall_s']:.2f} s, {b['ops_per_s']:,.0f} ops/s")
        except AgentError as err:
            res.add("baseline", cell, error=str(err))
            say(f"          failed: {err}")
    base = res.baseline(cell)
    for rep in range(m.reps):
        if res.done("run", cell, rep):
            continue
        step += 1
        say(f"[{step}/{total}] {cell.describe()}: rep {rep + 1}/{m.reps}")
        if not base or "baseline" not in base:
            res.add("run", cell, rep, error="no baseline to compare with")
            continue
        try:
            doc = runs.migrated(h, cell, m, f"{tag}-{rep}", base["baseline"]["digest"])
            res.add("run", cell, rep, report=doc)
            lat = doc["faults"]["latency_us"]
            say(f"          total {doc['total_s']:.2f} s, downtime {doc['downtime_ms']:.1f} ms, "
                f"{doc['faults']['count']} faults (p50 {lat['p50']:.0f} µs), "
                f"{'verified' if doc['verified'] else 'DIGEST DIFFERS'}")
        except AgentError as err:
            res.add("run", cell, rep, error=str(err))
            say(f"          failed: {err}")
    return step
