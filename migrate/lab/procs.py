"""Processes of the lab: started inside a namespace, tied to their parent, ended by PID."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess

from migrate import spawn
from migrate.local import read_first_line

_PR_SET_PDEATHSIG = 1
#: Loaded once here: a child between fork and exec must not dlopen.
_libc = ctypes.CDLL(None, use_errno=True)
_START_TIMEOUT = 30.0


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (a crashed keeper)."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def alive(pid: int) -> bool:
    """True if `pid` runs (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class NsProcess:
    """`python -m MODULE ARGS` inside namespace `ns`, which prints "listening on HOST:PORT" first."""

    def __init__(self, ns: str, module: str, *args: str, log_path: str) -> None:
        self.what = f"{module} {' '.join(args[:2])}".strip()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *spawn.module_argv(module, *args)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=spawn.child_env(),
                start_new_session=True, preexec_fn=die_with_parent)
        line = read_first_line(self.proc, _START_TIMEOUT)
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{self.what} did not start in {ns}: {line or 'no output'} (see {log_path})")
        self.address = line.split()[-1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL its process group if it does not end in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def start_time(pid: int) -> int:
    """The kernel's start time of `pid` (clock ticks since boot), 0 if it is gone.

    Stored next to a PID so a later `lab down` never signals a new process
    that reused it.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def same_process(pid: int, started: int) -> bool:
    """True if `pid` is still the living process that started at `started`."""
    return bool(pid) and alive(pid) and start_time(pid) == started
