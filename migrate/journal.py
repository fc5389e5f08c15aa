"""An agent's journal of its migrations, for surviving a restart.

With `--state-dir DIR` an agent records each run it could finish after a
crash in DIR/RUN.json. On the destination every incoming run, whose guest
runner listens on DIR/RUN.sock and outlives the agent: faulting guest
threads stay blocked on its userfaultfd, never fed a zero page; a restarted
agent rejoins each runner (getting its uffd and RAM back), rebuilds the
received bitmap from what RAM really holds, starts both paths afresh and finishes
the run. On the source every switched-over run of a file-backed guest: a
restarted agent serves its pages again from the file, on the same ports.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class Journal:
    """One JSON file per incoming run in `state_dir` (created 0700)."""

    def __init__(self, state_dir: str) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def socket_path(self, run_id: str) -> str:
        return str(self.dir / f"{run_id}.sock")

    def save(self, run_id: str, record: dict) -> None:
        """Write atomically (rename): a crash never leaves half a record."""
        tmp = self.dir / f".{run_id}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.dir / f"{run_id}.json")

    def drop(self, run_id: str) -> None:
        (self.dir / f"{run_id}.json").unlink(missing_ok=True)

    def records(self) -> list[dict]:
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                path.unlink(missing_ok=True)  # unreadable: nothing to resume from it
        return out


def resident_ranges(fd: int, size: int, page_size: int) -> list[tuple[int, int]]:
    """(first page, count) runs of pages `fd` holds data for (SEEK_DATA/SEEK_HOLE).

    A page installed by UFFDIO_COPY or UFFDIO_ZEROPAGE, or written by
    pre-copy, is in the memfd; a page never received is a hole.
    """
    ranges = []
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past offset
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        first = data // page_size
        ranges.append((first, (hole + page_size - 1) // page_size - first))
        offset = hole
    return ranges
