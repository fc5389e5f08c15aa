"""One baseline run and one migrated run of a cell, each returning a JSON-able record.

The baseline is the same guest never migrated, on the source agent: its
digest checks the migrated guest's memory (as `migrate run --verify` does)
and its progress is the throughput the migrated guest is compared with.
"""
from __future__ import annotations

import dataclasses
import mmap
import time

from migrate import orchestrator
from migrate.bench.hosts import Hosts
from migrate.bench.matrix import Cell, Matrix
from migrate.client import AgentClient
from migrate.errors import AgentError, TimedOut
from migrate.names import Mode
from migrate.proto import migrate_pb2 as pb

_FINISH_TIMEOUT = 1800.0


def mode_supported(mode: str) -> bool:
    """Whether this build's orchestrator takes a mode (issue 3); post-copy always works."""
    return mode == Mode.POSTCOPY or "mode" in {f.name for f in dataclasses.fields(orchestrator.RunOptions)}


def run_options(mode: str, source_endpoint: str, plane: str = "") -> orchestrator.RunOptions:
    """Options for one migrated run (`plane` "": the default data plane)."""
    opts = orchestrator.RunOptions(source_endpoint=source_endpoint, data_plane=plane)
    if "mode" in {f.name for f in dataclasses.fields(orchestrator.RunOptions)}:
        opts.mode = mode
    return opts


def guest_spec(cell: Cell, m: Matrix) -> pb.GuestSpec:
    return pb.GuestSpec(size=cell.size, workload=cell.workload, seed=42, ops=m.ops, threads=m.threads,
                        ops_per_sec=m.ops_per_sec, page_size=mmap.PAGESIZE, content=m.content)


def _progress(info: pb.GuestInfo, t0_ns: int) -> list[dict]:
    return [{"t_s": round((p.t_ns - t0_ns) / 1e9, 4), "ops": p.ops} for p in info.progress]


def _wait(agent: AgentClient, name: str, done, what: str, timeout: float = _FINISH_TIMEOUT) -> pb.GuestInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = agent.call("InspectGuest", pb.GuestRef(name=name))
        if done(info):
            return info
        if time.monotonic() > deadline:
            raise TimedOut(f"guest {name!r} did not {what} within {timeout:g} s")
        time.sleep(0.05)


def _ops_per_s(progress: list[dict]) -> float:
    if len(progress) < 2 or progress[-1]["t_s"] <= progress[0]["t_s"]:
        return 0.0
    return (progress[-1]["ops"] - progress[0]["ops"]) / (progress[-1]["t_s"] - progress[0]["t_s"])


def baseline(h: Hosts, cell: Cell, m: Matrix, name: str) -> dict:
    """Run the cell's guest to the end without migrating it."""
    with AgentClient(h.source) as src:
        t0 = time.time_ns()
        src.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=guest_spec(cell, m)), timeout=600)
        try:
            info = _wait(src, name, lambda i: i.finished, "finish")
            wall_s = (time.time_ns() - t0) / 1e9
            digest = src.call("GuestDigest", pb.GuestRef(name=name), timeout=600).digest
        finally:
            src.call("StopGuest", pb.GuestRef(name=name))
    progress = _progress(info, t0)
    return {"wall_s": round(wall_s, 3), "ops_per_s": round(_ops_per_s(progress), 1), "progress": progress,
            "digest": digest}


def migrated(h: Hosts, cell: Cell, m: Matrix, name: str, reference_digest: str) -> dict:
    """Launch, migrate once switch_at of the work is done, let it finish, compare with the baseline."""
    with AgentClient(h.source) as src, AgentClient(h.dest) as dst:
        t0 = time.time_ns()
        src.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=guest_spec(cell, m)), timeout=600)
        try:
            _wait(src, name, lambda i: i.ops_done >= m.switch_at * m.ops or i.finished, "make progress")
            launch_offset = (time.time_ns() - t0) / 1e9
            doc = orchestrator.migrate(name, h.source, h.dest, run_options(cell.mode, h.source_endpoint, cell.plane))
            _wait(dst, name, lambda i: i.finished, "finish")
            verified = dst.call("GuestDigest", pb.GuestRef(name=name), timeout=600).digest == reference_digest
        finally:
            for agent in (dst, src):
                try:
                    agent.call("StopGuest", pb.GuestRef(name=name))
                except AgentError:
                    pass  # not (or no longer) there
    doc.update(verified=verified, launch_offset_s=round(launch_offset, 4))
    return doc
