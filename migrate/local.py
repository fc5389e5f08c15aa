"""Agents started as local child processes (the demo, tests, benchmarks).

Each agent is its own process, found again and ended by PID; nothing
outlives the `with` block.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from typing import IO

from migrate import spawn

_START_TIMEOUT = 30.0


def read_first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first stdout line of `proc`, or "" if it exits or times out first."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None, "proc needs stdout=PIPE"
    fd = proc.stdout.fileno()
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                return buf.split(b"\n", 1)[0].decode()
        elif proc.poll() is not None:
            break
    return ""


class ServiceProcess:
    """`python -m MODULE ARGS` that says "listening on HOST:PORT" first; ended by PID.

    `prefix` runs it under another command (`ip netns exec NS` in the lab);
    `preexec_fn` runs in the child before exec.
    """

    def __init__(self, module: str, *args: str, prefix: tuple[str, ...] = (), log_path: str | None = None,
                 env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None,
                 what: str = "") -> None:
        self.what = what or f"{module} {' '.join(args[:2])}".strip()
        log: IO[bytes] | int = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [*prefix, *spawn.module_argv(module, *args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=log, start_new_session=True, env=spawn.child_env(env), preexec_fn=preexec_fn)
        finally:
            if not isinstance(log, int):
                log.close()
        line = read_first_line(self.proc, _START_TIMEOUT)
        if not line.startswith("listening on "):
            self.stop()
            where = f" (see {log_path})" if log_path else ""
            raise RuntimeError(f"{self.what} did not start: {line or 'no output'}{where}")
        self.address = line.split()[-1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (an agent stops its guests and bulk servers), then SIGKILL the group if needed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left in its group
            except ProcessLookupError:
                pass
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalAgent(ServiceProcess):
    """`migrate {role} serve` on loopback, on a port the kernel picks."""

    def __init__(self, role: str, *args: str, listen: str = "127.0.0.1:0", log_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.role = role
        super().__init__("migrate", role, "serve", "--listen", listen, *args, log_path=log_path, env=env,
                         what=f"{role} agent")


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
