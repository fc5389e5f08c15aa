"""Synthetic guest content and workloads, over the native engine.

``digest`` is the correctness oracle of the project: a guest migrated at any
moment must end with the same digest as one never migrated.  Workloads are
deterministic: the final memory is a pure function of (initial memory, size,
page size, workload, seed, ops, threads), however the run is paused,
exported and resumed (see native/workload.c).
"""
from __future__ import annotations

import errno
import mmap
from typing import Any

from migrate import names
from migrate.guest._workloads import ffi, lib
from migrate.pages import checksum

#: workload -> native id
WORKLOADS: dict[names.Workload, int] = {
    names.Workload.SEQ_READ: lib.MIG_WL_SEQ_READ,
    names.Workload.SEQ_WRITE: lib.MIG_WL_SEQ_WRITE,
    names.Workload.RANDOM_READ: lib.MIG_WL_RANDOM_READ,
    names.Workload.RANDOM_WRITE: lib.MIG_WL_RANDOM_WRITE,
    names.Workload.HOTSET: lib.MIG_WL_HOTSET,
    names.Workload.ZIPF: lib.MIG_WL_ZIPF,
    names.Workload.IDLE: lib.MIG_WL_IDLE,
    names.Workload.BALLOON: lib.MIG_WL_BALLOON,
}

STATE_VERSION = 1
_U64 = (1 << 64) - 1


def _ptr(buf: Any) -> Any:
    return ffi.from_buffer("uint8_t[]", buf, require_writable=True)


def fill_realistic(buf: Any, page_size: int = mmap.PAGESIZE, seed: int = 1) -> None:
    """Fill a writable buffer with deterministic "realistic" content from `seed`:
    per page ~15% zero, ~40% text-like, ~25% structured records, ~20% random."""
    p = _ptr(buf)
    try:
        lib.mig_fill_realistic(p, len(p), page_size, seed & _U64)
    finally:
        ffi.release(p)


def fill_random(buf: Any, seed: int = 1) -> None:
    """Fill a writable buffer with incompressible bytes, deterministic from `seed`."""
    p = _ptr(buf)
    try:
        lib.mig_fill_random(p, len(p), seed & _U64)
    finally:
        ffi.release(p)


def digest(buf: Any) -> str:
    """64-bit digest of a buffer as 16 hex chars (any single-word change alters it)."""
    return f"{checksum(buf):016x}"


class Workload:
    """A workload engine running native threads over a writable buffer.

    The buffer stays exported (an mmap cannot be closed) until :meth:`close`.
    """

    def __init__(self, buf: Any, *, workload: str, seed: int, ops: int, threads: int = 1,
                 ops_per_sec: float = 0.0, page_size: int = mmap.PAGESIZE) -> None:
        workload = names.parse(names.Workload, workload, "workload")
        self.workload, self.seed, self.ops, self.threads = workload, seed, ops, threads
        self.ops_per_sec, self.page_size = float(ops_per_sec), page_size
        self._buf = _ptr(buf)
        self.size = len(self._buf)
        h = lib.mig_wl_new(self._buf, self.size, page_size, WORKLOADS[workload], seed & _U64, ops,
                           threads, self.ops_per_sec)
        if h == ffi.NULL:
            ffi.release(self._buf)
            raise ValueError(f"invalid workload parameters: size={self.size} page_size={page_size} "
                             f"threads={threads} ops={ops} ops_per_sec={ops_per_sec} (size must be a "
                             f"positive multiple of the page size with at least one page per thread)")
        self._h = h

    @property
    def address(self) -> int:
        """Address of the first byte of the buffer (for userfaultfd registration)."""
        return int(ffi.cast("uintptr_t", self._buf))

    def _handle(self) -> Any:
        if self._h is None:
            raise RuntimeError("workload is closed")
        return self._h

    def start(self) -> None:
        rc = lib.mig_wl_start(self._handle())
        if rc == -errno.EBUSY:
            raise RuntimeError("workload already running")
        if rc:
            raise OSError(-rc, "cannot start workload threads")

    def pause(self) -> None:
        """Stop every thread after its current op and join them."""
        lib.mig_wl_pause(self._handle())

    @property
    def running(self) -> bool:
        return bool(lib.mig_wl_running(self._handle()))

    @property
    def finished(self) -> bool:
        return bool(lib.mig_wl_finished(self._handle()))

    @property
    def ops_done(self) -> int:
        return int(lib.mig_wl_ops_done(self._handle()))

    def wait_finished(self, timeout: float) -> bool:
        return bool(lib.mig_wl_wait_finished(self._handle(), max(0, int(timeout * 1000))))

    def thread_states(self) -> list[dict]:
        out = ffi.new("mig_wl_thread_state *")
        states = []
        for i in range(self.threads):
            lib.mig_wl_get_thread_state(self._handle(), i, out)
            states.append({"ops_done": out.ops_done, "ops_target": out.ops_target, "rng": out.rng,
                           "acc": out.acc, "first_op_ns": out.first_op_ns, "last_op_ns": out.last_op_ns})
        return states

    def first_op_ns(self) -> int:
        """Earliest first-op time of the threads that ran in the latest start (0 if none)."""
        vals = [t["first_op_ns"] for t in self.thread_states() if t["first_op_ns"]]
        return min(vals) if vals else 0

    def last_op_ns(self) -> int:
        return max((t["last_op_ns"] for t in self.thread_states()), default=0)

    def export_state(self) -> dict:
        """The execution state (exact only while paused), JSON-serializable."""
        threads = [{k: t[k] for k in ("ops_done", "rng", "acc", "last_op_ns")} for t in self.thread_states()]
        return {"version": STATE_VERSION, "workload": self.workload, "seed": self.seed, "ops": self.ops,
                "nthreads": self.threads, "size": self.size, "page_size": self.page_size,
                "threads": threads, "last_op_ns": max((t["last_op_ns"] for t in threads), default=0)}

    def import_state(self, state: dict) -> None:
        """Load an exported state (the engine must be paused). ValueError if it does not fit."""
        if not isinstance(state, dict) or not isinstance(state.get("threads"), list):
            raise ValueError("execution state must be a dict with a 'threads' list")
        for key, mine in (("workload", self.workload), ("seed", self.seed), ("ops", self.ops),
                          ("nthreads", self.threads), ("size", self.size), ("page_size", self.page_size)):
            if key in state and state[key] != mine:
                raise ValueError(f"execution state is for {key}={state[key]!r}, this guest has {mine!r}")
        threads = state["threads"]
        if len(threads) != self.threads:
            raise ValueError(f"execution state has {len(threads)} threads, this guest has {self.threads}")
        rows = []
        targets = [t["ops_target"] for t in self.thread_states()]
        for i, t in enumerate(threads):
            try:
                vals = [int(t[k]) for k in ("ops_done", "rng", "acc")]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"execution state thread {i} needs integer ops_done, rng, acc") from None
            if any(v < 0 or v > _U64 for v in vals):
                raise ValueError(f"execution state thread {i} has out-of-range values")
            if vals[0] > targets[i]:
                raise ValueError(f"execution state thread {i}: ops_done {vals[0]} exceeds its share "
                                 f"of {targets[i]} ops")
            rows.append(vals)
        for i, vals in enumerate(rows):
            rc = lib.mig_wl_set_thread_state(self._handle(), i, *vals)
            if rc == -errno.EBUSY:
                raise RuntimeError("cannot import state while the workload runs")
            if rc:
                raise ValueError(f"execution state thread {i}: ops_done {vals[0]} exceeds its share of ops")

    def limit(self, counts: list[int]) -> None:
        """Stop thread i after counts[i] ops (paused only; at most its share): a
        reference run to exactly the op counts a snapshot recorded."""
        if len(counts) != self.threads:
            raise ValueError(f"{len(counts)} op counts for {self.threads} threads")
        for i, n in enumerate(counts):
            rc = lib.mig_wl_limit_thread(self._handle(), i, n)
            if rc == -errno.EBUSY:
                raise RuntimeError("cannot limit a running workload")
            if rc:
                raise ValueError(f"thread {i}: {n} ops exceed its share")

    def watch_discards(self, removed: Any) -> None:
        """Have each discard set its pages' bits in `removed` (a page bitmap's
        ``uint64_t *``; ffi.NULL to stop): write tracking cannot see a discard."""
        lib.mig_wl_watch_discards(self._handle(), removed)

    def attach_snapshot(self, snap: Any) -> None:
        """Have each discard let snapshot `snap` (a ``struct mig_snap *`` of
        migrate._native; ffi.NULL or None to detach) save the range's unsaved
        pages first. Waits for discards in flight. The two extensions share no
        types, so the snapshot and its hook cross as addresses."""
        from migrate._native import ffi as native_ffi
        from migrate._native import lib as native_lib

        if snap is None or snap == native_ffi.NULL:
            lib.mig_wl_before_discard(self._handle(), ffi.NULL, ffi.NULL)
            return
        hook = native_ffi.cast("uintptr_t", native_ffi.addressof(native_lib, "mig_snap_before_discard"))
        lib.mig_wl_before_discard(self._handle(), ffi.cast("mig_wl_discard_fn", int(hook)),
                                  ffi.cast("void *", int(native_ffi.cast("uintptr_t", snap))))

    def close(self) -> None:
        """Pause, free the engine and release the buffer. Idempotent."""
        if self._h is not None:
            lib.mig_wl_free(self._h)
            self._h = None
            ffi.release(self._buf)

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
