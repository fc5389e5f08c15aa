"""The agent-side handle to a guest runner process (migrate.guest.runner)."""
from __future__ import annotations

import collections
import itertools
import json
import logging
import mmap
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, NoReturn

from migrate import spawn
from migrate.errors import FailedPrecondition
from migrate.names import GuestKind, Workload, parse

if TYPE_CHECKING:
    from migrate.guest.warm import Warm, WarmPool
    from migrate.uffd import Region

log = logging.getLogger(__name__)

#: Seconds to wait for a runner to map (and fill) its memory, plus per GiB.
LAUNCH_TIMEOUT = 30.0
LAUNCH_TIMEOUT_PER_GIB = 10.0
CALL_TIMEOUT = 30.0
DIGEST_TIMEOUT = 600.0
_MAX_PROGRESS = 200_000


@dataclass
class GuestSpec:
    size: int
    workload: str = Workload.RANDOM_WRITE
    seed: int = 1
    ops: int = 1_000_000
    threads: int = 1
    ops_per_sec: float = 0.0
    page_size: int = mmap.PAGESIZE
    #: synthetic (migrate.guest.runner) or kvm (migrate.guest.kvm: `threads` vCPUs)
    kind: str = GuestKind.SYNTHETIC

    @property
    def runner_module(self) -> str:
        return "migrate.guest.kvm" if self.kind == GuestKind.KVM else "migrate.guest.runner"

    def validate(self) -> None:
        """ValueError with a clear message if the spec cannot run."""
        for name in ("size", "seed", "ops", "threads", "page_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"guest {name} must be an integer, got {v!r}")
        if self.page_size < 4096 or self.page_size & (self.page_size - 1):
            raise ValueError(f"guest page size {self.page_size} is not a power of two >= 4096")
        if self.size <= 0:
            raise ValueError(f"guest size must be > 0, got {self.size}")
        if self.size % self.page_size:
            raise ValueError(f"guest size {self.size} is not a multiple of the page size {self.page_size}")
        parse(Workload, self.workload, "workload")
        if self.threads < 1:
            raise ValueError(f"guest threads must be >= 1, got {self.threads}")
        if self.threads > self.size // self.page_size:
            raise ValueError(f"guest has {self.size // self.page_size} pages, fewer than its {self.threads} threads")
        if not 0 <= self.ops < 1 << 63:
            raise ValueError(f"guest ops must be >= 0, got {self.ops}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"guest seed must be in [0, 2**64), got {self.seed}")
        if not isinstance(self.ops_per_sec, (int, float)) or isinstance(self.ops_per_sec, bool) \
                or not self.ops_per_sec >= 0 or self.ops_per_sec == float("inf"):
            raise ValueError(f"guest ops_per_sec must be a finite number >= 0 (0 = unlimited), "
                             f"got {self.ops_per_sec!r}")
        if parse(GuestKind, self.kind, "guest kind") is GuestKind.KVM:
            from migrate.guest.kvm import check_spec
            check_spec(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GuestSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown guest spec fields: {', '.join(sorted(unknown))}")
        if "size" not in d:
            raise ValueError("guest spec needs a size")
        spec = cls(**d)
        spec.validate()
        return spec


class _Adopted:
    """The few Popen methods GuestProcess uses, for a runner this process did not start."""

    stderr = None

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if spawn.alive(self.pid) else 0

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return 0

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class _Slot:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict | None = None


class GuestProcess:
    """A running guest runner.  Use :meth:`launch`.

    Ownership: the memfd stays the caller's (the runner gets its own copy).
    In restore mode :attr:`uffd` is the userfaultfd received by handshake;
    it belongs to the caller from then on (GuestProcess never closes it).
    """

    def __init__(self, spec: GuestSpec, proc: subprocess.Popen | _Adopted, sock: socket.socket) -> None:
        self.spec = spec
        self.pid = proc.pid
        self.uffd: int | None = None
        self.regions: list[Region] = []
        self.progress: list[tuple[int, int]] = []
        self.warm = False                    # a warm runner (migrate.guest.warm) took this guest
        self._proc = proc
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._eof = threading.Event()
        self._stopped = False
        self._reader: threading.Thread | None = None
        self._err_reader = threading.Thread(target=self._read_stderr, daemon=True, name=f"guest-{self.pid}-err")
        self._err_reader.start()

    # ------------------------------------------------------------ launch
    @classmethod
    def launch(cls, spec: GuestSpec, memfd: int, *, restore: bool = False, start_paused: bool = False,
               fill: bool = True, timeout: float | None = None, rejoin: str = "",
               warm: WarmPool | None = None, watch_writes: bool = False) -> GuestProcess:
        """Start a runner on `memfd` and wait until it is ready (source mode)
        or has handed over its userfaultfd (restore mode). A restore-mode
        runner given a `rejoin` socket path outlives this agent (see rejoin());
        with `watch_writes` its userfaultfd can also tell which pages the guest
        wrote (asynchronous write-protect, where the kernel has it).
        With a `warm` pool, a runner started ahead takes the guest when one is
        there (:attr:`warm` says so)."""
        spec.validate()
        size = os.fstat(memfd).st_size
        if size < spec.size:
            raise ValueError(f"memfd holds {size} bytes, less than the guest's {spec.size}")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = ["--memfd", str(memfd), "--control-fd", str(child.fileno()), "--size", str(spec.size),
                "--page-size", str(spec.page_size), "--workload", spec.workload, "--seed", str(spec.seed),
                "--ops", str(spec.ops), "--threads", str(spec.threads), "--ops-per-sec", repr(float(spec.ops_per_sec)),
                "--parent-pid", str(os.getpid())]
        if restore:
            args.append("--restore")
            if rejoin:
                args += ["--rejoin", rejoin]
            if watch_writes:
                args.append("--watch-writes")
        if start_paused:
            args.append("--start-paused")
        if not fill:
            args.append("--no-fill")
        taken = cls._assign_warm(warm, spec.runner_module, args, memfd)
        if taken is not None:
            parent.close()
            child.close()
            proc, parent = taken.proc, taken.sock
        else:
            try:
                proc = subprocess.Popen(spawn.module_argv(spec.runner_module, *args), env=spawn.child_env(),
                                        pass_fds=(memfd, child.fileno()), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            except BaseException:
                parent.close()
                child.close()
                raise
            child.close()
        gp = cls(spec, proc, parent)
        gp.warm = taken is not None
        if timeout is None:
            timeout = LAUNCH_TIMEOUT + LAUNCH_TIMEOUT_PER_GIB * spec.size / (1 << 30)
        try:
            if restore:
                gp._receive_uffd(timeout)
            gp._reader = threading.Thread(target=gp._read_loop, daemon=True, name=f"guest-{gp.pid}")
            gp._reader.start()
            if not restore:
                deadline = time.monotonic() + timeout
                while not gp._ready.wait(0.05):
                    if gp._eof.is_set() or time.monotonic() > deadline:
                        gp._raise_dead("did not become ready", timeout)
        except BaseException:
            if gp.uffd is not None:
                os.close(gp.uffd)
                gp.uffd = None
            gp.stop()
            raise
        return gp

    @staticmethod
    def _assign_warm(warm: WarmPool | None, module: str, args: list[str], memfd: int) -> Warm | None:
        """A warm runner of `module` from `warm`, given `args` and `memfd`; None: none is there (start one)."""
        from migrate.guest.warm import assign
        while warm is not None and (taken := warm.take(module)) is not None:
            try:
                assign(taken, args, memfd)
                return taken
            except OSError as err:  # it died since the pool looked: the next one, or a fresh start
                log.info("warm runner %d is gone (%s); taking another", taken.proc.pid, err)
                taken.end()
        return None

    @classmethod
    def rejoin(cls, path: str, spec: GuestSpec, timeout: float = CALL_TIMEOUT) -> tuple[GuestProcess, int]:
        """Take over a restore-mode runner whose agent died: (process, RAM memfd).

        The runner answers on `path` with its pid and regions, and hands over
        its userfaultfd (as :attr:`uffd`) and its RAM's memfd (the caller's).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            data, fds, _, _ = socket.recv_fds(sock, 65536, 2)
            sock.settimeout(None)
        except OSError as e:
            sock.close()
            raise RuntimeError(f"no guest runner answers on {path}: {e}") from None
        if len(fds) != 2 or not data.endswith(b"\n"):
            for fd in fds:
                os.close(fd)
            sock.close()
            raise RuntimeError(f"guest runner on {path} did not hand over its userfaultfd and memory")
        from migrate.handshake import validate_regions
        hello = json.loads(data)
        gp = cls(spec, _Adopted(int(hello["pid"])), sock)
        gp.uffd, gp.regions = fds[0], validate_regions(hello["regions"])
        gp._reader = threading.Thread(target=gp._read_loop, daemon=True, name=f"guest-{gp.pid}")
        gp._reader.start()
        return gp, fds[1]

    def _receive_uffd(self, timeout: float) -> None:
        from migrate.handshake import recv_handshake
        try:
            fd, regions = recv_handshake(self._sock, timeout=timeout)
        except (ConnectionError, TimeoutError, ValueError) as e:
            self._proc_wait(1.0)
            raise RuntimeError(f"guest runner {self.pid} sent no userfaultfd handshake: {e}{self._why()}") from None
        page = self.spec.page_size
        ok = (len(regions) == 1 and regions[0].size == self.spec.size and regions[0].offset == 0
              and regions[0].page_size == page)
        if not ok:
            os.close(fd)
            raise RuntimeError(f"guest runner {self.pid} handshake regions {regions} do not match its spec")
        self.uffd, self.regions = fd, regions

    # ----------------------------------------------------------- readers
    def _read_stderr(self) -> None:
        stream = self._proc.stderr
        if stream is None:  # an adopted runner: its stderr went to the agent that started it
            return
        try:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    self._stderr.append(line)
                    log.debug("guest %d: %s", self.pid, line)
        except (OSError, ValueError):
            pass

    def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._dispatch(line)
        except OSError:
            pass
        finally:
            self._eof.set()
            with self._lock:
                pending = list(self._pending.values())
            for slot in pending:
                slot.done.set()

    def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("guest %d sent a bad line: %r", self.pid, line[:200])
            return
        if not isinstance(msg, dict):
            return
        event = msg.get("event")
        if event is None:
            with self._lock:
                slot = self._pending.get(msg.get("id", -1))
            if slot is not None:
                slot.reply = msg
                slot.done.set()
            elif msg.get("ok") is False:
                log.warning("guest %d: %s", self.pid, msg.get("error"))
            return
        # "finished" carries the last op's time: 0 when the guest did no op here (it had finished before).
        if event in ("progress", "finished") and int(msg.get("t_ns", 0)) > 0:
            self.progress.append((int(msg["t_ns"]), int(msg.get("ops", 0))))
            if len(self.progress) > _MAX_PROGRESS:
                del self.progress[: _MAX_PROGRESS // 2]
        if event == "guest-error":           # a kvm guest's vCPU stopped (triple fault, KVM_RUN failure)
            log.warning("guest %d: %s", self.pid, msg.get("error"))
        elif event == "ready":
            self._ready.set()
        elif event == "finished":
            self._finished.set()

    # -------------------------------------------------------------- calls
    def _why(self) -> str:
        rc = self._proc.poll()
        status = f"; exit status {rc}" if rc is not None else ""
        tail = "; stderr: " + " | ".join(self._stderr) if self._stderr else ""
        return status + tail

    def _proc_wait(self, timeout: float) -> None:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._err_reader.join(0.5)

    def _raise_dead(self, what: str, timeout: float) -> NoReturn:
        if self._eof.is_set() or self._proc.poll() is not None:
            self._proc_wait(1.0)
            raise RuntimeError(f"guest runner {self.pid} {what}: it exited{self._why()}")
        raise TimeoutError(f"guest runner {self.pid} {what} within {timeout} s{self._why()}")

    def call(self, cmd: str, timeout: float = CALL_TIMEOUT, fds: tuple[int, ...] = (), **kw: object) -> dict:
        """Send one command (with `fds` attached, SCM_RIGHTS) and wait for its reply
        (RuntimeError if it fails or the runner is gone, TimeoutError if it does not answer in time)."""
        if self._stopped:
            raise RuntimeError(f"guest runner {self.pid} was stopped")
        rid = next(self._ids)
        slot = _Slot()
        with self._lock:
            self._pending[rid] = slot
        try:
            if self._eof.is_set():           # no reader left to deliver a reply
                self._raise_dead(f"cannot take {cmd!r}", timeout)
            line = (json.dumps({"id": rid, "cmd": cmd, **kw}) + "\n").encode()
            try:
                with self._send_lock:
                    if fds:  # a command line is short: one sendmsg carries it whole
                        if socket.send_fds(self._sock, [line], list(fds)) != len(line):
                            raise OSError("short send of a command with fds")
                    else:
                        self._sock.sendall(line)
            except OSError as e:
                self._proc_wait(1.0)
                raise RuntimeError(f"guest runner {self.pid} unreachable ({e}){self._why()}") from None
            slot.done.wait(timeout)
            if slot.reply is None:
                self._raise_dead(f"did not answer {cmd!r}", timeout)
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        reply = slot.reply
        if not reply.get("ok"):  # the runner refused (a state that does not fit, a step out of order)
            raise FailedPrecondition(f"guest runner {self.pid} refused {cmd}: {reply.get('error')}")
        return reply

    def pause(self, timeout: float = CALL_TIMEOUT) -> dict:
        """Pause the workload; returns its execution state (a dict with
        ``threads`` and ``last_op_ns``, the realtime ns of its last op),
        which :meth:`resume` of another runner accepts as is."""
        return self.call("pause", timeout)["state"]

    def resume(self, state: dict | None = None, timeout: float = CALL_TIMEOUT) -> None:
        """Resume the workload, first importing `state` if given."""
        if state:
            self.call("resume", timeout, state=state)
        else:
            self.call("resume", timeout)

    def state(self, timeout: float = CALL_TIMEOUT) -> dict:
        """The execution state without pausing (exact only while paused)."""
        return self.call("state", timeout)["state"]

    def track_writes(self, removed_fd: int = -1, timeout: float = CALL_TIMEOUT) -> int:
        """Have the runner write-protect its RAM for async write tracking; returns
        the RAM's address in the runner (for PAGEMAP_SCAN on /proc/PID/pagemap).
        With `removed_fd` (a page bitmap's memfd, sent, not given away) the runner
        also sets the bits of the pages its guest discards, which no scan sees.
        RuntimeError names what the kernel lacks if it cannot."""
        fds = (removed_fd,) if removed_fd >= 0 else ()
        return int(self.call("track", timeout, fds=fds)["base"])

    def untrack_writes(self, timeout: float = CALL_TIMEOUT) -> None:
        self.call("untrack", timeout)

    def release_uffd(self, timeout: float = CALL_TIMEOUT) -> None:
        """Restore mode, the run complete: the runner closes its userfaultfd (best effort: a
        runner that is gone has none). Once ours is closed too, an event the guest still
        waits on (a discard begun as the run ended) is let go by the kernel."""
        try:
            self.call("release_uffd", timeout=timeout)
        except (RuntimeError, OSError, TimeoutError):
            pass

    def snapshot(self, image_fd: int, timeout: float = CALL_TIMEOUT) -> dict:
        """Have the runner write-protect its RAM at one instant and save it into
        `image_fd` (a copy is sent; the caller keeps its own) while it runs:
        ``{"state", "ops", "downtime_ms", "t_ns"}``; then poll :meth:`snapshot_status`."""
        reply = self.call("snapshot", timeout, fds=(image_fd,))
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    def snapshot_status(self, timeout: float = CALL_TIMEOUT) -> dict:
        """The snapshot's counters (migrate.guest.snapshot); ``done`` once every page is saved."""
        reply = self.call("snapshot_status", timeout)
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    def digest(self, timeout: float | None = None) -> str:
        return self.call("digest", DIGEST_TIMEOUT if timeout is None else timeout)["digest"]

    def stats(self, timeout: float = CALL_TIMEOUT) -> dict:
        reply = self.call("stats", timeout)
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    def wait_finished(self, timeout: float) -> bool:
        """True once the workload has done all its ops; False on timeout;
        RuntimeError if the runner exits first."""
        deadline = time.monotonic() + timeout
        while not self._finished.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self._eof.is_set():
                if self._finished.is_set():
                    break
                self._proc_wait(1.0)
                raise RuntimeError(f"guest runner {self.pid} exited before finishing{self._why()}")
            if time.monotonic() >= deadline:
                return False
        return True

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    # --------------------------------------------------------------- stop
    def stop(self, timeout: float = 5.0) -> None:
        """Stop the runner (stop command, then SIGTERM, then SIGKILL), reap it
        and close our end of the control socket.  Idempotent."""
        if self._stopped:
            return
        if self._proc.poll() is None and not self._eof.is_set() and self._reader is not None:
            try:
                self.call("stop", min(timeout, 2.0))
            except (RuntimeError, TimeoutError, OSError):
                pass
        self._stopped = True
        try:  # EOF on the control socket also makes the runner exit
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            try:
                self._proc.wait(1.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._reader is not None:
            self._reader.join(2.0)
        self._sock.close()
        self._err_reader.join(2.0)
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"GuestProcess(pid={self.pid}, spec={self.spec})"
