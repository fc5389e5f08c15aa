"""An HTTP CONNECT relay the tests control, to break links on purpose.

gRPC clients honour the grpc_proxy environment variable: a destination agent
started with it reaches the source only through this relay, on every port
(urgent and bulk alike). The native data plane ignores grpc_proxy: its
endpoint is relayed by `forward(target)`, a plain TCP relay under the same
control. `cut(seconds)` drops every relayed connection and refuses new ones
for that long: a real link failure, seen by real sockets.
`blackhole(seconds)` stops forwarding without closing anything (packets
dropped, no reset): only a keepalive can tell.
"""
from __future__ import annotations

import select
import socket
import threading
import time


class ConnectProxy:
    """Threaded CONNECT relay on 127.0.0.1; `url` goes into grpc_proxy."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._down_until = 0.0
        self._silent_until = 0.0
        self._closed = False
        self.cuts = 0
        self._corrupt = 0
        self._threads: list[threading.Thread] = []
        self._forwards: list[socket.socket] = []
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:  # noqa: ANN001
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self, listener: socket.socket | None = None, target: tuple[str, int] | None = None) -> None:
        listener = listener or self._listener
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until or self._closed:
                client.close()
                continue
            self._spawn(self._relay if target else self._serve, client, target)

    def _hush(self) -> None:
        """Wait out a blackhole (or until closed)."""
        while time.monotonic() < self._silent_until and not self._closed:
            time.sleep(0.02)

    def forward(self, target: str) -> str:
        """A plain TCP relay to `target` (HOST:PORT), cut and corrupted with the rest; returns its HOST:PORT."""
        listener = socket.create_server(("127.0.0.1", 0))
        self._forwards.append(listener)
        host, port = target.rsplit(":", 1)
        self._spawn(self._accept, listener, (host, int(port)))
        return f"127.0.0.1:{listener.getsockname()[1]}"

    def _relay(self, client: socket.socket, target: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._hush()
        with self._lock:
            self._conns.update((client, upstream))
        self._pump(client, upstream)

    def _serve(self, client: socket.socket, _target: None = None) -> None:
        self._hush()
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            head += chunk
        target = head.split(b" ", 2)[1].decode()
        host, port = target.rsplit(":", 1)
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            client.close()
            return
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            upstream.sendall(rest)
        with self._lock:
            self._conns.update((client, upstream))
        self._pump(client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select(list(peers), [], [], 0.5)
                if time.monotonic() < self._down_until or self._closed:
                    break
                if time.monotonic() < self._silent_until:
                    self._hush()  # what was sent meanwhile waits in the kernel, as if dropped and resent
                    continue
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    if s is b and self._corrupt and len(data) >= 1 << 15:
                        self._corrupt -= 1
                        flipped = bytearray(data)
                        flipped[len(data) // 2] ^= 0x40
                        data = bytes(flipped)
                    peers[s].sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.difference_update((a, b))
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self, seconds: float) -> None:
        """Break every relayed connection now and refuse new ones for `seconds`."""
        self.cuts += 1
        self._down_until = time.monotonic() + seconds
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def blackhole(self, seconds: float) -> None:
        """Forward nothing, on every connection old and new, for `seconds`; close nothing."""
        self.cuts += 1
        self._silent_until = time.monotonic() + seconds

    def corrupt(self, times: int = 1) -> None:
        """Flip one bit in the middle of the next `times` large chunks coming from the source."""
        self._corrupt = times

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for listener in self._forwards:
            listener.close()
        self.cut(0)
        for t in self._threads:
            t.join(timeout=2)
