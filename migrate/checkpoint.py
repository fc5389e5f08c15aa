"""`migrate snapshot` and `migrate restore`: checkpoint a running guest, resume it elsewhere.

A snapshot is taken by the guest's source agent (StartSnapshot, then
SnapshotStatus until complete: migrate.source.snapshot); pages never pass
through here. A restore has the source agent serve the snapshot as an image
guest that carries its execution state (LoadSnapshot), and moves it to the
destination in post-copy with the orchestrator's ordinary run: the guest
resumes there at once and faults its memory in from the image.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from migrate import orchestrator
from migrate.client import AgentClient
from migrate.errors import AgentError, TimedOut
from migrate.names import Mode, Phase
from migrate.proto import migrate_pb2 as pb
from migrate.security import Credentials
from migrate.units import MiB

#: Seconds between two status polls of a snapshot.
POLL_EVERY = 0.1


class SnapshotFailed(AgentError):
    """The agent could not save the guest (the guest runs on; no file is left)."""


def take(name: str, agent: str, file: str, *, on_progress: Callable[[pb.SnapshotProgress], None] | None = None,
         timeout: float = 3600.0, credentials: Credentials | None = None) -> dict:
    """Snapshot guest `name` on `agent` into `file` (in the agent's --snapshot-dir); return the report."""
    t0 = time.monotonic()
    with AgentClient(agent, credentials=credentials) as client:
        p = client.call("StartSnapshot", pb.SnapshotRequest(name=name, file=file), timeout=120)
        deadline = t0 + timeout
        while p.phase == Phase.RUNNING:
            if on_progress:
                on_progress(p)
            if time.monotonic() > deadline:
                raise TimedOut(f"snapshot {file} did not complete within {timeout:g} s")
            time.sleep(POLL_EVERY)
            p = client.call("SnapshotStatus", pb.SnapshotRequest(file=file))
    if on_progress:
        on_progress(p)
    if p.phase != Phase.COMPLETE:
        raise SnapshotFailed(f"snapshot {file} of {name} failed: {p.error}")
    return report(p, agent, time.monotonic() - t0)


def report(p: pb.SnapshotProgress, agent: str, total_s: float) -> dict:
    """The snapshot's report: what the guest paid (downtime, blocked time, pace) and what was saved."""
    during = (p.ops_now - p.ops_at_snapshot) / p.elapsed_s if p.elapsed_s > 0 else 0.0
    return {
        "kind": "snapshot", "guest": p.guest, "file": p.file, "agent": agent,
        "total_s": round(total_s, 4), "save_s": round(p.elapsed_s, 4),
        "downtime_ms": round(p.downtime_ms, 3),
        "pages": p.pages_total, "bytes": p.bytes_written,
        "mib_s": round(p.bytes_written / MiB / p.elapsed_s, 1) if p.elapsed_s > 0 else 0.0,
        "pages_streamed": p.pages_streamed, "pages_faulted": p.pages_faulted,
        "wp_faults": p.wp_faults, "faults_waited_for_stream": p.waited,
        "guest_blocked_ms": round(p.blocked_ms, 3), "max_fault_blocked_ms": round(p.max_blocked_ms, 3),
        "ops_at_snapshot": p.ops_at_snapshot, "ops_after": p.ops_now,
        "guest_ops_per_s_during": round(during, 1), "guest_ops_per_s_before": round(p.ops_per_s_before, 1),
    }


def table(doc: dict) -> str:
    rows = [("snapshot", f"{doc['guest']} -> {doc['file']} on {doc['agent']}"),
            ("total", f"{doc['total_s']:.3f} s (saving {doc['save_s']:.3f} s, {doc['mib_s']:.1f} MiB/s)"),
            ("downtime", f"{doc['downtime_ms']:.3f} ms"),
            ("pages", f"{doc['pages']} ({doc['pages_streamed']} streamed, {doc['pages_faulted']} saved on a "
                      f"write fault)"),
            ("WP faults", f"{doc['wp_faults']} ({doc['faults_waited_for_stream']} waited for the stream's copy)"),
            ("guest blocked", f"{doc['guest_blocked_ms']:.3f} ms in all, {doc['max_fault_blocked_ms']:.3f} ms at most"),
            ("guest pace", f"{doc['guest_ops_per_s_during']:,.0f} ops/s during, "
                           f"{doc['guest_ops_per_s_before']:,.0f} before"),
            ("state at", f"{doc['ops_at_snapshot']} ops")]
    return "\n".join(f"{k:14} {v}" for k, v in rows)


def restore(file: str, src: str, dst: str, name: str = "", opts: orchestrator.RunOptions | None = None,
            on_status: Callable[[pb.MigrationStatus], None] | None = None,
            credentials: Credentials | None = None) -> dict:
    """Resume snapshot `file` (in `src`'s --snapshot-dir) as guest `name` on `dst`, in post-copy.

    The source serves the image while the destination runs the guest; once
    every page is there, the source drops the image guest (the file stays).
    """
    name = name or file
    opts = opts or orchestrator.RunOptions()
    opts.mode = Mode.POSTCOPY  # a snapshot does not run on the source: nothing to pre-copy
    with AgentClient(src, credentials=credentials) as client:
        client.call("LoadSnapshot", pb.LoadSnapshotRequest(name=name, file=file), timeout=120)
    doc = orchestrator.migrate(name, src, dst, opts, on_status=on_status, credentials=credentials)
    with AgentClient(src, credentials=credentials) as client:
        client.call("StopGuest", pb.GuestRef(name=name))
    doc["restored_from"] = file
    return doc
