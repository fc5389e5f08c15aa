"""The native data plane's destination side: C threads pull, verify and install pages.

Drop-in replacements for the gRPC paths, with the same interfaces:
NativeBulk for dest.bulk.BulkLoop, NativePrecopy for dest.precopy.PrecopyPuller
and NativeFaultLoop for dest.faults.FaultLoop. Page bytes never reach Python:
each path is a handle on C threads (native/dp_dest.c) that Python starts,
watches (counters, an error string) and stops. Wire format and behaviour:
docs/protocol.md, "Native data plane".
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from migrate import errors, stats
from migrate._native import ffi, lib
from migrate.bitmap import SharedBitmap
from migrate.dest.paths import Memory
from migrate.dest.precopy import RoundStats
from migrate.policies.base import SHAPES, Neighbourhood
from migrate.rpc import DEFAULT_RECOVERY_TIMEOUT

_ERR_LEN = 512
#: Counters every path reports (names as the gRPC paths' `last`).
_COMMON = ("pages", "zero", "zero_lazy", "bytes_wire", "bytes_pages", "batches", "refused", "duplicates", "requests",
           "outages")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"data endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


class _Handle:
    """One C path (struct mig_dpd): its counters and error, and a stop that joins its threads."""

    def __init__(self, handle: object, owned: list[object]) -> None:
        self.h = handle
        self._counters = lib.mig_dpd_counters(handle)
        # Freed when the wrapper goes: the threads are joined first, then what they pointed at is let go.
        self._finalizer = weakref.finalize(self, _free, handle, owned)

    def counters(self) -> dict:
        c = self._counters
        out = {name: int(getattr(c, name)) for name in _COMMON}
        out["link_down"] = bool(c.link_down)
        out["paused_s"] = round(c.paused_ns / 1e9, 3)
        return out

    def error(self) -> str | None:
        err = lib.mig_dpd_error(self.h)
        return None if err == ffi.NULL else ffi.string(err).decode(errors="replace")

    def stop(self) -> None:
        lib.mig_dpd_stop(self.h)  # joins the threads; the GIL is released meanwhile

    def free(self) -> None:
        self._finalizer()


def _free(handle: Any, owned: list[Any]) -> None:
    lib.mig_dpd_free(handle)
    for obj in owned:
        close = getattr(obj, "close", None)
        if close is not None:
            close()


def _open(kind: str, endpoint: str, create: Callable[..., Any]) -> Any:
    """Call a C constructor that connects (create(host, port, err, err_len)); ConnectionError if it cannot."""
    host, port = split_endpoint(endpoint)
    err = ffi.new("char[]", _ERR_LEN)
    handle = create(host.encode(), port, err, _ERR_LEN)
    if handle == ffi.NULL:
        raise errors.AgentUnreachable(f"destination {kind}: {ffi.string(err).decode(errors='replace')}")
    return handle


def _check_key(key: bytes) -> bytes:
    if len(key) != lib.DP_KEY_LEN:
        raise ValueError(f"a data plane key has {lib.DP_KEY_LEN} bytes, not {len(key)}")
    return bytes(key)


class _Path:
    """What NativeBulk and NativeFaultLoop share: counters while running, a summary once stopped."""

    _path: _Handle
    _summary: dict | None = None

    def _snapshot(self) -> dict:
        raise NotImplementedError

    @property
    def last(self) -> dict:
        """The counters; after stop(), the final ones."""
        if self._summary is not None:
            return self._summary
        out = self._snapshot()
        if err := self._path.error():
            out["error"] = err
        return out

    def failure(self) -> str | None:
        """Why the path stopped serving, or None while it serves (or is done)."""
        return self._path.error()


class NativeBulk(_Path):
    """The bulk path of one incoming run over the native data plane (same interface as BulkLoop).

    Connecting happens here: a source that cannot be reached raises
    ConnectionError, before the guest ever stops on the source. Nothing moves
    until start(), at switchover. `asked` is the bitmap of pages asked and
    not yet in (either path's), which the native fault path shares.
    """

    def __init__(self, mem: Memory, endpoint: str, key: bytes, recovery_timeout: float) -> None:
        self._mem = mem
        self.asked = SharedBitmap.create(mem.page_count)
        space, received = mem.io.target(mem.bitmap)
        try:
            handle = _open("bulk path", endpoint, lambda host, port, err, n: lib.mig_dpd_bulk_new(
                host, port, _check_key(key), mem.io.fd, 0, space, mem.page_size, mem.page_count, received,
                self.asked.ptr, recovery_timeout, err, n))
        except BaseException:
            self.asked.close()
            raise
        self._path = _Handle(handle, [self.asked])

    def start(self, max_bandwidth: int) -> None:
        """Pull every missing page, at most `max_bandwidth` bytes/s (0: no limit)."""
        r = lib.mig_dpd_round(self._path.h, max_bandwidth, 0.0)
        if r < 0:
            raise OSError(-r, f"starting the native bulk path: {self._path.error() or 'failed'}")

    def set_bandwidth(self, max_bandwidth: int) -> None:
        """Pace the pull at `max_bandwidth` bytes/s from now on (0: unlimited); the fault path never is."""
        lib.mig_dpd_set_bandwidth(self._path.h, max_bandwidth)

    def jump(self, page: int) -> None:
        """Go on from `page` next (where the guest faults), with the window narrowed while faults
        come (a gRPC fault path's: its faults wait for the pages this path has in flight)."""
        lib.mig_dpd_jump(self._path.h, page)

    @property
    def installed_fd(self) -> int:
        """An eventfd signalled on each install while watch() says faults wait for this path's pages."""
        return int(lib.mig_dpd_installed_fd(self._path.h))

    def watch(self, faults: int) -> None:
        """How many faults wait for pages this path asked (a gRPC fault path's, which polls
        installed_fd for them rather than waking every millisecond)."""
        lib.mig_dpd_watch(self._path.h, faults)

    @property
    def handle(self) -> Any:
        """The C path, for a native fault path to move its cursor."""
        return self._path.h

    def plan(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Queue ranges to ask next, before the cursor's; returns how many the bounded queue took."""
        flat = ffi.new("uint64_t[]", [v for r in ranges[:lib.MIG_DPD_PLAN_RUNS] for v in r])
        return int(lib.mig_dpd_plan(self._path.h, flat, min(len(ranges), lib.MIG_DPD_PLAN_RUNS)))

    def plan_only(self, on: bool) -> None:
        """With `on`, ask only what the plan queue names; the push of the rest waits until it is off."""
        lib.mig_dpd_plan_only(self._path.h, int(on))

    def plan_len(self) -> int:
        return int(lib.mig_dpd_plan_len(self._path.h))

    def plan_clear(self) -> None:
        lib.mig_dpd_plan_clear(self._path.h)

    def _snapshot(self) -> dict:
        c = self._path._counters
        return {"kind": "bulk", **self._path.counters(), "planned": int(c.planned), "done": bool(c.done),
                "max_bandwidth": int(lib.mig_dpd_bandwidth(self._path.h))}

    def stop(self, timeout: float = 10.0) -> None:
        """Stop asking; whole batches received are installed. Returns promptly (the C
        threads' sockets are shut down), so `timeout` is only an upper bound."""
        if self._summary is not None:
            return
        self._path.stop()
        self._summary = dict(self.last, done=True)


class NativePrecopy:
    """Pre-copy rounds into one incoming guest's memfd over the native data plane
    (same interface as PrecopyPuller): pages pwrite()n into the memfd, zero pages left as holes."""

    def __init__(self, memfd: int, received: SharedBitmap, page_size: int, endpoint: str, key: bytes,
                 recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT) -> None:
        self._received = received
        self._asked = SharedBitmap.create(received.nbits)
        try:
            handle = _open("pre-copy", endpoint, lambda host, port, err, n: lib.mig_dpd_bulk_new(
                host, port, _check_key(key), memfd, 1, ffi.NULL, page_size, received.nbits, received.ptr,
                self._asked.ptr, recovery_timeout, err, n))
        except BaseException:
            self._asked.close()
            raise
        self._path = _Handle(handle, [self._asked])
        self._closed = False

    def pull(self, max_bandwidth: int, deadline_s: float) -> RoundStats:
        """Pull every page not received yet; stop asking after `deadline_s` seconds (0: no limit).

        Returns when every request asked is installed. A source lost past the
        recovery timeout raises ConnectionError.
        """
        if self._closed:
            raise RuntimeError("pre-copy pull on a closed NativePrecopy")
        before = self._path.counters()
        t0 = time.monotonic()
        r = lib.mig_dpd_round(self._path.h, max_bandwidth, deadline_s)
        while r >= 0 and (r := lib.mig_dpd_wait(self._path.h, 100)) == 0:
            pass
        if r < 0:
            raise errors.AgentUnreachable(f"pre-copy from the source failed: {self._path.error() or 'stopped'}")
        after = self._path.counters()
        return RoundStats(pages=after["pages"] - before["pages"], zero=after["zero"] - before["zero"],
                          bytes_wire=after["bytes_wire"] - before["bytes_wire"], seconds=time.monotonic() - t0)

    def stop(self) -> None:
        """Make a running round stop asking (it returns once its requests are answered)."""
        if not self._closed:
            lib.mig_dpd_stop_asking(self._path.h)

    def close(self) -> None:
        self._closed = True
        self._path.free()


class NativeFaultLoop(_Path):
    """The urgent path over the native data plane (same interface as FaultLoop).

    One C thread reads the userfaultfd and asks the source on a connection of
    its own; `bulk` (a NativeBulk, or None) shares its `asked` bitmap, so a
    page is never asked twice while in flight, and its cursor follows the
    faults. Serves from construction on.
    """

    def __init__(self, mem: Memory, endpoint: str, key: bytes, bulk: NativeBulk | None,
                 recovery_timeout: float) -> None:
        self._bulk = bulk  # kept alive while this path may move its cursor
        self._mem = mem  # and the address space its C thread reads and installs into
        owned: list[Any] = []
        if bulk is not None:
            asked = bulk.asked
        else:
            asked = SharedBitmap.create(mem.page_count)
            owned.append(asked)
        space, received = mem.io.target(mem.bitmap)
        try:
            handle = _open("fault path", endpoint, lambda host, port, err, n: lib.mig_dpd_fault_new(
                host, port, _check_key(key), space, mem.page_size, mem.page_count, received, asked.ptr,
                bulk.handle if bulk is not None else ffi.NULL, recovery_timeout, err, n))
        except BaseException:
            for obj in owned:
                obj.close()
            raise
        self._path = _Handle(handle, owned)
        self._history_pos = ffi.new("uint64_t *")
        self._history_buf = ffi.new("uint64_t[]", lib.MIG_DPD_HISTORY)

    def new_faults(self) -> list[int]:
        """The pages faulted on since the last call, in order (a reader that fell behind loses the oldest)."""
        lost = ffi.new("uint64_t *")
        n = lib.mig_dpd_history(self._path.h, self._history_pos, self._history_buf, lib.MIG_DPD_HISTORY, lost)
        return list(ffi.unpack(self._history_buf, n))

    def prefetch_counts(self) -> tuple[int, int]:
        """(neighbour pages prefetched, of them seen used) so far."""
        c = self._path._counters
        return int(c.prefetched), int(c.prefetch_hits)

    def count_used(self, used: SharedBitmap) -> int:
        """Count as hits the prefetched pages set in `used` (seen used without a fault, e.g. written)."""
        return int(lib.mig_dpd_count_used(self._path.h, used.ptr, used.nbits))

    def set_neighbourhood(self, nb: Neighbourhood) -> None:
        """What each following fault fetches with it (applied by the C fault thread)."""
        lib.mig_dpd_set_neighbourhood(self._path.h, nb.pages, SHAPES.index(nb.shape), nb.stride)

    def _snapshot(self) -> dict:
        c = self._path._counters
        return {"kind": "faults", **self._path.counters(), "faults": int(c.faults), "woken": int(c.woken),
                "prefetched": int(c.prefetched), "prefetch_hits": int(c.prefetch_hits),
                "asked_in_flight": int(c.asked_in_flight), "events": self._mem.io.events()}

    def _latency(self) -> dict:
        """The latency summary as FaultLoop's: percentiles from the newest samples, the rest exact."""
        c = self._path._counters
        buf = ffi.new("uint64_t[]", lib.MIG_DPD_SAMPLES)
        n = lib.mig_dpd_samples(self._path.h, buf, lib.MIG_DPD_SAMPLES)
        out = stats.summarize([buf[i] / 1000.0 for i in range(n)])
        if c.resolved:
            out.update(count=int(c.resolved), max=round(c.lat_max_ns / 1000.0, 1),
                       mean=round(c.lat_sum_ns / c.resolved / 1000.0, 1),
                       hist_log2_us={str(1 << k): int(c.hist[k]) for k in range(32) if c.hist[k]})
        return out


    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (the thread is joined at once; `timeout` is only an upper bound); keep the summary."""
        if self._summary is not None:
            return
        self._path.stop()
        summary = dict(self._snapshot(), latency_us=self._latency(),
                       blocked_ms=round(self._path._counters.blocked_ns / 1e6, 3), done=True)
        if err := self._path.error():
            summary["error"] = err
        self._summary = summary
