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

from migrate import spawn


_START_TIMEOUT = 30.0


def read_first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first stdout line of `proc`, or "" if it exits or times out first."""
    deadline = time.monotonic() + timeout
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


class LocalAgent:
    """`migrate {role} serve` on loopback, on a port the kernel picks."""

    def __init__(self, role: str, *args: str, listen: str = "127.0.0.1:0", log_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.role = role
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                spawn.module_argv("migrate", role, "serve", "--listen", listen, *args),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                env=spawn.child_env(env))
        finally:
            if log_path:
                log.close()
        line = read_first_line(self.proc, _START_TIMEOUT)
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{role} agent did not start: {line or 'no output'}")
        self.address = line.split()[-1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the agent stops its guests and workers), then SIGKILL the group if needed."""
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

    def __enter__(self) -> "LocalAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
