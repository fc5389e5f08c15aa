"""`migrate demo`: the whole story on one machine, checked end to end."""
from __future__ import annotations

import mmap
import tempfile
import time
from collections.abc import Callable

from migrate import orchestrator
from migrate.client import AgentClient
from migrate.errors import KernelFeatureMissing, TimedOut
from migrate.local import LocalAgent
from migrate.names import GuestKind
from migrate.proto import migrate_pb2 as pb

#: The guest's pace: it runs for about RUN_SECONDS when left alone.
OPS_PER_SEC = 400_000
RUN_SECONDS = 5.0
#: Migrate once the guest has done this fraction of its work.
SWITCH_AT = 0.25


#: A kvm guest runs unthrottled: this many ops keep it busy for a few seconds.
KVM_OPS = 100_000_000


def run_demo(*, size: int, workload: str, threads: int, opts: orchestrator.RunOptions,
             on_status: Callable[[pb.MigrationStatus], None], say: Callable[[str], None],
             kind: str = GuestKind.SYNTHETIC) -> dict:
    """Start two agents and a guest, migrate it mid-run as `opts` say, verify, return the report."""
    kvm = kind == GuestKind.KVM
    if kvm:
        from migrate.guest.kvm import kvm_problem
        if why := kvm_problem():
            raise KernelFeatureMissing(why)
    ops = KVM_OPS if kvm else int(OPS_PER_SEC * RUN_SECONDS)
    spec = pb.GuestSpec(size=size, workload=workload, seed=42, ops=ops, threads=threads,
                        ops_per_sec=0 if kvm else OPS_PER_SEC, page_size=mmap.PAGESIZE, kind=kind)
    with tempfile.TemporaryDirectory(prefix="migrate-demo-") as tmp:
        say("starting a source and a destination agent on loopback")
        with LocalAgent("source", log_path=f"{tmp}/source.log") as src, \
                LocalAgent("dest", log_path=f"{tmp}/dest.log") as dst:
            say(f"source agent {src.address} (pid {src.pid}), destination agent {dst.address} (pid {dst.pid})")
            with AgentClient(src.address) as client:
                say(f"starting guest 'demo' ({kind}): {size >> 20} MiB, {workload}, {threads} thread(s), {ops} ops")
                client.call("LaunchGuest", pb.LaunchGuestRequest(name="demo", spec=spec), timeout=600)
                _wait_progress(client, "demo", int(ops * SWITCH_AT))
            say(f"guest is {SWITCH_AT:.0%} through its work: migrating it ({opts.mode})")
            doc = orchestrator.migrate("demo", src.address, dst.address, opts, on_status=on_status)
            say("guest finished on the destination; memory compared with an unmigrated run")
    return doc


def _wait_progress(client: AgentClient, name: str, ops: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while client.call("InspectGuest", pb.GuestRef(name=name)).ops_done < ops:
        if time.monotonic() > deadline:
            raise TimedOut(f"guest {name!r} made no progress within {timeout:g} s")
        time.sleep(0.05)
