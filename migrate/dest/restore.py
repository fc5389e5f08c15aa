"""Restoring any process's memory from a source image, Firecracker-style.

`migrate dest serve --uffd-socket PATH --restore-from SRC --image NAME`
listens on a unix socket. A process (any VMM speaking Firecracker's UFFD
handshake, not only our runner) connects, sends its registered userfaultfd
and region list; the agent then resolves that process's faults, and pushes
the rest of the image, from the source agent serving image NAME, on the
data plane the agent was given (native unless TLS is configured).

With `--record-ws FILE` each restore records the pages its client touches:
the push waits (only the client's faults bring pages) until the client has
faulted on nothing for RECORD_QUIET seconds, then FILE is written and the
push brings the rest. With `--policy replay:ws=FILE` each restore fetches
them before it sends the client its ready byte: REAP's case, a function
snapshot restored again and again.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass

from migrate.client import AgentClient
from migrate.dest.incoming import IncomingRun
from migrate.guests import spec_from_pb
from migrate.handshake import recv_handshake
from migrate.names import DataPlane, Phase
from migrate.planes import PageRoute
from migrate.policies import parse, workingset
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import AgentError

log = logging.getLogger(__name__)
_HANDSHAKE_TIMEOUT = 10.0
#: Sent to the client once its restore runs, a policy's `before_resume` pages (a replayed working set)
#: in: a VMM that waits for it resumes its guest then (REAP's eager prefetch); one that does not, ignores it.
READY = b"R"
#: A recording restore holds its push until its client has faulted on nothing for this long (seconds)...
RECORD_QUIET = 0.5
#: ...or for at most this long (a client that never stops faulting is pushed the rest then).
RECORD_LIMIT = 30.0


def _require_userfaultfd(fd: int) -> None:
    """ValueError (the fd closed) unless `fd` is a userfaultfd: a client could send any file."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = "?"
    if kind != "anon_inode:[userfaultfd]":
        os.close(fd)
        raise ValueError(f"handshake carried {kind}, not a userfaultfd")


def _say_ready(conn: socket.socket, run_id: str) -> None:
    """Send the ready byte. A client need not read it (Firecracker's does not), and one that closed
    its socket already (its faults served meanwhile, or all done) is restored all the same: the run
    ends as its pages say. Aborting on EPIPE left such a client's next faults unserved for good."""
    try:
        conn.sendall(READY)
    except (BrokenPipeError, ConnectionResetError):
        log.info("run %s: the handshake client closed its socket before the ready byte", run_id)


@dataclass(frozen=True)
class RestoreOptions:
    """`dest serve --uffd-socket PATH --restore-from SOURCE --image NAME [--policy P] [--record-ws FILE]`."""

    path: str
    source: str
    image: str
    plane: DataPlane
    policy: str = ""      # the operator's own: a module:Class is allowed
    record_ws: str = ""   # written after each restore
    max_bandwidth: int = 0  # bytes/s of each restore's bulk push (0: no cap)

    def check(self) -> None:
        """PolicyError (a ValueError) with one line when the policy cannot be built."""
        if self.policy:
            parse(self.policy).build()


class UffdRestoreListener:
    """Accepts handshakes on `opts.path` and restores each client from `opts.image`."""

    def __init__(self, incoming: dict[str, IncomingRun], lock: threading.Lock, opts: RestoreOptions) -> None:
        self._incoming = incoming
        self._opts = opts
        self._plane = opts.plane
        self._lock = lock
        self._path = path = opts.path
        self._source = opts.source
        self._image = opts.image
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
            t_handshake = time.monotonic()
            _require_userfaultfd(uffd_fd)
            self._count += 1
            with AgentClient(self._source) as source:
                prep = source.call("PrepareOutgoing", pb.PrepareOutgoingRequest(name=self._image,
                                                                                data_plane=self._plane))
                ref = pb.RunRef(run_id=prep.run_id)
                source.call("Switchover", ref)
                run = IncomingRun(prep.run_id, f"{self._image}-restore-{self._count}", spec_from_pb(prep.spec),
                                  PageRoute.offered(self._source, prep, self._plane))
                run.set_policy(self._opts.policy, allow_modules=True)
                run.attach(uffd_fd, regions)
                run.start_paths()
                with self._lock:
                    self._incoming[run.run_id] = run
                record = bool(self._opts.record_ws)
                run.start(b"", no_push=False, max_bandwidth=self._opts.max_bandwidth, hold_push=record)
                _say_ready(conn, run.run_id)
                t_started = time.monotonic()
                log.info("restoring image %s into a handshake client (run %s; set up in %.1f ms, then %.1f ms for "
                         "the policy's pages before the ready byte)", self._image, run.run_id,
                         (t_started - t_handshake) * 1000.0 - run.before_resume_ms, run.before_resume_ms)
                if record:
                    self._record(run)
                while run.phase == Phase.RUNNING:
                    time.sleep(0.05)
                source.call("CompleteOutgoing", ref)
                if run.phase == Phase.COMPLETE:
                    log.info("restore run %s complete (every page arrived): %d faults", run.run_id,
                             run.status().faults)
                else:
                    log.warning("restore run %s %s: %s", run.run_id, run.phase, run.error)
        except (ValueError, OSError, AgentError, RuntimeError) as err:
            log.error("uffd handshake client not restored: %s", err)
            if run is not None:
                run.abort(str(err))
        finally:
            conn.close()

    def _record(self, run: IncomingRun) -> None:
        """Write the pages the client touched while the push was held (--record-ws), then let the push go."""
        ranges = run.record_touched(RECORD_QUIET, RECORD_LIMIT)
        if run.phase in (Phase.RUNNING, Phase.COMPLETE):
            workingset.save(self._opts.record_ws, run.page_count, run.spec.page_size, ranges)
            log.info("restore run %s recorded a working set of %d pages", run.run_id, sum(n for _, n in ranges))

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
