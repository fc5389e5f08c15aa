"""The guest runner: a process that owns guest RAM and runs a workload on it.

    python -m migrate.guest.runner --memfd FD --control-fd FD --size BYTES
        [--page-size N] [--workload NAME] [--seed N] [--ops N] [--threads N]
        [--ops-per-sec R] [--restore] [--start-paused] [--no-fill]

The agent creates the memfd and a unix socketpair and passes one end of each
(inherited fds).  The runner maps the memfd MAP_SHARED.

Source mode: fill memory (unless --no-fill), send ``{"event": "ready"}``,
start the workload (unless --start-paused).

Restore mode (--restore, destination): touch nothing; create a userfaultfd,
register the whole mapping for MISSING faults (and, with --watch-writes,
asynchronous WP where the kernel has it: the agent may install pages
protected to see which ones the guest writes, migrate.dest.written) and send it to the agent over
the control socket as a Firecracker-style handshake (migrate.handshake) --
the first and only message until the agent's first command.  Then wait for
``resume`` with the execution state; workload threads touching missing
pages block in the kernel until the agent installs them.

Control protocol (JSON lines on the control socket):

- agent -> runner: ``{"id": n, "cmd": "pause"|"resume"|"state"|"digest"|"stats"|"track"|"untrack"|
  "snapshot"|"snapshot_status"|"release_uffd"|"stop", ...}``
  (``resume`` takes an optional ``"state"``: an exported execution state;
  ``snapshot`` comes with the image file's fd attached, SCM_RIGHTS; ``track`` may come
  with a page bitmap's memfd, where each discard of the guest sets its pages' bits).
- runner -> agent: ``{"id": n, "ok": true, ...}`` or ``{"id": n, "ok": false, "error": "..."}``;
  pause/state reply ``{"state": {...}, "last_op_ns": t}``; digest ``{"digest": hex16}``;
  stats ``{ops_done, ops_total, running, finished, first_op_ns, last_op_ns}``;
  track ``{"base", "size"}``: the runner's RAM is now registered with an
  asynchronous write-protect userfaultfd and fully write-protected, so the
  agent can read the written pages with PAGEMAP_SCAN on /proc/PID/pagemap
  (migrate.source.dirty); untrack drops that registration.
- events: ``{"event": "ready", "pid"}`` (source mode),
  ``{"event": "progress", "t_ns", "ops", "first_op_ns", "running"}`` every
  ~50 ms while running and once at every pause/resume,
  ``{"event": "finished", "ops", "t_ns"}`` when all ops are done.

The runner exits when the control socket closes or on ``stop``; it also asks
the kernel for SIGKILL when its parent (thread) dies. With ``--rejoin PATH``
(restore mode, an agent with a state directory) it outlives its agent
instead: it listens on PATH, and a restarted agent that connects gets one
line ``{"event": "rejoined", "pid", "regions"}`` with the userfaultfd and
the RAM memfd attached (SCM_RIGHTS), then the command protocol goes on.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

from migrate.names import GuestKind, Workload

if TYPE_CHECKING:  # imported where used: the runner loads the native layer only when it needs it
    from migrate.bitmap import SharedBitmap
    from migrate.guest.snapshot import LiveSnapshot
    from migrate.uffd import Uffd

#: Seconds between two progress events of a running guest: each wakes the
#: runner and the agent's reader, per guest, on both hosts (every 20 ms, 4-8
#: runners took ~0.05-0.1 CPU-s per drained GiB); 50 ms still draws a run's
#: stalls (the report's progress curve), which last 100s of ms.
PROGRESS_EVERY = 0.05
#: Most seconds a paused guest's progress loop waits before it looks again:
#: nothing moves meanwhile (a source guest after its switchover), and every
#: start of the workload wakes it at once (Runner.progress).
PAUSED_LOOK_EVERY = 1.0
#: What a restore-mode runner imports as it sets up: a warm runner (migrate.guest.warm) imports it ahead.
WARM_IMPORTS = ("migrate.guest.process", "migrate.guest.workloads", "migrate.uffd", "migrate.handshake",
                "migrate.bitmap", "migrate._native")
#: Seconds a --rejoin runner waits for a restarted agent before giving up.
REJOIN_TIMEOUT = 600.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent(expected_ppid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if expected_ppid and os.getppid() != expected_ppid:  # parent already gone
        os._exit(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m migrate.guest.runner", description=__doc__.split("\n")[0])
    ap.add_argument("--memfd", type=int, required=True, help="inherited fd of guest RAM")
    ap.add_argument("--control-fd", type=int, required=True, help="inherited unix stream socket")
    ap.add_argument("--size", type=int, required=True, help="guest RAM bytes (multiple of --page-size)")
    ap.add_argument("--page-size", type=int, default=mmap.PAGESIZE)
    ap.add_argument("--workload", default=Workload.RANDOM_WRITE)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ops-per-sec", type=float, default=0.0)
    ap.add_argument("--restore", action="store_true", help="destination mode: hand a userfaultfd to the agent")
    ap.add_argument("--start-paused", action="store_true")
    ap.add_argument("--no-fill", action="store_true", help="source mode: keep the memfd's content")
    ap.add_argument("--watch-writes", action="store_true",
                    help="restore mode: register write-protect too, so the agent can tell which pages the guest wrote")
    ap.add_argument("--rejoin", default="",
                    help="restore mode: outlive the agent; a restarted agent connects to this unix socket path")
    ap.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Runner:
    """The synthetic kind's runner; subclasses (migrate.guest.kvm) bring another
    engine through :meth:`make_engine` and :meth:`prepare` and keep the rest."""

    KIND = GuestKind.SYNTHETIC
    PROG = "migrate.guest.runner"            # how its one-line errors begin

    def __init__(self, args: argparse.Namespace) -> None:
        from migrate.guest.process import GuestSpec

        self.args = args
        self.spec = GuestSpec(size=args.size, workload=args.workload, seed=args.seed, ops=args.ops,
                              threads=args.threads, ops_per_sec=args.ops_per_sec, page_size=args.page_size,
                              kind=self.KIND)
        self.spec.validate()
        st = os.fstat(args.memfd)
        if st.st_size < args.size:
            raise ValueError(f"memfd {args.memfd} holds {st.st_size} bytes, less than --size {args.size}")
        self.sock = socket.socket(fileno=args.control_fd)
        self.sock.setblocking(True)
        self.send_lock = threading.Lock()
        self.ctl_lock = threading.Lock()     # serializes pause/resume/state changes
        self.mem = mmap.mmap(args.memfd, args.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.memfd = args.memfd if args.rejoin else -1  # a rejoining agent gets RAM's fd again
        if not args.rejoin:
            os.close(args.memfd)             # the mapping keeps the file
        self.listener: socket.socket | None = None
        self.wl = self.make_engine()
        self.uffd: Uffd | None = None
        self.wp_uffd: Uffd | None = None     # write tracking (source side), see cmd_track
        self.removed: SharedBitmap | None = None  # the tracker's bitmap of discarded pages, see cmd_track
        self.snapshot: LiveSnapshot | None = None  # the latest live snapshot, see cmd_snapshot
        self.rx_fds: list[int] = []          # fds that came with commands (a snapshot's file)
        self.finished_sent = False
        self.closing = False
        self.progressed = threading.Event()  # set by every progress event: the workload may have started

    def make_engine(self):  # noqa: ANN201 - a Workload, or an engine with its interface
        """What runs on guest RAM: the synthetic workload engine."""
        from migrate.guest.workloads import Workload

        a = self.args
        return Workload(self.mem, workload=a.workload, seed=a.seed, ops=a.ops, threads=a.threads,
                        ops_per_sec=a.ops_per_sec, page_size=a.page_size)

    def prepare(self) -> None:
        """Source mode, before ready: give guest RAM its initial content."""
        if not self.args.no_fill:
            from migrate.guest.workloads import fill_realistic
            fill_realistic(self.mem, self.spec.page_size, self.spec.seed)

    # ------------------------------------------------------------- output
    def send(self, msg: dict) -> None:
        line = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self.send_lock:
            try:
                self.sock.sendall(line)
            except OSError:
                if not self.listener:
                    os._exit(0)              # the agent is gone
                # else: dropped; a restarted agent will rejoin (see rejoin())

    def progress(self) -> None:
        self.send({"event": "progress", "t_ns": time.time_ns(), "ops": self.wl.ops_done,
                   "first_op_ns": self.wl.first_op_ns(), "running": self.wl.running})
        self.progressed.set()

    def stats(self) -> dict:
        return {"ops_done": self.wl.ops_done, "ops_total": self.spec.ops, "running": self.wl.running,
                "finished": self.wl.finished, "first_op_ns": self.wl.first_op_ns(),
                "last_op_ns": self.wl.last_op_ns(), "pid": os.getpid()}

    # ------------------------------------------------------------- modes
    def setup(self) -> None:
        if self.args.restore:
            self._setup_restore()
            return
        self.prepare()
        self.send({"event": "ready", "pid": os.getpid()})
        if not self.args.start_paused:
            self.wl.start()
            self.progress()

    def _setup_restore(self) -> None:
        from migrate import uffd as U
        from migrate.handshake import send_handshake

        page = self.spec.page_size
        features = U.FEATURE_MISSING_SHMEM | (U.FEATURE_MISSING_HUGETLBFS if page > mmap.PAGESIZE else 0)
        # The agent handles what the guest does to its own memory meanwhile
        # (docs/architecture.md, "Non-cooperative events"), where the kernel can say.
        supported = U.probe_features()
        features |= U.EVENT_FEATURES & supported
        # And, when the agent watches writes (--watch-writes: a policy that does, or a working-set
        # recording), asynchronous write-protect where the kernel has it: the agent may install pages
        # protected, and read which ones the guest went on to write (migrate.dest.written). Only then:
        # a range registered write-protect costs a walk of all its page tables at the unregister,
        # ~50-80 ms for 1 GiB, between the last page and the run's completion.
        if self.args.watch_writes and supported & U.WP_ASYNC_FEATURES == U.WP_ASYNC_FEATURES:
            features |= U.WP_ASYNC_FEATURES
        self.uffd = U.Uffd.create(features, page_size=page)
        base = self.wl.address
        self.uffd.register(base, self.spec.size, U.MODE_MISSING | (U.MODE_WP if features & U.FEATURE_WP_ASYNC else 0))
        # We keep our copy of the fd open: if the agent's copy were the last
        # one and it went away, faulting threads would read zero pages.
        self.regions = [U.Region(base, self.spec.size, 0, page)]
        send_handshake(self.sock, self.uffd.fd, self.regions)
        if self.args.rejoin:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            if os.path.exists(self.args.rejoin):
                os.unlink(self.args.rejoin)
            self.listener.bind(self.args.rejoin)
            os.chmod(self.args.rejoin, 0o600)
            self.listener.listen(1)

    def rejoin(self) -> bool:
        """Wait for a restarted agent; hand it our uffd and RAM again. False: none came.

        Faulting guest threads stay blocked meanwhile: we still hold the
        userfaultfd, so no fault is ever answered with a zero page.
        """
        assert self.listener is not None and self.uffd is not None, "rejoin() needs the --rejoin listener and a uffd"
        self.listener.settimeout(REJOIN_TIMEOUT)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return False
        conn.settimeout(None)
        hello = json.dumps({"event": "rejoined", "pid": os.getpid(),
                            "regions": [r.to_wire() for r in self.regions]}).encode() + b"\n"
        socket.send_fds(conn, [hello], [self.uffd.fd, self.memfd])
        with self.send_lock:
            self.sock.close()
            self.sock = conn
        return True

    # ----------------------------------------------------------- commands
    def handle(self, msg: dict) -> None:
        rid = msg.get("id")
        cmd = msg.get("cmd")
        try:
            if cmd == "digest":               # may fault in every page: off the command loop
                threading.Thread(target=self._digest, args=(rid,), daemon=True).start()
                return
            reply = getattr(self, f"cmd_{cmd}")(msg) if isinstance(cmd, str) and hasattr(self, f"cmd_{cmd}") \
                else None
            if reply is None:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as e:  # noqa: BLE001 - every failure goes back to the agent
            self.send({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        self.send({"id": rid, "ok": True, **reply})
        if cmd == "stop":
            self.closing = True

    def _digest(self, rid: object) -> None:
        from migrate.guest.workloads import digest
        try:
            self.send({"id": rid, "ok": True, "digest": digest(self.mem)})
        except Exception as e:  # noqa: BLE001
            self.send({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})

    def cmd_pause(self, msg: dict) -> dict:
        with self.ctl_lock:
            self.wl.pause()
            state = self.wl.export_state()
        self.progress()
        return {"state": state, "last_op_ns": state["last_op_ns"]}

    def cmd_resume(self, msg: dict) -> dict:
        with self.ctl_lock:
            if self.wl.running:
                raise RuntimeError("the workload is already running")
            state = msg.get("state")
            if state:
                if isinstance(state, dict) and "threads" not in state and isinstance(state.get("state"), dict):
                    state = state["state"]       # a whole pause reply
                self.wl.import_state(state)
            self.finished_sent = False
            self.wl.start()
        self.progress()
        return {}

    def cmd_state(self, msg: dict) -> dict:
        state = self.wl.export_state()
        return {"state": state, "last_op_ns": state["last_op_ns"], "running": self.wl.running}

    def cmd_stats(self, msg: dict) -> dict:
        return self.stats()

    def cmd_track(self, msg: dict) -> dict:
        """Start write tracking: async WP registration of all RAM, all protected.

        WP_ASYNC never blocks a writer (the kernel just notes the write), so
        nobody reads this fd; keeping it open keeps the registration alive.
        """
        from migrate import uffd as U

        removed = self.rx_fds.pop(0) if self.rx_fds else -1
        with self.ctl_lock:
            self._watch_discards(removed)  # before the protect: no discard after it goes unseen
            if self.wp_uffd is None:
                features = U.WP_ASYNC_FEATURES
                wp = None
                try:
                    wp = U.Uffd.create(features, page_size=self.spec.page_size)
                    wp.register(self.wl.address, self.spec.size, U.MODE_WP)
                    wp.writeprotect(self.wl.address, self.spec.size, True)
                except OSError:
                    if wp is not None:
                        wp.close()
                    self._watch_discards(-1)
                    raise
                self.wp_uffd = wp
        return {"base": self.wl.address, "size": self.spec.size}

    def _watch_discards(self, fd: int) -> None:
        """Report the guest's discards into the page bitmap in memfd `fd` (-1: stop reporting).

        A discard is no write: async write-protect never sees a page sent,
        then discarded and not written again (migrate.source.dirty).
        """
        from migrate._native import ffi
        from migrate.bitmap import SharedBitmap

        old, self.removed = self.removed, None
        if fd >= 0:
            self.removed = SharedBitmap.attach(fd, self.spec.size // self.spec.page_size)
            self.removed.close()  # no descriptor kept: the mapping lives as long as the object
        self.wl.watch_discards(self.removed.ptr if self.removed is not None else ffi.NULL)
        del old  # unmapped with its last reference, now that no discard uses it

    def cmd_untrack(self, msg: dict) -> dict:
        with self.ctl_lock:
            self._watch_discards(-1)
            if self.wp_uffd is not None:
                self.wp_uffd.close()         # closing the last fd unregisters the range
                self.wp_uffd = None
        return {}

    def cmd_snapshot(self, msg: dict) -> dict:
        """Write-protect all RAM at one instant and start saving it into the attached file."""
        from migrate.guest.snapshot import LiveSnapshot

        if not self.rx_fds:
            raise ValueError("snapshot needs the image file's fd attached (SCM_RIGHTS)")
        fd = self.rx_fds.pop(0)
        with self.ctl_lock:
            busy = ("write tracking is on (a migration is being prepared)" if self.wp_uffd is not None else
                    "a snapshot is running" if self.snapshot is not None and self.snapshot.result is None else "")
            if busy:
                os.close(fd)
                raise RuntimeError(f"{busy}: no snapshot now")
            snap = LiveSnapshot(self.wl, fd, self.spec.page_size)
            try:
                taken = snap.take()
            except BaseException:
                snap.close()
                raise
            self.snapshot = snap
        self.progress()
        return taken

    def cmd_snapshot_status(self, msg: dict) -> dict:
        if self.snapshot is None:
            raise RuntimeError("no snapshot was taken")
        return self.snapshot.status()

    def cmd_release_uffd(self, msg: dict) -> dict:
        """The restore is complete: close our userfaultfd (see GuestProcess.release_uffd)."""
        if self.uffd is not None and self.listener is None:  # a rejoinable runner keeps it for a new agent
            self.uffd.close()
            self.uffd = None
        return {}

    def cmd_stop(self, msg: dict) -> dict:
        return {}

    # -------------------------------------------------------------- loops
    def progress_loop(self) -> None:
        while not self.closing:
            if not self.wl.running:  # paused: sleep until a start says so, not PROGRESS_EVERY at a time
                self.progressed.wait(PAUSED_LOOK_EVERY)
                self.progressed.clear()  # running is looked at again after this: no start goes unseen
                continue
            time.sleep(PROGRESS_EVERY)
            if not self.wl.running:
                continue
            self.progress()
            if self.wl.finished and not self.finished_sent:
                with self.ctl_lock:
                    if self.finished_sent or not self.wl.running:
                        continue
                    self.wl.pause()          # join the (finished) threads
                    self.finished_sent = True
                    self.send({"event": "finished", "ops": self.wl.ops_done, "t_ns": self.wl.last_op_ns()})

    def command_loop(self) -> None:
        buf = b""
        while not self.closing:
            try:
                chunk, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
            except OSError:                  # ECONNRESET: the agent closed with data unread
                chunk, fds = b"", []
            self.rx_fds.extend(fds)
            if not chunk:                    # the agent closed the socket (or died)
                if self.listener and self.rejoin():
                    buf = b""
                    continue
                return
            buf += chunk
            while b"\n" in buf and not self.closing:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError("a command must be a JSON object")
                except ValueError as e:
                    self.send({"id": None, "ok": False, "error": f"bad command line: {e}"})
                    continue
                self.handle(msg)


def main(argv: list[str] | None = None, runner_cls: type[Runner] = Runner,
         args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = parse_args(argv)
    if not args.rejoin:
        _die_with_parent(args.parent_pid)
    try:
        runner = runner_cls(args)
    except (ValueError, OSError) as e:
        print(f"{runner_cls.PROG}: {e}", file=sys.stderr)
        return 2
    try:
        runner.setup()
    except Exception as e:  # noqa: BLE001
        print(f"{runner_cls.PROG}: setup failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    threading.Thread(target=runner.progress_loop, daemon=True, name="progress").start()
    runner.command_loop()
    if runner.listener:
        runner.listener.close()
        os.unlink(args.rejoin)
    # Stop or agent gone.  Do not join workload threads: on a destination they
    # may be blocked on faults nobody will resolve.  Guest RAM is the memfd.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
