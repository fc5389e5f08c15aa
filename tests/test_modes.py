"""The three migration modes end to end: postcopy, hybrid, precopy.

Real agents, runners, write tracking, userfaultfd and gRPC. The oracle is
the same as for post-copy: a migrated guest ends with the memory of the same
guest never migrated (RunOptions(verify=True)). No assertion depends on
timing: the switch policy may take any path, every path must be correct.
"""
from __future__ import annotations

import mmap

import pytest
from test_cli import assert_clean_error, run_cli
from test_migration import abandon, launch, memfd_bytes, migrate_at

from migrate import convergence, orchestrator
from migrate.dest import incoming
from migrate.dest.incoming import watch_delay
from migrate.names import Mode, Phase
from migrate.proto import migrate_pb2 as pb

MiB = 1 << 20
MODES = list(Mode)
WRITE_HEAVY = ["seq-write", "random-write", "hotset", "zipf"]


def spec(workload: str, *, size: int = 8 * MiB, ops: int = 120_000, rate: float = 100_000) -> pb.GuestSpec:
    return pb.GuestSpec(size=size, workload=workload, seed=11, ops=ops, threads=2, ops_per_sec=rate,
                        page_size=mmap.PAGESIZE)


@pytest.mark.parametrize("workload", WRITE_HEAVY)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_workload_at_two_moments(agents, plane, mode, workload):
    for i, fraction in enumerate((0.2, 0.7)):
        doc = migrate_at(agents, f"{mode}-{workload}-{i}", spec(workload), fraction, mode=mode, timeout=120,
                         data_plane=plane)
        assert doc["verified"] is True, (mode, workload, fraction)
        assert doc["mode"] == mode
        p, pre = doc["pages"], doc["precopy"]
        assert p["received"] == p["total"] == 8 * MiB // mmap.PAGESIZE
        assert p["before_resume"] + p["pushed"] + p["faulted"] + p["recovered"] == p["total"], p
        if mode == "postcopy":
            assert pre["rounds"] == [] and p["precopied"] == 0
        else:
            assert pre["rounds"][0]["sent"] == p["total"]  # the first round sends everything
            assert pre["bytes"] > 0 and pre["switch_reason"]
        if mode == "precopy":  # no userfaultfd on the destination: nothing after the switch
            assert p["faulted"] == p["pushed"] == 0 and doc["faults"]["count"] == 0
        assert set(doc["downtime_parts"]) == {"pause", "final_scan", "state_transfer", "final_copy", "discard",
                                              "resume"}
        stamps = pre["stamps"]  # every step of the run, each timed once
        assert {"prepare_outgoing", "prepare_incoming", "precopy", "switch", "postcopy", "finish"} <= set(stamps)
        assert all(v >= 0 for v in stamps.values()), stamps


@pytest.mark.parametrize("mode", ["hybrid", "precopy"])
def test_pages_written_after_precopy_are_never_seen_stale(agents, plane, mode):
    """seq-write without wrapping: every page written between its pre-copy and
    the switch is written once, never again, so a stale copy would survive to
    the final digest. Fails if the destination does not discard."""
    pages = 8 * MiB // mmap.PAGESIZE
    doc = migrate_at(agents, f"stale-{mode}", spec("seq-write", ops=pages - 100, rate=2_000), 0.6, mode=mode,
                     timeout=120, data_plane=plane)
    pre = doc["precopy"]
    rewritten = pre["switch_discarded"] + sum(s["discarded"] for s in pre["settle"]) + \
        pre.get("final_copy", {}).get("discarded", 0) + sum(r["discarded"] for r in pre["rounds"])
    assert rewritten > 0
    assert doc["verified"] is True


@pytest.mark.parametrize("mode", ["precopy", "hybrid"])
def test_guest_dirtying_faster_than_the_link_still_switches(agents, plane, mode):
    doc = migrate_at(agents, f"fast-{mode}", spec("random-write", ops=300_000), 0.0, mode=mode,
                     max_bandwidth=4 * MiB, precopy_rounds=10, timeout=120, data_plane=plane)
    pre = doc["precopy"]
    assert doc["verified"] is True
    assert 1 <= len(pre["rounds"]) <= 10 and pre["switch_reason"]


def test_precopy_time_limit_cuts_a_round_short(agents, plane):
    doc = migrate_at(agents, "capped", spec("random-write", ops=200_000), 0.0, mode="precopy",
                     max_bandwidth=8 * MiB, precopy_seconds=0.2, timeout=120, data_plane=plane)
    pre = doc["precopy"]
    assert doc["verified"] is True
    assert pre["final_copy"]["sent"] > 0  # what the cut round left is copied at the switch


def test_switch_policy():
    limits = convergence.Limits(rounds=4, seconds=0, max_downtime_ms=10)
    first = convergence.Round(sent=10_000, discarded=0, seconds=1.0, bytes_wire=0, dirty=5_000, dirty_window_s=1.0)
    assert convergence.switch_reason([first], 1.0, limits) is None
    fits = convergence.Round(sent=5_000, discarded=5_000, seconds=0.5, bytes_wire=0, dirty=90, dirty_window_s=0.5)
    assert "fits" in convergence.switch_reason([first, fits], 1.5, limits)  # 10k pages/s * 10 ms = 100 pages
    flat = convergence.Round(sent=5_000, discarded=5_000, seconds=0.5, bytes_wire=0, dirty=4_800, dirty_window_s=0.5)
    assert "stopped shrinking" in convergence.switch_reason([first, flat], 1.5, limits)
    everything = convergence.Round(sent=10_000, discarded=0, seconds=1.0, bytes_wire=0, dirty=9_500,
                                   dirty_window_s=1.0)
    assert "stopped shrinking" in convergence.switch_reason([everything], 1.0, limits)
    shrinking = [convergence.Round(sent=10_000 >> i, discarded=0, seconds=1.0, bytes_wire=0, dirty=5_000 >> i,
                                   dirty_window_s=1.0) for i in range(4)]
    assert "round limit" in convergence.switch_reason(shrinking, 4.0, limits)
    timed = convergence.Limits(rounds=10, seconds=0.5, max_downtime_ms=10)
    assert "time limit" in convergence.switch_reason([first], 1.0, timed)
    halved = convergence.Round(sent=5_000, discarded=5_000, seconds=0.5, bytes_wire=0, dirty=3_000,
                               dirty_window_s=0.5)
    assert convergence.switch_reason([first, halved], 1.5, limits) is None
    hybrid = convergence.Limits(rounds=4, seconds=0, max_downtime_ms=10, shrink=convergence.HYBRID_SHRINK)
    assert "stopped shrinking" in convergence.switch_reason([first, halved], 1.5, hybrid)


def test_hybrid_stops_rounds_that_do_not_halve_the_dirty_set():
    assert orchestrator.RunOptions(mode="hybrid").limits().shrink == convergence.HYBRID_SHRINK
    assert orchestrator.RunOptions(mode="precopy").limits().shrink == convergence.SHRINK


def test_a_run_hears_of_its_end_at_once_and_asks_a_few_times_a_second(monkeypatch):
    """Polling every 0.25 s left each run waiting ~0.1 s after its last page (a drain of 256 MiB runs lost
    a third of its time); polling fast instead costs a call on both ends per poll, per run.

    A 4 s run on a fake clock, the destination answering each wait when the run ends or after wait_s:
    the run is over the moment the destination says so, after one call per POLL_EVERY at most.
    """
    now = [0.0]
    total, seconds = 100_000, 4.0
    monkeypatch.setattr(orchestrator.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(orchestrator.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))

    class Dest:
        calls = 0

        def call(self, method: str, request: pb.WaitIncomingRequest) -> pb.MigrationStatus:
            assert method == "WaitIncoming" and request.run_id == "r" and request.wait_s == orchestrator.POLL_EVERY
            Dest.calls += 1
            now[0] = min(now[0] + request.wait_s, seconds)
            got = min(int(total * now[0] / seconds), total)
            return pb.MigrationStatus(phase=Phase.COMPLETE if got == total else Phase.RUNNING, pages_total=total,
                                      pages_received=got)

    status = orchestrator._wait_complete(Dest(), "g", pb.RunRef(run_id="r"), orchestrator.RunOptions(), None)
    assert status.pages_received == total and now[0] == seconds
    assert Dest.calls <= seconds / orchestrator.POLL_EVERY + 1, Dest.calls


def test_the_destination_looks_for_its_last_page_when_it_is_due():
    """Looking every _WATCH_EVERY alone made each run complete half a period after its last page on average."""
    assert watch_delay(1000, 0, 0.02) == incoming._WATCH_EVERY  # nothing moves
    assert watch_delay(1000, 100, 0.02) == incoming._WATCH_EVERY  # 0.2 s to go
    assert watch_delay(500, 1000, 0.02) == pytest.approx(0.01)  # due in half a period
    assert watch_delay(500, 1000, 0.002) == incoming._WATCH_MIN  # due in 1 ms
    assert watch_delay(1, 1000, 0.02) == incoming._WATCH_MIN
    assert watch_delay(0, 10, 0.02) == incoming._WATCH_MIN  # every page here: the look after this completes


def test_cli_rejects_bad_mode_options():
    out = run_cli("run", "g", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--mode", "stop-and-pray")
    assert_clean_error(out, "--mode")
    out = run_cli("run", "g", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--mode", "precopy", "--no-push")
    assert_clean_error(out, "--no-push")


def test_cli_refuses_the_native_fault_path_without_the_native_plane():
    out = run_cli("run", "g", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--data-plane", "grpc",
                  "--fault-path", "native")
    assert_clean_error(out, "--fault-path native needs the native data plane")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("mode", MODES)
def test_a_ballooning_guest_ends_with_the_memory_of_one_never_migrated(agents, plane, mode):
    """balloon discards ranges (MADV_REMOVE) and writes to them again while it runs.
    On the source, a page pre-copied, then discarded and not written again is no write to
    PAGEMAP_SCAN: the runner reports the discard, so the page is dirty and the destination
    ends with its zeros, not the bytes the round sent. On the destination (post-copy and
    hybrid) the REMOVE events are handled: a discarded page reads zero, is never fetched again."""
    # few ops for 2048 pages: a page discarded after its pre-copy is seldom written again; slow enough
    # that seconds of them (hundreds of discards) are left for the destination after even a slow pre-copy,
    # and the push paced so that the destination's post-copy (its registered range, where a discard is a
    # REMOVE event) lasts a while: unpaced, a hybrid's last pages came within milliseconds of the resume
    doc = migrate_at(agents, f"balloon-{mode}", spec("balloon", ops=12_000, rate=2_000), 0.3, mode=mode, timeout=120,
                     data_plane=plane, max_bandwidth=4 << 20)
    assert doc["verified"] is True, doc
    assert doc["pages"]["received"] == doc["pages"]["total"]
    if mode != "precopy":  # the guest runs here while its pages arrive
        assert doc["events"]["remove"] > 0 and doc["events"]["removed_pages"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_an_idle_guests_downtime_is_the_sum_of_its_parts(agents, mode):
    """No guest operation across the switch: the report adds up the parts the agents timed (issue 11, item 7),
    and every progress sample has a real timestamp (none before the run began)."""
    doc = migrate_at(agents, f"idle-{mode}", pb.GuestSpec(size=8 * MiB, workload="idle", seed=1, ops=0,
                                                          page_size=mmap.PAGESIZE), 0.0, mode=mode, timeout=120)
    assert doc["verified"] is True
    assert doc["downtime_ms"] == pytest.approx(sum(doc["downtime_parts"].values()), abs=0.01)
    assert all(p["t_s"] >= -60 for p in doc["guest"]["progress"]), doc["guest"]["progress"]


def test_hybrid_pushes_a_hot_set_written_to_the_end_first(agents, plane):
    """A hotset guest writing fast until the switch (the issue's case, small): pre-copy leaves its hot
    pages stale, the destination pushes them first after the switch, and the memory is right."""
    doc = migrate_at(agents, "hot-hybrid", spec("hotset", size=32 * MiB, ops=400_000, rate=200_000), 0.3,
                     mode="hybrid", timeout=120, data_plane=plane)
    p, pre = doc["pages"], doc["precopy"]
    assert doc["verified"] is True
    assert pre["rounds"][0]["sent"] == p["total"] and pre["switch_reason"]
    assert p["before_resume"] + p["pushed"] + p["faulted"] + p["recovered"] == p["total"], p


@pytest.mark.parametrize("mode", [Mode.PRECOPY, Mode.HYBRID])
def test_precopied_zero_pages_stay_holes(agents, plane, mode):
    """Pre-copy writes a batch's data runs into the destination's memfd and leaves its zero runs
    holes (punched when a later round may find a stale copy there): an all-zero guest's RAM takes no
    memory on the destination. (The gRPC plane wrote them as zeros.)"""
    src, dst = agents
    s = pb.GuestSpec(size=32 * MiB, workload="idle", seed=11, ops=0, threads=1, page_size=mmap.PAGESIZE,
                     content="zero")
    launch(src.address, "blank", s)
    try:
        doc = orchestrator.migrate("blank", src.address, dst.address,
                                   orchestrator.RunOptions(mode=mode, data_plane=plane))
        assert doc["pages"]["received"] == doc["pages"]["total"]
        assert doc["precopy"]["rounds"], doc["precopy"]
        assert memfd_bytes(dst.pid, "blank") <= 1 * MiB
    finally:
        abandon(agents, "blank")
