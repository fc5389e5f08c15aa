"""What the destination's two paths share: the guest memory they install into.

The urgent path (dest/faults.py) and the bulk path (dest/bulk.py) both run
as threads of the destination agent. Each installs pages with the native
layer into the guest's userfaultfd and sets bits in the received bitmap,
which the incoming run owns.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from migrate.bitmap import SharedBitmap
from migrate.uffd import FaultReader, InstallStats, Region, Uffd

log = logging.getLogger(__name__)

#: Refused (corrupt) batches a path asks again for before it gives up on the source.
MAX_REFUSED = 100


def guarded(what: str, body: Callable[[], None], fail: Callable[[str], None]) -> Callable[[], None]:
    """`body` as a path's thread target: an exception it does not expect (a bug)
    is logged with its traceback and fails the run through `fail`, instead of
    ending the thread quietly and leaving the run waiting for pages forever."""

    def run() -> None:
        try:
            body()
        except Exception as err:  # noqa: BLE001 - whatever it is, the run must hear of it
            report_bug(what, err, fail)

    return run


def report_bug(what: str, err: Exception, fail: Callable[[str], None]) -> None:
    """Log an exception nobody expected, with its traceback, and fail the run with it (call from an except)."""
    log.exception("%s failed", what)
    fail(f"{what} failed: {err!r}")


@dataclass
class Memory:
    """The guest memory a path installs into: its received bitmap and its installer."""

    bitmap: SharedBitmap
    io: FaultReader

    @classmethod
    def over(cls, uffd: Uffd | int, bitmap: SharedBitmap, regions: list[Region], page_size: int) -> Memory:
        """Memory behind `uffd`, mapped as `regions`."""
        return cls(bitmap, FaultReader(uffd, regions, page_size))

    @property
    def page_count(self) -> int:
        return self.bitmap.nbits

    @property
    def page_size(self) -> int:
        return self.io.page_size

    def count(self, counters: dict, done: InstallStats) -> None:
        """Add an install to a path's "pages", "zero" ("zero_lazy": of them, left as holes),
        "bytes_pages" and "duplicates" (pages that came again, found already in place) counters."""
        counters["duplicates"] = counters.get("duplicates", 0) + done.skipped + done.eexist
        counters["pages"] += done.installed
        counters["zero"] += done.zeroed
        counters["zero_lazy"] = counters.get("zero_lazy", 0) + done.lazy
        counters["bytes_pages"] += done.installed * self.page_size


def note_events(run_id: str, events: dict) -> None:
    """Log what the guest did to its memory during the run (the events the fault path handled).

    A fork is worth a look: its child's userfaultfd was refused (closed), so the
    child's copy of the pages that had not arrived reads as zeros
    (docs/architecture.md, "Non-cooperative events").
    """
    if events.get("fork"):
        log.warning("run %s: the guest forked %d time(s) during the restore; each child's userfaultfd was "
                    "refused: pages that had not arrived read as zeros in the child", run_id, events["fork"])
    moved = {k: v for k, v in events.items() if v and k != "fork"}
    if moved:
        log.info("run %s: guest memory events %s", run_id, ", ".join(f"{k}={v}" for k, v in moved.items()))

