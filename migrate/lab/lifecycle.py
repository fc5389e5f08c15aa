"""Bringing labs up and down, from the CLI, the bench and tests.

`up` starts a keeper (migrate/lab/keeper.py) and returns once it reports
the lab ready; `Lab` does the same as a context manager that stops it on
exit; `down` finds a lab from its state file alone, so it works after the
process that started it is gone.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time

from migrate import spawn
from migrate.lab import netns, state
from migrate.lab.link import LinkSpec
from migrate.lab.procs import same_process
from migrate.local import read_first_line

_READY_TIMEOUT = 90.0
_STOP_TIMEOUT = 60.0


def up(name: str, spec: LinkSpec, *, zstd_level: int = 1, log: str | None = None,
       detach: bool = True) -> tuple[subprocess.Popen, dict]:
    """Start a keeper for lab `name`; return it and its ready record (endpoints, PIDs).

    detach: the keeper gets its own session, so it outlives the caller (`migrate lab up`).
    """
    state.check_name(name)
    netns.require_tools(spec)
    state.STATE_DIR.mkdir(parents=True, exist_ok=True)
    log = log or str(state.log_path(name))
    argv = spawn.module_argv("migrate.lab.keeper", name, "--rate", str(spec.rate), "--delay", str(spec.delay),
                             "--jitter", str(spec.jitter), "--loss", str(spec.loss),
                             "--zstd-level", str(zstd_level), "--log", log)
    with open(log, "ab") as err:
        keeper = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                  env=spawn.child_env(), start_new_session=detach)
    line = read_first_line(keeper, _READY_TIMEOUT)
    assert keeper.stdout is not None
    keeper.stdout.close()
    if not line.startswith("ready "):
        _stop_keeper(keeper)
        raise netns.LabError(line.removeprefix("error: ") or f"lab {name} did not come up (see {log})")
    return keeper, json.loads(line[len("ready "):])


def _stop_keeper(keeper: subprocess.Popen) -> None:
    if keeper.poll() is None:
        keeper.send_signal(signal.SIGTERM)
        try:
            keeper.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            keeper.kill()
            keeper.wait()


def down(name: str) -> bool:
    """Take lab `name` down; False if there was nothing to take down.

    The keeper stops its agents and the janitor deletes the namespaces; if
    either is gone (killed), this does their work from the state file.
    """
    record = state.load(name)
    if record is None and not any(netns.exists(ns) for ns in state.namespaces(name)):
        return False
    record = record or {"namespaces": state.namespaces(name)}
    keeper = (record.get("keeper_pid", 0), record.get("keeper_start", 0))
    janitor = (record.get("janitor_pid", 0), record.get("janitor_start", 0))
    if same_process(*keeper):
        os.kill(keeper[0], signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT
    while (same_process(*keeper) or same_process(*janitor)) and time.monotonic() < deadline:
        time.sleep(0.05)
    netns.teardown(record["namespaces"])
    state.remove(name)
    return True


def unique_name(prefix: str = "t") -> str:
    """A lab name no other lab on this machine uses (tests and benches run in parallel)."""
    return f"{prefix}{os.getpid() % 100000}-{secrets.token_hex(3)}"


class Lab:
    """A lab for the length of a `with` block: endpoints as attributes, everything gone afterwards."""

    def __init__(self, spec: LinkSpec, *, name: str | None = None, zstd_level: int = 1,
                 log: str | None = None) -> None:
        self.spec = spec
        self.name = name or unique_name()
        self.keeper, self.record = up(self.name, spec, zstd_level=zstd_level, log=log, detach=False)
        self.source: str = self.record["source"]                    # control endpoint, from this namespace
        self.dest: str = self.record["dest"]
        self.source_endpoint: str = self.record["source_endpoint"]  # the source as the destination reaches it

    def stop(self) -> None:
        """Stop the keeper; it returns once its janitor has removed everything."""
        _stop_keeper(self.keeper)
        down(self.name)  # a no-op unless the keeper was killed before its janitor finished

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def status(name: str) -> dict | None:
    """The state record of lab `name` with liveness and link counters; None if unknown."""
    record = state.load(name)
    if record is None:
        return None
    record["keeper_alive"] = same_process(record["keeper_pid"], record["keeper_start"])
    running = {p for ns in record["namespaces"] for p in netns.pids(ns)}
    record["agents_alive"] = {role: record.get(f"{role}_pid") in running for role in ("source", "dest")}
    record["link_stats"] = {ns: qdisc_stats(ns) for ns in record["namespaces"] if netns.exists(ns)}
    return record


def qdisc_stats(ns: str) -> dict:
    """Bytes, packets and drops the veth end has sent (tc -s), for `lab status`."""
    out = subprocess.run(["tc", "-j", "-s", "-n", ns, "qdisc", "show", "dev", netns.DEV],
                         capture_output=True, text=True).stdout
    try:
        q = json.loads(out)[0]
    except (ValueError, IndexError):
        return {}
    return {"qdisc": q.get("kind"), "bytes": q.get("bytes", 0), "packets": q.get("packets", 0),
            "drops": q.get("drops", 0)}
