"""Pre-started ("warm") guest runners: a destination's run takes one instead of starting an interpreter.

Starting a runner costs an interpreter and the imports of its engine, the
userfaultfd and the native layer: ~50-75 ms of CPU, 100-200 ms of wall time
when four runs prepare at once on two cores, all of it inside PrepareIncoming.
A destination agent therefore keeps a few runners started ahead
(:class:`WarmPool`, `migrate dest serve --warm-runners N`), per runner module
(the synthetic kind's, and the kvm kind's where /dev/kvm works): each has
done its imports and waits on its control socket.

    python -m migrate.guest.warm --module MODULE --control-fd FD --parent-pid PID

The assignment is one JSON line ``{"argv": [...]}`` with the guest RAM's
memfd attached (SCM_RIGHTS): the runner's own command line, where
``--memfd`` and ``--control-fd`` name the descriptors this process holds.
The warm runner then becomes that runner (MODULE's ``main(argv)``), on the
same control socket: the agent sees no difference but the time saved.

A taken runner is replaced in the background, by the pool's own thread:
Linux sends a runner its parent-death signal when the *thread* that started
it ends, so runners are started by a thread that lives as long as the pool.
Where the agent may bring a process back from SCHED_IDLE (root, or a
generous RLIMIT_NICE), a runner imports at SCHED_IDLE, and is set back to
the normal policy as it is taken: a refill during a drain then uses only
CPU time the runs leave idle, instead of the 50-75 ms per runner the
pool is there to take off them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from migrate import spawn
from migrate.guest.process import GuestSpec
from migrate.names import GuestKind

log = logging.getLogger(__name__)

#: Runners kept warm per runner module by default (`migrate dest serve --warm-runners`).
DEFAULT_WARM_RUNNERS = 2
#: Seconds between two looks at the idle runners (one that died is replaced, never handed out).
_CHECK_EVERY = 1.0
#: Most bytes of an assignment line (a runner's argv).
_MAX_ASSIGNMENT = 65536
#: A warm runner's process name while it waits (/proc/PID/comm, at most 15 bytes), then once it runs a guest.
WAITING_NAME, RUNNER_NAME = "migrate-warm", "migrate-runner"


def host_modules() -> tuple[str, ...]:
    """The runner modules worth keeping warm here: the synthetic kind's, and the kvm kind's where /dev/kvm works."""
    from migrate.guest.kvm import kvm_problem
    kinds = [GuestKind.SYNTHETIC] + ([GuestKind.KVM] if kvm_problem() is None else [])
    return tuple(GuestSpec(size=mmap.PAGESIZE, kind=kind).runner_module for kind in kinds)


@dataclass
class Warm:
    """One warm runner: its process and the agent's end of its control socket."""

    module: str
    proc: subprocess.Popen
    sock: socket.socket

    def end(self) -> None:
        """Kill (by PID) and reap it; close our end of its socket."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.sock.close()


class WarmPool:
    """Keeps `size` warm runners of each of `modules` (size 0: none; take() always says None).

    Thread-safe. close() ends the idle runners (by PID, reaped); the ones
    taken are their takers' (GuestProcess), which reap them. Close it after
    those stopped: a runner gets SIGKILL when the thread that started it,
    the pool's, ends (but one that outlives its agent, with --rejoin).
    """

    def __init__(self, size: int, modules: tuple[str, ...]) -> None:
        if size < 0:
            raise ValueError(f"warm runners must be >= 0, got {size}")
        self.size = size
        self.modules = modules
        self._idle: dict[str, list[Warm]] = {m: [] for m in modules}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.lie_low = bool(size) and _may_lie_low()  # runners wait at SCHED_IDLE until taken
        if size:
            self._thread = threading.Thread(target=self._keep, daemon=True, name="warm-runners")
            self._thread.start()

    def take(self, module: str) -> Warm | None:
        """A warm runner of `module` (maybe still importing: it reads its assignment when done), or None."""
        with self._cond:
            idle = self._idle.get(module, [])
            while idle:
                warm = idle.pop(0)
                if warm.proc.poll() is None:
                    self._cond.notify_all()  # refill
                    if self.lie_low:
                        _set_policy(warm.proc.pid, os.SCHED_OTHER)  # a guest's runner again, before it has the guest
                    return warm
                self._drop(warm)
            self._cond.notify_all()
        return None

    def idle(self, module: str) -> list[int]:
        """PIDs of the idle warm runners of `module` that are alive."""
        with self._cond:
            return [w.proc.pid for w in self._idle.get(module, []) if w.proc.poll() is None]

    def close(self) -> None:
        """End every idle runner and the thread that starts them."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            idle = [w for ws in self._idle.values() for w in ws]
            for ws in self._idle.values():
                ws.clear()
        for warm in idle:
            warm.end()

    def __enter__(self) -> WarmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ keeper
    def _keep(self) -> None:
        """Top every module up to `size` idle runners, now and whenever one is taken or dies."""
        while True:
            with self._cond:
                if self._closed:
                    return
                for ws in self._idle.values():
                    for warm in [w for w in ws if w.proc.poll() is not None]:
                        ws.remove(warm)
                        self._drop(warm)
                short = [m for m, ws in self._idle.items() for _ in range(self.size - len(ws))]
            for module in short:
                started = self._start(module)
                with self._cond:
                    if started is None:
                        break
                    self._idle[module].append(started)
                    if self._closed:
                        return  # close() ends it with the others
            with self._cond:
                if not self._closed:
                    self._cond.wait(_CHECK_EVERY)

    def _drop(self, warm: Warm) -> None:
        """A runner that died idle: reap it, say so (its stderr's last line says why)."""
        err = warm.proc.stderr.read().decode(errors="replace").strip() if warm.proc.stderr is not None else ""
        log.info("warm runner %d (%s) exited idle with status %s%s; replacing it", warm.proc.pid, warm.module,
                 warm.proc.poll(), f": {err.splitlines()[-1]}" if err else "")
        warm.end()

    def _start(self, module: str) -> Warm | None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                spawn.module_argv(__name__, "--module", module, "--control-fd", str(child.fileno()),
                                  "--parent-pid", str(os.getpid())),
                env=spawn.child_env(), pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as err:
            parent.close()
            log.warning("cannot start a warm runner of %s: %s", module, err)
            time.sleep(_CHECK_EVERY)  # not in a tight loop
            return None
        finally:
            child.close()
        if self.lie_low:
            _set_policy(proc.pid, os.SCHED_IDLE)  # single-threaded until it has a guest: the whole process
        return Warm(module, proc, parent)


def _set_policy(pid: int, policy: int) -> None:
    try:
        os.sched_setscheduler(pid, policy, os.sched_param(0))
    except OSError:
        pass  # it exited meanwhile: whoever takes it sees that


def _may_lie_low() -> bool:
    """Whether this process may move a process to SCHED_IDLE and back (tried on a throwaway thread:
    policies are per thread, and one left at SCHED_IDLE must not be the pool's)."""
    can = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            can.append(True)
        except (OSError, AttributeError):  # not permitted, or not Linux
            pass

    thread = threading.Thread(target=probe, name="warm-probe")
    thread.start()
    thread.join()
    return bool(can)


def assign(warm: Warm, argv: list[str], memfd: int) -> None:
    """Give `warm` its runner command line and the guest's RAM (a copy of `memfd` is sent).

    OSError if the runner is gone.
    """
    line = (json.dumps({"argv": argv}) + "\n").encode()
    if socket.send_fds(warm.sock, [line], [memfd]) != len(line):
        raise OSError("short send of a warm runner's assignment")


# ------------------------------------------------------------ the runner's side
def _receive(sock: socket.socket) -> tuple[list[str], int]:
    """Wait for the assignment: (argv, the memfd received). SystemExit when the agent closed the socket."""
    buf, fds = b"", []
    while not buf.endswith(b"\n"):
        chunk, got, _, _ = socket.recv_fds(sock, _MAX_ASSIGNMENT, 1)
        fds += got
        if not chunk or len(buf) + len(chunk) > _MAX_ASSIGNMENT:
            raise SystemExit(0)  # the pool closed us (or sent nonsense): nothing to run
        buf += chunk
    argv = json.loads(buf)["argv"]
    if len(fds) != 1 or not isinstance(argv, list):
        raise SystemExit("migrate.guest.warm: an assignment needs an argv list and one memfd")
    return [str(a) for a in argv], fds[0]


def _with_fds(argv: list[str], memfd: int, control_fd: int) -> list[str]:
    """`argv` with --memfd and --control-fd naming this process's descriptors."""
    out, it = [], iter(argv)
    for arg in it:
        out.append(arg)
        if arg in ("--memfd", "--control-fd"):
            next(it, None)
            out.append(str(memfd if arg == "--memfd" else control_fd))
    return out


def _name(name: str) -> None:
    """Name the process (what `ps -o comm` and /proc/PID/comm show); best effort."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m migrate.guest.warm", description=__doc__.split("\n")[0])
    ap.add_argument("--module", required=True, help="the runner module to become (migrate.guest.runner, ...)")
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    args = ap.parse_args(argv)
    spawn.die_with_parent()
    if os.getppid() != args.parent_pid:  # the agent died before the call
        return 1
    _name(WAITING_NAME)
    runner = importlib.import_module(args.module)
    for name in runner.WARM_IMPORTS:  # what the runner would import as it sets up
        importlib.import_module(name)
    sock = socket.socket(fileno=args.control_fd)
    run_argv, memfd = _receive(sock)
    _name(RUNNER_NAME)
    sock.detach()  # the runner takes the descriptor over
    spawn.die_with_parent(False)  # the runner decides (a --rejoin runner outlives the agent)
    return runner.main(_with_fds(run_argv, memfd, args.control_fd))


if __name__ == "__main__":
    sys.exit(main())
