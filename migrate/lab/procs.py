"""Processes of the lab: started inside a namespace, tied to their parent, ended by PID."""
from __future__ import annotations

import ctypes
import signal

from migrate.local import ServiceProcess
from migrate.spawn import alive

_PR_SET_PDEATHSIG = 1
#: Loaded once here: a child between fork and exec must not dlopen.
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (a crashed keeper)."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def in_namespace(ns: str, module: str, *args: str, log_path: str) -> ServiceProcess:
    """`python -m MODULE ARGS` inside namespace `ns`, tied to its parent (the keeper)."""
    return ServiceProcess(module, *args, prefix=("ip", "netns", "exec", ns), log_path=log_path,
                          preexec_fn=die_with_parent, what=f"{module} {' '.join(args[:2])} in {ns}".strip())


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
