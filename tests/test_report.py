"""The report tells the truth about what the agents said (unit tests on report.build)."""
from migrate import report
from migrate.proto import migrate_pb2 as pb

T0 = 1_800_000_000 * 10**9


def build(switch: pb.SwitchoverReply, after: pb.GuestInfo, parts: dict | None, before: pb.GuestInfo | None = None,
          status: pb.MigrationStatus | None = None) -> dict:
    spec = pb.GuestSpec(size=4096 * 4, page_size=4096, workload="idle")
    status = status or pb.MigrationStatus(pages_total=4, pages_received=4)
    return report.build(name="g", spec=spec, total_s=1.0, t_start_ns=T0, switch=switch, prepare_ms=1.0,
                        resume_ms=0.5, status=status, source_stats=pb.SourceStats(),
                        before=before or pb.GuestInfo(), after=after, verified=None, downtime_parts=parts)


def test_downtime_without_guest_work_across_the_switch_is_the_sum_of_its_parts() -> None:
    """A precopy stop-and-copy of 888 ms with an idle guest: the downtime is 888 ms and more, not pause + resume."""
    parts = {"pause": 0.3, "final_scan": 0.2, "state_transfer": 1.0, "final_copy": 888.0, "discard": 0.1,
             "resume": 0.5}
    doc = build(pb.SwitchoverReply(pause_ms=0.3), pb.GuestInfo(), parts)
    assert doc["downtime_ms"] == round(sum(parts.values()), 3)


def test_downtime_from_the_guests_clocks_when_it_worked_across_the_switch() -> None:
    doc = build(pb.SwitchoverReply(last_op_ns=T0, pause_ms=0.3), pb.GuestInfo(first_op_ns=T0 + 2_500_000),
                {"pause": 0.3, "resume": 0.5})
    assert doc["downtime_ms"] == 2.5


def test_progress_samples_without_a_timestamp_are_left_out() -> None:
    before = pb.GuestInfo(progress=[pb.ProgressPoint(t_ns=0, ops=0), pb.ProgressPoint(t_ns=T0 + 10**8, ops=5)])
    after = pb.GuestInfo(progress=[pb.ProgressPoint(t_ns=T0 + 2 * 10**8, ops=9), pb.ProgressPoint(t_ns=0, ops=9)])
    doc = build(pb.SwitchoverReply(), after, None, before)
    assert [p["t_s"] for p in doc["guest"]["progress"]] == [0.1, 0.2]


def test_pages_recovered_at_a_restart_are_reported_and_add_up() -> None:
    """Pages a restarted destination found in RAM beyond its journal's counters are counted apart, in the table too."""
    status = pb.MigrationStatus(pages_total=4, pages_received=4, pages_pushed=1, pages_faulted=1, pages_zero=1,
                                pages_recovered=1, pages_before_resume=1)
    doc = build(pb.SwitchoverReply(), pb.GuestInfo(), None, status=status)
    p = doc["pages"]
    assert (p["recovered"], p["before_resume"]) == (1, 1)
    assert p["before_resume"] + p["pushed"] + p["faulted"] + p["recovered"] == p["total"]
    assert "1 faulted, 1 recovered at a restart, 1 zero" in report.table(doc)
    assert "recovered" not in report.table(build(pb.SwitchoverReply(), pb.GuestInfo(), None))

def test_a_kvm_guests_per_vcpu_blocked_time_is_reported() -> None:
    doc = build(pb.SwitchoverReply(), pb.GuestInfo(vcpu_blocked_ms=[1.5, 20.25]), None)
    assert doc["guest"]["vcpu_blocked_ms"] == [1.5, 20.25]
    assert "(vCPUs asleep in KVM_RUN: 1.5, 20.2 ms)" in report.table(doc)
    synthetic = build(pb.SwitchoverReply(), pb.GuestInfo(), None)
    assert synthetic["guest"]["vcpu_blocked_ms"] == [] and synthetic["guest"]["kind"] == "synthetic"
