"""The runner's half of a live snapshot: one write-protect instant, then native savers.

The runner registers its RAM with a *synchronous* write-protect userfaultfd
(no WP_ASYNC: a write to a protected page blocks the writer until it is
unprotected), pauses the workload, protects all of it and records the
workload's execution state, resumes; that instant is the snapshot. Then
two C threads (native/snapshot.c) save every page into the image file: the
fault thread saves a page the guest writes before unprotecting it, the
stream thread walks the rest. A discard raises no fault (a zap is no write),
so the guest's discard path lets the snapshot save the range's unsaved pages
first (Workload.attach_snapshot). Python only starts them, reads counters and
frees them; page bytes never enter it.
"""
from __future__ import annotations

import os
import threading
import time

from migrate import uffd as U
from migrate._native import ffi, lib
from migrate.errors import os_error
from migrate.guest.workloads import Workload

#: Bytes the stream thread saves between two unprotects.
CHUNK_BYTES = 1 << 20


class LiveSnapshot:
    """One snapshot of a runner's RAM into `out_fd` (owned from now on)."""

    def __init__(self, wl: Workload, out_fd: int, page_size: int) -> None:
        self.out_fd = out_fd
        self._h = None
        self._lock = threading.Lock()
        self.result: dict | None = None
        self.uffd: U.Uffd | None = U.Uffd.create(U.FEATURE_WP_HUGETLBFS_SHMEM, page_size=page_size)
        try:
            self.uffd.register(wl.address, wl.size, U.MODE_WP)
        except OSError:
            self.close()
            raise
        self.wl = wl
        self.page_size = page_size

    def take(self) -> dict:
        """Protect everything at one instant and start saving; returns the state at that instant.

        The workload pauses for the protect and the state export only (the
        caller holds the runner's control lock), and resumes if it was running.
        """
        was_running = self.wl.running
        t0 = time.monotonic_ns()
        self.wl.pause()
        state = self.wl.export_state()
        assert self.uffd is not None, "a closed snapshot takes nothing"
        try:
            self.uffd.writeprotect(self.wl.address, self.wl.size, True)
            chunk = max(1, CHUNK_BYTES // self.page_size)
            h = lib.mig_snap_start(self.uffd.fd, self.out_fd, ffi.cast("uint8_t *", self.wl.address),
                                   self.wl.size, self.page_size, chunk)
            if h == ffi.NULL:
                err = ffi.errno
                self.uffd.writeprotect(self.wl.address, self.wl.size, False)
                raise os_error(err, "starting the snapshot threads")
            self._h = h
            self.wl.attach_snapshot(h)  # a discard saves its unsaved pages first
        finally:
            if was_running:
                self.wl.start()
        threading.Thread(target=self._finish, daemon=True, name="snapshot-end").start()
        t1 = time.monotonic_ns()
        ops = sum(int(t["ops_done"]) for t in state["threads"])
        return {"state": state, "ops": ops, "downtime_ms": (t1 - t0) / 1e6, "t_ns": time.time_ns()}

    def _finish(self) -> None:
        """At the end: the counters and the guest's ops at that moment, then free everything."""
        while not lib.mig_snap_wait(self._h, 1000):
            pass
        with self._lock:
            doc = self._stats()
            self.close()
            self.result = doc

    def _stats(self) -> dict:
        st = ffi.new("struct mig_snap_stats *")
        lib.mig_snap_stats(self._h, st)
        names = ("pages_total", "pages_saved", "pages_streamed", "pages_faulted", "pages_discarded", "wp_faults",
                 "waited", "blocked_ns", "max_blocked_ns", "bytes_written", "elapsed_ns", "done")
        doc: dict[str, int | bool | str] = {k: int(getattr(st, k)) for k in names}
        doc["done"] = bool(doc["done"])
        doc["error"] = os.strerror(-st.error) if st.error else ""
        doc["ops_done"] = self.wl.ops_done
        return doc

    def status(self) -> dict:
        """Counters so far (``done``: every page saved, the threads freed, the registration dropped)."""
        with self._lock:
            if self.result is not None:
                return self.result
            doc = self._stats()
            doc["done"] = False  # until _finish has freed everything
            return doc

    def close(self) -> None:
        """Stop (every page unprotected first), free, unregister, close the file. Idempotent."""
        if self._h is not None:
            self.wl.attach_snapshot(ffi.NULL)  # waits for discards in flight
            lib.mig_snap_free(self._h)
            self._h = None
        if self.uffd is not None:
            self.uffd.close()  # the last fd of the registration: the range is unregistered
            self.uffd = None
        if self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1
