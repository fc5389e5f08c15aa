"""Recovery for the kvm guest kind (issue 13): its vCPUs wait in userfaultfd through a link cut
and through a restart of the destination agent, on both data planes, and the guest ends with
the memory of an unmigrated run of the same image (`verified`, the orchestrator's own check).

The guest is unthrottled (a VM runs at its own pace) but at 4 MiB/s its 32 MiB come over in
about 8 s while it faults on nearly every page of its random writes: it is mid-workload,
its vCPUs blocked on missing pages, when the link or the agent goes.
"""
from __future__ import annotations

import mmap

from test_kvm import needs_image, needs_kvm, wait_ops
from test_recovery import (
    POSTCOPY_OPTIONS,
    Restarter,
    migrate_breaking_the_link,
    migrate_through_a_restart,
    proxied,  # noqa: F401  (the fixture, used by name)
)

from migrate import orchestrator
from migrate.client import AgentClient
from migrate.local import LocalAgent
from migrate.proto import migrate_pb2 as pb

MiB = 1 << 20
#: Enough ops that the guest is still at work when it switches over (its vCPUs need seconds of CPU for
#: them, the migration starts within a fraction of one) and then faults through the post-copy.
KVM_SPEC = pb.GuestSpec(size=32 * MiB, workload="random-write", seed=5, ops=300_000_000, threads=2,
                        page_size=mmap.PAGESIZE, kind="kvm")

pytestmark = [needs_kvm, needs_image]


def launch_running(address: str, name: str) -> None:
    """Launch the kvm guest and wait until its workload runs (past the boot, at CPL3)."""
    with AgentClient(address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=KVM_SPEC), timeout=600)
        wait_ops(c, 1, name)


def test_link_cut_mid_postcopy_recovers_a_kvm_guest(proxied):  # noqa: F811
    proxy = proxied[2]
    doc = migrate_breaking_the_link(proxied, "vm", KVM_SPEC, orchestrator.RunOptions(**POSTCOPY_OPTIONS),
                                    lambda: proxy.cut(1.0))
    assert proxy.cuts == 1
    assert doc["guest"]["kind"] == "kvm"
    assert doc["link"]["outages"] >= 1, doc["link"]
    assert doc["pages"]["received"] == doc["pages"]["total"]
    assert doc["verified"] is True
    assert len(doc["guest"]["vcpu_blocked_ms"]) == 2 and sum(doc["guest"]["vcpu_blocked_ms"]) > 0


def test_destination_agent_restarted_mid_postcopy_finishes_a_kvm_guest(tmp_path, plane):
    """The agent dies (SIGKILL) with a fifth of the pages in; the kvm runner lives on, its vCPUs
    blocked in the userfaultfd, and the restarted agent takes it over from its journal."""
    state = str(tmp_path / "state")
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src:
        first = LocalAgent("dest", "--state-dir", state, log_path=str(tmp_path / "dst1.log"))
        restarter = None
        try:
            launch_running(src.address, "vm")
            restarter = Restarter(first, state, first.address, str(tmp_path / "dst2.log"))
            doc = migrate_through_a_restart("vm", src.address, first.address, restarter, plane)
            assert doc["guest"]["kind"] == "kvm"
            assert doc["pages"]["received"] == doc["pages"]["total"]
            assert doc["pages"]["recovered"] < doc["pages"]["total"], doc["pages"]
            assert doc["verified"] is True
            with AgentClient(restarter.second.address) as c:
                info = c.call("InspectGuest", pb.GuestRef(name="vm"))
                assert info.finished and info.guest_digest
                c.call("StopGuest", pb.GuestRef(name="vm"))
        finally:
            (restarter or first).stop()
