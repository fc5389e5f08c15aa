"""What the destination's urgent path and its bulk worker process share.

The destination agent runs the urgent path itself (dest/faults.py) and
starts the bulk worker as a separate process, so the busy bulk path never
holds the GIL the urgent path needs. Both install pages with the native
layer into the guest's userfaultfd and set bits in the received bitmap; the
bulk worker gets both as inherited fds and reports to the agent as JSON
lines on stdout: first {"ready": true} once connected to the source (or
why not), then counters. It waits for a {"go": ...} line (sent at
switchover); the agent closes its stdin to stop it.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from migrate import rpc
from migrate.bitmap import SharedBitmap
from migrate.uffd import FaultReader, InstallStats, Region, Uffd

#: Seconds between two counter lines.
REPORT_EVERY = 0.2
#: Refused (corrupt) batches a worker asks again for before it gives up on the source.
MAX_REFUSED = 100
#: Seconds to wait for the source to accept a connection.
CONNECT_TIMEOUT = 5.0


@dataclass
class Memory:
    """The guest memory a path installs into: its received bitmap and its installer."""

    bitmap: SharedBitmap
    io: FaultReader

    @classmethod
    def over(cls, uffd: Uffd | int, bitmap: SharedBitmap, regions: list[tuple[int, int, int]],
             page_size: int) -> Memory:
        """Memory behind `uffd`, mapped as (base, size, first_page) regions."""
        return cls(bitmap, FaultReader(uffd, [Region(*r) for r in regions], page_size))

    @property
    def page_count(self) -> int:
        return self.bitmap.nbits

    @property
    def page_size(self) -> int:
        return self.io.page_size

    def count(self, counters: dict, done: InstallStats) -> None:
        """Add an install to a path's "pages", "zero" and "bytes_pages" counters."""
        counters["pages"] += done.installed
        counters["zero"] += done.zeroed
        counters["bytes_pages"] += done.installed * self.page_size


def arg_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--uffd", type=int, required=True, help="inherited userfaultfd")
    ap.add_argument("--bitmap-fd", type=int, required=True, help="inherited memfd of the received bitmap")
    ap.add_argument("--pages", type=int, required=True)
    ap.add_argument("--page-size", type=int, required=True)
    ap.add_argument("--regions", required=True, help='JSON [[base, size, first_page], ...]')
    ap.add_argument("--endpoint", required=True, help="source host:port")
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--hint-fd", type=int, default=-1, help="pipe carrying faulted page indices to the bulk worker")
    ap.add_argument("--recovery-timeout", type=float, required=True,
                    help="seconds to keep reconnecting to a source that went away")
    return ap


def open_memory(args: argparse.Namespace) -> Memory:
    """The memory the agent passed in (inherited uffd and bitmap fds)."""
    return Memory.over(args.uffd, SharedBitmap.attach(args.bitmap_fd, args.pages), json.loads(args.regions),
                       args.page_size)


def connect(endpoint: str, purpose: str) -> grpc.Channel:
    """A ready channel to the source.

    Raises ConnectionError if the source cannot be reached: the agent fails
    the prepare step and the guest stays on the source.
    """
    channel = rpc.channel(endpoint, purpose=purpose)
    try:
        rpc.wait_ready(channel, endpoint, CONNECT_TIMEOUT)
    except rpc.AgentError:
        channel.close()
        raise ConnectionError(f"destination cannot reach the source at {endpoint}") from None
    return channel


def wait_go() -> dict | None:
    """The agent's go-ahead (a JSON line on stdin), or None if it closed stdin instead."""
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


def emit(record: dict) -> None:
    """One JSON line to the agent."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def stop_on_stdin_close() -> threading.Event:
    """An event set when the agent closes our stdin (its way to stop us)."""
    stop = threading.Event()

    def watch() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch, daemon=True, name="stdin-watch").start()
    return stop


def report_periodically(snapshot: Callable[[], dict], stop: threading.Event) -> None:
    """Emit a counters line every REPORT_EVERY seconds until `stop`, from a thread.

    A thread of its own, so the agent hears about a link that went down even
    while no page arrives.
    """

    def run() -> None:
        while not stop.wait(REPORT_EVERY):
            emit(snapshot())

    threading.Thread(target=run, daemon=True, name="reporter").start()
