"""Control access from the root namespace: 127.0.0.1:PORT forwarded to an agent inside a namespace.

The orchestrator, `migrate guest ...` and the bench run in the root
namespace and reach the agents through these forwarders, so the lab needs
no address or route outside its namespaces. The listening socket is made
in the root namespace; the accepting thread then moves itself into the
lab namespace, so every upstream socket it makes lives there. Only
control RPCs pass here: pages flow over the veth.
"""
from __future__ import annotations

import socket
import threading

from migrate.lab import netns
from migrate.validate import split_endpoint


class Forwarder:
    """Listens on 127.0.0.1 (any port) and forwards each connection to `target` inside `ns`."""

    def __init__(self, ns: str, target: str) -> None:
        self.ns = ns
        self.target = split_endpoint(target)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, name=f"forward-{ns}", daemon=True).start()

    def _accept(self) -> None:
        netns.enter(self.ns)
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=_bridge, args=(conn, upstream), daemon=True).start()

    def close(self) -> None:
        self._server.close()


def _bridge(a: socket.socket, b: socket.socket) -> None:
    """Both directions between a and b; close both once both have ended."""
    other = threading.Thread(target=_copy, args=(a, b), daemon=True)
    other.start()
    _copy(b, a)
    other.join()
    a.close()
    b.close()


def _copy(a: socket.socket, b: socket.socket) -> None:
    """Copy a -> b until EOF, then half-close b; on an error, shut both down."""
    try:
        while data := a.recv(65536):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
