"""`migrate run`: drive one post-copy migration between two agents.

The orchestrator only talks Control RPCs; pages flow directly from the source
agent to the destination agent. Until the guest resumes on the destination
every failure rolls back: the guest keeps (or resumes) running on the source.
"""
from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from migrate import report
from migrate.client import AgentClient
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import AgentError

#: Seconds between two status polls of the destination.
POLL_EVERY = 0.1


@dataclass
class RunOptions:
    no_push: bool = False
    max_bandwidth: int = 0          # bytes/s of bulk traffic, 0: unlimited
    source_endpoint: str = ""       # the source as the destination reaches it (default: --from)
    verify: bool = False            # compare the final digest with an unmigrated run
    timeout: float = 3600.0


def _endpoint_with_port(endpoint: str, other: str) -> str:
    """`endpoint`'s host with `other`'s port."""
    return f"{endpoint.rsplit(':', 1)[0]}:{other.rsplit(':', 1)[1]}"


def migrate(name: str, src: str, dst: str, opts: RunOptions,
            on_status: Callable[[pb.MigrationStatus], None] | None = None,
            before_switchover: Callable[[], None] | None = None) -> dict:
    """Migrate guest `name` from agent `src` to agent `dst`; return the report.

    `before_switchover` runs once both sides are prepared, just before the
    guest pauses: experiments use it to switch at a precise moment.
    """
    with AgentClient(src) as source, AgentClient(dst) as dest:
        if "source" not in source.call("Hello", pb.HelloRequest()).roles:
            raise AgentError(f"agent at {src} is not a source agent")
        if "dest" not in dest.call("Hello", pb.HelloRequest()).roles:
            raise AgentError(f"agent at {dst} is not a destination agent")
        t_start_ns = time.time_ns()
        t0 = time.monotonic()
        prep = source.call("PrepareOutgoing", pb.PrepareOutgoingRequest(name=name))
        run = pb.RunRef(run_id=prep.run_id)
        src_ep = opts.source_endpoint or src
        try:
            prepared = dest.call("PrepareIncoming", pb.PrepareIncomingRequest(
                run_id=prep.run_id, name=name, spec=prep.spec, source_endpoint=src_ep,
                bulk_endpoint=_endpoint_with_port(src_ep, prep.bulk_endpoint)), timeout=120)
            if before_switchover:
                before_switchover()
            switch = source.call("Switchover", run)
        except BaseException:
            _best_effort(dest.call, "AbortIncoming", run)
            source.call("AbortOutgoing", run)
            raise
        try:
            started = dest.call("StartIncoming", pb.StartIncomingRequest(
                run_id=prep.run_id, state_json=switch.state_json, no_push=opts.no_push,
                max_bandwidth=opts.max_bandwidth))
        except AgentError:
            _best_effort(dest.call, "AbortIncoming", run)
            source.call("AbortOutgoing", run)
            raise
        status = _wait_complete(dest, name, run, opts, on_status)
        total_s = time.monotonic() - t0
        before = source.call("InspectGuest", pb.GuestRef(name=name))
        src_stats = source.call("CompleteOutgoing", run)
        after = dest.call("InspectGuest", pb.GuestRef(name=name))
        verified = _verify(source, dest, name, prep.spec) if opts.verify else None
    return report.build(
        name=name, spec=prep.spec, total_s=total_s, t_start_ns=t_start_ns, switch=switch,
        prepare_ms=prepared.prepare_ms, resume_ms=started.resume_ms, status=status, source_stats=src_stats,
        before=before, after=after, verified=verified)


def _wait_complete(dest: AgentClient, name: str, run: pb.RunRef, opts: RunOptions,
                   on_status: Callable[[pb.MigrationStatus], None] | None) -> pb.MigrationStatus:
    """Poll the destination until every page is in; raise AgentError on failure.

    With --no-push only faults bring pages: once the guest has finished its
    work, the destination is asked for a digest, which touches (and so
    pulls) every page still missing.
    """
    deadline = time.monotonic() + opts.timeout
    toucher: threading.Thread | None = None
    while True:
        status = dest.call("IncomingStatus", run)
        if on_status:
            on_status(status)
        if status.phase == "complete":
            return status
        if status.phase == "failed":
            raise AgentError(f"migration failed on the destination: {status.error}")
        if time.monotonic() > deadline:
            raise AgentError(f"migration did not complete within {opts.timeout:g} s")
        if opts.no_push and toucher is None and dest.call("InspectGuest", pb.GuestRef(name=name)).finished:
            touch = functools.partial(dest.call, timeout=opts.timeout)
            toucher = threading.Thread(target=_best_effort, args=(touch, "GuestDigest", pb.GuestRef(name=name)),
                                       daemon=True)
            toucher.start()
        time.sleep(POLL_EVERY)


def _verify(source: AgentClient, dest: AgentClient, name: str, spec: pb.GuestSpec) -> bool:
    """Finish the migrated guest and compare its memory with an unmigrated run."""
    _wait_finished(dest, name)
    migrated = dest.call("GuestDigest", pb.GuestRef(name=name), timeout=600).digest
    ref_name = f"{name}-reference"
    ref_spec = pb.GuestSpec()
    ref_spec.CopyFrom(spec)
    ref_spec.ops_per_sec = 0  # the final memory does not depend on pace
    source.call("LaunchGuest", pb.LaunchGuestRequest(name=ref_name, spec=ref_spec), timeout=600)
    try:
        _wait_finished(source, ref_name)
        reference = source.call("GuestDigest", pb.GuestRef(name=ref_name), timeout=600).digest
    finally:
        _best_effort(source.call, "StopGuest", pb.GuestRef(name=ref_name))
    return migrated == reference


def _wait_finished(agent: AgentClient, name: str, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while not agent.call("InspectGuest", pb.GuestRef(name=name)).finished:
        if time.monotonic() > deadline:
            raise AgentError(f"guest {name!r} on {agent.target} did not finish within {timeout:g} s")
        time.sleep(0.1)


def _best_effort(fn: Callable, *args: object) -> None:
    try:
        fn(*args)
    except AgentError:
        pass


def write_report(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
