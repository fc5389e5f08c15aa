"""The link emulator: a TCP relay that holds each direction's bytes for the one-way delay.

An nftables redirect in the source namespace sends every connection that
arrives over the veth here; the relay learns where it was going
(SO_ORIGINAL_DST), connects there itself, and forwards both directions,
releasing each chunk `delay` (+ uniform jitter, never reordering) after it
arrived. It reads only while it holds less than `--buffer` bytes, so a
shaped link behind it still sets the pace: the relay adds delay, not
bandwidth.

Each connection gets its own forked process with a single-threaded select
loop: an urgent page request never waits for the GIL behind a bulk stream.

    python -m migrate.lab.relay --listen 0.0.0.0:0 --delay 0.001
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import select
import signal
import socket
import struct
import sys
import time

from migrate.lab.procs import die_with_parent
from migrate.validate import split_endpoint

_SO_ORIGINAL_DST = 80
_CHUNK = 256 * 1024


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was headed (the nftables redirect rewrote it)."""
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]


class Direction:
    """Bytes from `src` to `dst`, each released at its due time."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, jitter: float, buffer: int) -> None:
        self.src, self.dst = src, dst
        self.delay, self.jitter, self.buffer = delay, jitter, buffer
        self.queue: collections.deque[list] = collections.deque()  # [due, memoryview]
        self.held = 0
        self.last_due = 0.0
        self.eof = False
        self.done = False
        self.blocked = False  # the head is due but dst's send buffer is full

    def wants_read(self) -> bool:
        return not self.eof and self.held < self.buffer

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue and not self.blocked else None

    def read(self, now: float) -> None:
        data = self.src.recv(_CHUNK)
        if not data:
            self.eof = True
            return
        due = now + self.delay + (random.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        self.last_due = max(self.last_due, due)  # a stream cannot be reordered
        self.queue.append([self.last_due, memoryview(data)])
        self.held += len(data)

    def flush(self, now: float) -> None:
        """Send everything due; note when the peer's send buffer is full."""
        self.blocked = False
        while self.queue and self.queue[0][0] <= now:
            head = self.queue[0]
            try:
                n = self.dst.send(head[1])
            except BlockingIOError:
                self.blocked = True
                return
            self.held -= n
            if n == len(head[1]):
                self.queue.popleft()
            else:
                head[1] = head[1][n:]
        if self.eof and not self.queue and not self.done:
            self.dst.shutdown(socket.SHUT_WR)
            self.done = True


def pump(a: socket.socket, b: socket.socket, delay: float, jitter: float, buffer: int) -> None:
    """Relay between a and b until both directions end or either side resets."""
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dirs = [Direction(a, b, delay, jitter, buffer), Direction(b, a, delay, jitter, buffer)]
    try:
        while not all(d.done for d in dirs):
            now = time.monotonic()
            for d in dirs:
                d.flush(now)
            dues = [t for d in dirs if (t := d.next_due()) is not None]
            timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
            readable, _, _ = select.select([d.src for d in dirs if d.wants_read()],
                                           [d.dst for d in dirs if d.blocked], [], timeout)
            now = time.monotonic()
            for d in dirs:
                if d.src in readable:
                    d.read(now)
    except (ConnectionError, OSError):
        pass  # one side went away: so does the connection
    finally:
        a.close()
        b.close()


def serve(listen: str, delay: float, jitter: float, buffer: int) -> None:
    host, port = split_endpoint(listen, "--listen", listen=True)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(128)
    print(f"listening on {host}:{server.getsockname()[1]}", flush=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            die_with_parent(signal.SIGKILL)
            server.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                upstream = socket.create_connection(original_dst(conn), timeout=10)
            except OSError:
                os._exit(1)
            pump(conn, upstream, delay, jitter, buffer)
            os._exit(0)
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="HOST:PORT (port 0 picks one)")
    ap.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    ap.add_argument("--jitter", type=float, default=0.0, help="uniform jitter, +- seconds")
    ap.add_argument("--buffer", type=int, default=4 << 20, help="bytes held per direction at most")
    args = ap.parse_args()
    serve(args.listen, args.delay, args.jitter, args.buffer)


if __name__ == "__main__":
    main()
