"""`migrate drain` and what it stands on: destination capacity, bandwidth changed on the fly.

The drain tests use real agents: one source, two destinations capped with
--max-incoming-ram so that placement by free memory is deterministic
(the host's own free memory would send every guest to the first one).
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import subprocess
import threading
import time
import types

import pytest
from by_hand import resumed_on_destination

from migrate import abort, orchestrator, spawn
from migrate.client import AgentClient
from migrate.dest import bulk
from migrate.dest.capacity import Ledger, NoRoom, mem_available
from migrate.drain import Drain, Outcome, most_at_once
from migrate.local import LocalAgent, wait_for
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import AgentError

MiB = 1 << 20


def spec(size_mib: int, seed: int, ops: int = 20_000, ops_per_sec: int = 5_000) -> pb.GuestSpec:
    return pb.GuestSpec(size=size_mib * MiB, workload="random-write", seed=seed, ops=ops, threads=1,
                        ops_per_sec=ops_per_sec, page_size=mmap.PAGESIZE)


def launch(src: str, sizes: dict[str, int], ops_per_sec: int = 5_000) -> None:
    with AgentClient(src) as c:
        for i, (name, size) in enumerate(sizes.items()):
            c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec(size, i + 1, ops_per_sec=ops_per_sec)),
                   timeout=120)


def drain_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(spawn.module_argv("migrate", "drain", *args), env=spawn.child_env(), capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def guests(agent: str) -> dict[str, pb.GuestInfo]:
    with AgentClient(agent) as c:
        return {g.name: g for g in c.call("ListGuests", pb.ListGuestsRequest()).guests}


class Fake:
    """An incoming run as the ledger sees it."""

    def __init__(self, name: str, size: int, missing: int) -> None:
        self.name, self._sizes = name, (size, missing)

    def promised_bytes(self) -> tuple[int, int]:
        return self._sizes


# ---------------------------------------------------------------- units
def test_ledger_refuses_past_the_limit_and_counts_pending_runs():
    ledger = Ledger(limit=100 * MiB, headroom=0)
    runs = [Fake("a", 60 * MiB, 10 * MiB)]
    cap = ledger.report(runs)
    assert (cap.promised, cap.outstanding, cap.free, list(cap.guests)) == (60 * MiB, 10 * MiB, 40 * MiB, ["a"])
    ledger.admit("b", 40 * MiB, runs)                # fits exactly, and is held while it prepares
    with pytest.raises(NoRoom, match=r"guest 'c' \(1 MiB\).*--max-incoming-ram.*stays on the source"):
        ledger.admit("c", MiB, runs)
    ledger.settle("b")                               # prepared (now one of `runs`) or failed
    ledger.admit("c", MiB, runs)
    assert ledger.report([]).available > 0


def test_ledger_keeps_headroom_of_the_hosts_available_memory():
    ledger = Ledger(headroom=mem_available())        # nothing left to promise
    with pytest.raises(NoRoom, match="kept free"):
        ledger.admit("a", MiB, [])


def test_a_raised_bulk_rate_does_not_pay_for_the_slower_past(monkeypatch):
    """The pace counts from the change: 10 MiB received at 1 MiB/s, then no limit, must not sleep."""
    client = types.SimpleNamespace(bytes_wire=0)
    mem = types.SimpleNamespace(page_count=16, page_size=4096)
    monkeypatch.setattr(bulk, "BatchDecoder", lambda *a: None)
    puller = bulk.BulkPuller(mem, None, types.SimpleNamespace(client=client), "r", MiB)
    client.bytes_wire = 10 * MiB                     # ten seconds ahead of 1 MiB/s
    slept = []
    monkeypatch.setattr(bulk.time, "sleep", slept.append)
    puller.set_bandwidth(100 * MiB)
    puller._pace()
    assert slept == []
    puller.set_bandwidth(0)
    client.bytes_wire = 100 * MiB
    puller._pace()
    assert slept == []


def test_drain_refuses_options_that_cannot_work_in_one_line():
    out = drain_cli("--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--data-plane", "grpc", "--fault-path", "native")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "native" in out.stderr


def test_most_at_once():
    runs = [Outcome("a", 1, started=1, ended=3), Outcome("b", 1, started=2, ended=4),
            Outcome("c", 1, started=3, ended=5), Outcome("d", 1)]
    assert most_at_once(runs) == 2


# ---------------------------------------------------------- with agents
def bulk_pace(d: AgentClient, run: pb.RunRef) -> int:
    """The pace the destination's bulk path of `run` holds now (bytes/s, 0: none), as its status says."""
    return json.loads(d.call("IncomingStatus", run).detail_json)["bulk"]["max_bandwidth"]


def test_set_bandwidth_paces_a_running_bulk_path_but_never_the_faults(agents, plane):
    """On either plane: the bulk path takes each new pace at once (its status says so), and the guest's
    own faults are served while the bulk crawls at 64 KiB/s (the workload finishes, minutes before the bulk)."""
    src, dst = agents
    with AgentClient(src.address) as s, AgentClient(dst.address) as d:
        # 500 writes touch at most 500 of the 1024 aligned 16-page blocks: the faults alone never fetch it all
        s.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=spec(64, 1, ops=500)), timeout=120)
        run = resumed_on_destination(s, d, "vm", 64 * 1024, data_plane=plane)  # 64 MiB at 64 KiB/s: 17 minutes
        try:
            assert d.call("IncomingStatus", run).data_plane == plane
            assert bulk_pace(d, run) == 64 * 1024
            d.call("SetBandwidth", pb.SetBandwidthRequest(run_id=run.run_id, max_bandwidth=32 * 1024))
            assert bulk_pace(d, run) == 32 * 1024
            assert wait_for(lambda: guests(dst.address)["vm"].state == "finished", timeout=60)
            st = d.call("IncomingStatus", run)
            assert st.phase == "running" and st.pages_received < st.pages_total
            d.call("SetBandwidth", pb.SetBandwidthRequest(run_id=run.run_id, max_bandwidth=0))
            assert bulk_pace(d, run) == 0
            assert wait_for(lambda: d.call("IncomingStatus", run).phase == "complete", timeout=120)
            with pytest.raises(AgentError, match="complete"):
                d.call("SetBandwidth", pb.SetBandwidthRequest(run_id=run.run_id, max_bandwidth=MiB))
            with pytest.raises(AgentError, match="no incoming migration"):
                d.call("SetBandwidth", pb.SetBandwidthRequest(run_id="0" * 32, max_bandwidth=MiB))
        finally:  # failed half-way or not: let the run complete, then end the guest
            with contextlib.suppress(AgentError):
                d.call("SetBandwidth", pb.SetBandwidthRequest(run_id=run.run_id, max_bandwidth=0))
            wait_for(lambda: d.call("IncomingStatus", run).phase != "running", timeout=120)
            s.call("CompleteOutgoing", run)
            d.stop_if_hosted("vm")
            s.stop_if_hosted("vm")


def test_drain_bandwidth_is_shared_by_the_active_runs_and_handed_on(tmp_path, plane):
    """--max-bandwidth of a drain on either plane: two active runs hold half each (their destination's status
    says so), the run left holds it all once the other completed. The total is then lifted so the test ends."""
    total = 2 * MiB
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", log_path=str(tmp_path / "dst.log")) as dst:
        with AgentClient(src.address) as c:  # big goes first and alone; small (1 MiB/s: 4 s) ends long before it
            for i, (name, size) in enumerate({"big": 32, "small": 4}.items()):
                c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec(size, i + 1, ops=200)), timeout=120)
        halves, whole = set(), []

        def watch(drain: Drain) -> None:
            active = drain.active_runs()
            for o in active:
                if o.status is None or o.status.phase != "running":
                    continue
                pace = json.loads(o.status.detail_json)["bulk"]["max_bandwidth"]
                if len(active) == 2 and pace == total // 2:
                    halves.add(o.name)
                if o.name == "big" and len(active) == 1 and halves == {"big", "small"} and pace == total:
                    whole.append(pace)
                    drain.max_bandwidth = 1 << 30  # seen: let it finish

        outcomes = Drain(src.address, [dst.address], orchestrator.RunOptions(mode="postcopy", data_plane=plane),
                         parallel=2, max_bandwidth=total, on_tick=watch).run()
        assert all(o.moved for o in outcomes), [o.error for o in outcomes]
        assert halves == {"big", "small"} and whole
        assert [o.report["data_plane"] for o in outcomes] == [plane, plane]
        for name in ("big", "small"):
            with AgentClient(dst.address) as d:
                d.stop_if_hosted(name)


def test_destination_refuses_a_run_it_cannot_hold_before_the_switchover(tmp_path):
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--max-incoming-ram", "8M", log_path=str(tmp_path / "dst.log")) as dst:
        launch(src.address, {"vm": 16})
        with AgentClient(dst.address) as d:
            cap = d.call("Capacity", pb.CapacityRequest())
            assert cap.limit == 8 * MiB and cap.free == 8 * MiB and cap.available > 0
        with pytest.raises(orchestrator.RunFailed, match="not enough memory here for guest 'vm'") as failed:
            orchestrator.migrate("vm", src.address, dst.address, orchestrator.RunOptions(mode="postcopy"))
        assert "runs on" in failed.value.next_step
        info = guests(src.address)["vm"]
        assert info.state in ("running", "finished") and not info.run_id
        assert "vm" not in guests(dst.address)


def test_drain_four_guests_two_at_a_time_to_two_destinations(tmp_path, plane):
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--max-incoming-ram", "100M", log_path=str(tmp_path / "d1.log")) as d1, \
            LocalAgent("dest", "--max-incoming-ram", "100M", log_path=str(tmp_path / "d2.log")) as d2:
        names = {"g1": 32, "g2": 32, "g3": 40, "g4": 48}
        launch(src.address, names)
        seen, done = [], threading.Event()

        def watch() -> None:  # the source's own word on how many guests are being migrated
            while not done.is_set():
                seen.append(sum(bool(g.run_id) for g in guests(src.address).values()))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            out = drain_cli("--from", src.address, "--to", d1.address, "--to", d2.address, "--parallel", "2",
                            "--mode", "postcopy", "--data-plane", plane, "--max-bandwidth", "48M", "--verify",
                            "--report-dir", str(tmp_path / "reports"))
        finally:
            done.set()
            watcher.join()
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
        assert max(seen) <= 2
        summary = json.loads((tmp_path / "reports" / "drain.json").read_text())
        rows = {r["guest"]: r for r in summary["guests"]}
        assert set(rows) == set(names) and all(r["moved"] and r["verified"] for r in rows.values())
        assert most_at_once([Outcome(r["guest"], 0, started=r["started_s"], ended=r["ended_s"])
                             for r in rows.values()]) <= 2
        assert {r["destination"] for r in rows.values()} == {d1.address, d2.address}
        for name, r in rows.items():
            assert f"{name} " in out.stdout and r["destination"] in out.stdout
            assert name in guests(r["destination"])
            report = json.loads((tmp_path / "reports" / f"{name}.json").read_text())
            assert report["verified"] is True and report["data_plane"] == plane
        assert not guests(src.address)


def test_drain_past_the_agents_call_slots_retries_what_they_refused(tmp_path):
    """--parallel 8 against agents that serve 4 slow calls per peer at once: the prepares past 4 are refused
    (RESOURCE_EXHAUSTED), roll back, and go again with fewer runs at once; every guest moves."""
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", log_path=str(tmp_path / "dst.log")) as dst:
        names = {f"g{i}": 8 for i in range(8)}
        launch(src.address, names)
        outcomes = Drain(src.address, [dst.address], orchestrator.RunOptions(mode="postcopy"), parallel=8).run()
        assert [o.name for o in outcomes if not o.moved] == [], [o.error for o in outcomes]
        assert sorted(o.name for o in outcomes) == sorted(names) and set(guests(dst.address)) == set(names)
        assert not guests(src.address)
        with AgentClient(dst.address) as d:
            for name in names:
                d.stop_if_hosted(name)


def test_drain_leaves_a_guest_that_fits_nowhere_running_on_the_source(tmp_path, plane):
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--max-incoming-ram", "40M", log_path=str(tmp_path / "d1.log")) as d1:
        launch(src.address, {"big": 64, "s1": 16, "s2": 16})
        out = drain_cli("--from", src.address, "--to", d1.address, "--mode", "postcopy", "--data-plane", plane)
        assert out.returncode == 1
        assert "Traceback" not in out.stderr
        error = out.stderr.strip().splitlines()[-1]
        assert "1 of 3 guest(s) not moved: big (fits on no destination (needs 64 MiB" in error, out.stderr
        assert set(guests(d1.address)) == {"s1", "s2"}
        left = guests(src.address)
        assert set(left) == {"big"} and left["big"].state in ("running", "finished") and not left["big"].run_id
        assert "not moved" in out.stdout


def test_destination_killed_during_a_drain_fails_its_run_alone(tmp_path, plane):
    """The killed destination's run fails as a single run does (the guest waits, paused, on the source,
    and the summary says how to resume it); the other runs complete, on the destination still alive."""
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--max-incoming-ram", "64M", log_path=str(tmp_path / "d1.log")) as d1:
        d2 = LocalAgent("dest", "--max-incoming-ram", "64M", log_path=str(tmp_path / "d2.log"))
        victim: list[str] = []
        try:
            # Guests slow enough that their faults (never paced) take seconds to bring every page: a run
            # to d2 is seen past a fifth, at a status poll, well before it could complete.
            launch(src.address, {"g1": 16, "g2": 16, "g3": 16, "g4": 16}, ops_per_sec=500)

            def kill_when_underway(drain: Drain) -> None:
                for o in drain.active_runs():
                    st = o.status
                    if o.dest == d2.address and st is not None and st.pages_received > st.pages_total // 5 \
                            and d2.proc.poll() is None:
                        victim.append(o.name)
                        os.kill(d2.pid, signal.SIGKILL)  # no --state-dir: its runner dies with it

            opts = orchestrator.RunOptions(mode="postcopy", recovery_timeout=1.0, data_plane=plane)
            outcomes = Drain(src.address, [d1.address, d2.address], opts, parallel=2, max_bandwidth=8 * MiB,
                             on_tick=kill_when_underway).run()
            assert len(victim) == 1
            by_name = {o.name: o for o in outcomes}
            lost = by_name[victim[0]]
            assert not lost.moved and "abort" in lost.next_step and "not resumed on the source" in lost.error
            assert guests(src.address)[lost.name].state == "migrating-out"
            moved = [o for o in outcomes if o.moved]
            assert len(moved) == 3 and all(o.dest == d1.address for o in moved)
            assert set(guests(d1.address)) == {o.name for o in moved}
        finally:
            d2.stop()
            for name in victim:
                abort.abort(name, src.address, d2.address, force=True)
                with AgentClient(src.address) as c:
                    c.stop_if_hosted(name)
