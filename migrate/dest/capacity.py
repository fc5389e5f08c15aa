"""What a destination agent can still take: its host's free memory less what it promised.

A run's guest RAM fills as its pages arrive, so the host's MemAvailable
only counts what already arrived: the bytes a run has yet to receive are
promised on top of it. An incoming run the agent cannot hold is refused at
PrepareIncoming (RESOURCE_EXHAUSTED), before the switchover: the guest
stays on the source, instead of the destination running out of memory in
the middle of a post-copy, when the guest can no longer go back.

`--max-incoming-ram` caps the RAM promised to incoming runs at once, for
operators who keep part of a host for other work (and for tests).
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from migrate import errors
from migrate.proto import migrate_pb2 as pb
from migrate.units import format_size

#: Bytes of the host's available memory never promised: the agent, its runners' own
#: memory and the page cache need room too.
HEADROOM = 256 * 1024 * 1024
_MEMINFO = "/proc/meminfo"


class NoRoom(errors.ResourceExhausted):
    """An incoming run larger than what this agent can hold now (RESOURCE_EXHAUSTED)."""


class Promise(Protocol):
    """An incoming run, as far as memory goes."""

    name: str

    def promised_bytes(self) -> tuple[int, int]:
        """(guest RAM, bytes of it not yet received); (0, 0) once the run no longer holds a promise."""


def mem_available(path: str = _MEMINFO) -> int:
    """The host's MemAvailable in bytes (what it can give without swapping)."""
    with open(path) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no MemAvailable line")


class Ledger:
    """The RAM promised to incoming runs, and the check that admits a new one.

    A run counts from admit() on; between admit() and the run being listed
    by the agent (its prepare takes a while) it is held as pending, so two
    concurrent prepares cannot both take the last free bytes.
    """

    def __init__(self, limit: int = 0, headroom: int = HEADROOM) -> None:
        self.limit = limit
        self.headroom = headroom
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()

    def report(self, runs: Iterable[Promise]) -> pb.CapacityReply:
        """What this agent can take now, given its incoming `runs`."""
        with self._lock:
            return self._report(list(runs))

    def _report(self, runs: list[Promise]) -> pb.CapacityReply:
        promised = outstanding = 0
        guests: list[str] = []
        for run in runs:
            size, missing = run.promised_bytes()
            if size:
                promised += size
                outstanding += missing
                guests.append(run.name)
        for name, size in self._pending.items():
            promised += size
            outstanding += size
            guests.append(name)
        available = mem_available()
        free = available - outstanding - self.headroom
        if self.limit:
            free = min(free, self.limit - promised)
        return pb.CapacityReply(available=available, promised=promised, outstanding=outstanding, limit=self.limit,
                                headroom=self.headroom, free=max(free, 0), guests=guests)

    def admit(self, name: str, size: int, runs: Iterable[Promise]) -> None:
        """Hold `size` bytes for incoming guest `name`, or raise NoRoom saying why."""
        with self._lock:
            cap = self._report(list(runs))
            if size > cap.free:
                limit = f", at most {format_size(cap.limit)} at once (--max-incoming-ram)" if cap.limit else ""
                raise NoRoom(f"not enough memory here for guest {name!r} ({format_size(size)}): "
                             f"{format_size(cap.free)} free to promise (host has {format_size(cap.available)} "
                             f"available, {format_size(cap.outstanding)} still due to incoming runs, "
                             f"{format_size(cap.headroom)} kept free{limit}); it stays on the source")
            self._pending[name] = size

    def settle(self, name: str) -> None:
        """The run of `name` is listed by the agent now, or failed to prepare: drop its pending hold."""
        with self._lock:
            self._pending.pop(name, None)
