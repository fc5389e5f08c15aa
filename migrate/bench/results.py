"""The bench's results file: one JSON line per finished run, appended as it finishes.

Lines are {"kind": "baseline"|"run", "cell": {...}, "key": ..., "rep": N,
"report": {...} | "baseline": {...} | "error": "..."}. Reading the file
back tells which runs are done, which is all resuming needs.
"""
from __future__ import annotations

import dataclasses
import json
import os

from migrate.bench.matrix import Cell


class Results:
    def __init__(self, path: str) -> None:
        self.path = path
        self.records: list[dict] = load(path) if os.path.exists(path) else []
        self._done = {(r["kind"], r["key"], r.get("rep", 0)) for r in self.records}

    def done(self, kind: str, cell: Cell, rep: int = 0) -> bool:
        return (kind, cell.key, rep) in self._done

    def baseline(self, cell: Cell) -> dict | None:
        return next((r for r in self.records if r["kind"] == "baseline" and r["key"] == cell.key), None)

    def add(self, kind: str, cell: Cell, rep: int = 0, **payload: object) -> dict:
        record = {"kind": kind, "key": cell.key, "cell": dataclasses.asdict(cell), "rep": rep, **payload}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)
        self._done.add((kind, cell.key, rep))
        return record


def load(path: str) -> list[dict]:
    """Every complete record of a results file (a line cut short by a crash is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
