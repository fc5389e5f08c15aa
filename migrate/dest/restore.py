"""Restoring any process's memory from a source image, Firecracker-style.

`migrate dest serve --uffd-socket PATH --restore-from SRC --image NAME`
listens on a unix socket. A process (any VMM speaking Firecracker's UFFD
handshake, not only our runner) connects, sends its registered userfaultfd
and region list; the agent then resolves that process's faults, and pushes
the rest of the image, from the source agent serving image NAME, on the
data plane the agent was given (native unless TLS is configured).
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time

from migrate.client import AgentClient
from migrate.dest.incoming import IncomingRun
from migrate.guests import spec_from_pb
from migrate.handshake import recv_handshake
from migrate.planes import DataPlane, PageRoute
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import AgentError

log = logging.getLogger("migrate.restore")
_HANDSHAKE_TIMEOUT = 10.0


def _require_userfaultfd(fd: int) -> None:
    """ValueError (the fd closed) unless `fd` is a userfaultfd: a client could send any file."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = "?"
    if kind != "anon_inode:[userfaultfd]":
        os.close(fd)
        raise ValueError(f"handshake carried {kind}, not a userfaultfd")


class UffdRestoreListener:
    """Accepts handshakes on `path` and restores each client from `image`."""

    def __init__(self, incoming: dict[str, IncomingRun], lock: threading.Lock, path: str, source: str,
                 image: str, plane: DataPlane) -> None:
        self._incoming = incoming
        self._plane = plane
        self._lock = lock
        self._path = path
        self._source = source
        self._image = image
        self._count = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier agent (any other file stays, and bind says so)
            self._sock.bind(path)
            os.chmod(path, 0o600)  # whoever connects gets a guest's memory: this user only
            self._sock.listen(16)
        except OSError as err:
            self._sock.close()
            raise ValueError(f"cannot listen on --uffd-socket {path}: {err.strerror}") from None
        self._thread = threading.Thread(target=self._accept, daemon=True, name="uffd-socket")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._restore, args=(conn,), daemon=True, name="uffd-restore").start()

    def _restore(self, conn: socket.socket) -> None:
        run: IncomingRun | None = None
        try:
            uffd_fd, regions = recv_handshake(conn, timeout=_HANDSHAKE_TIMEOUT)
            _require_userfaultfd(uffd_fd)
            self._count += 1
            with AgentClient(self._source) as source:
                prep = source.call("PrepareOutgoing", pb.PrepareOutgoingRequest(name=self._image,
                                                                                data_plane=self._plane))
                ref = pb.RunRef(run_id=prep.run_id)
                source.call("Switchover", ref)
                run = IncomingRun(prep.run_id, f"{self._image}-restore-{self._count}", spec_from_pb(prep.spec),
                                  PageRoute.offered(self._source, prep, self._plane))
                run.attach(uffd_fd, [dict(r) for r in regions])
                run.start_paths()
                with self._lock:
                    self._incoming[run.run_id] = run
                run.start(b"", no_push=False, max_bandwidth=0)
                log.warning("restoring image %s into a handshake client (run %s)", self._image, run.run_id)
                while run.phase == "running":
                    time.sleep(0.05)
                source.call("CompleteOutgoing", ref)
                log.warning("restore run %s %s %s", run.run_id, run.phase, run.error)
        except (ValueError, OSError, AgentError, RuntimeError) as err:
            log.error("uffd handshake client not restored: %s", err)
            if run is not None:
                run.abort(str(err))
        finally:
            conn.close()

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
