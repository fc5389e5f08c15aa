"""Link failure mid-post-copy: the destination reconnects and loses nothing.

The destination agent reaches the source only through a CONNECT relay the
test controls (tests/connect_proxy.py; on the native data plane the data
endpoint the source offers is relayed by it too); cutting it breaks the
urgent and the bulk streams for real. Faulting guest threads must stay blocked (never see a
zero page), both streams must resume, and the final memory must equal an
unmigrated run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import mmap
import re
import threading
import time

import pytest
from by_hand import resumed_on_destination
from connect_proxy import ConnectProxy

from migrate import orchestrator, planes
from migrate.client import AgentClient
from migrate.local import LocalAgent, wait_for
from migrate.names import DataPlane
from migrate.proto import migrate_pb2 as pb

MiB = 1 << 20
#: How a destination that gave up on the source says so (gRPC paths, native paths).
LOST = "unreachable|lost the source"


@pytest.fixture
def proxied(tmp_path, plane, monkeypatch):
    """Agents whose page paths go through a relay; yields (source, dest, relay, plane)."""
    proxy = ConnectProxy()
    offered = planes.PageRoute.offered

    def via_proxy(cls, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        route = offered(*args, **kw)
        if route.plane is DataPlane.NATIVE:
            route = dataclasses.replace(route, data_endpoint=proxy.forward(route.data_endpoint))
        return route

    monkeypatch.setattr(planes.PageRoute, "offered", classmethod(via_proxy))
    try:
        with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
                LocalAgent("dest", log_path=str(tmp_path / "dst.log"),
                           env={"grpc_proxy": proxy.url}) as dst:
            yield src, dst, proxy, plane
    finally:
        proxy.close()


def received_fraction(dst: str, run: dict) -> float:
    with AgentClient(dst) as c:
        for g in c.call("ListGuests", pb.ListGuestsRequest()).guests:
            if g.run_id:
                run["id"] = g.run_id
        if "id" not in run:
            return 0.0
        st = c.call("IncomingStatus", pb.RunRef(run_id=run["id"]))
        return st.pages_received / max(st.pages_total, 1)


def migrate_breaking_the_link(proxied, name: str, spec: pb.GuestSpec, opts: orchestrator.RunOptions,
                              breaks=None, **kw) -> dict:  # noqa: ANN001
    """Migrate guest `name` through the proxy on its data plane, calling `breaks()` once a
    fifth of its pages are in (if given); the guest is stopped on the destination afterwards."""
    src, dst, _, plane = proxied
    opts = dataclasses.replace(opts, data_plane=plane)
    with AgentClient(src.address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec), timeout=120)
    run: dict = {}

    def break_when_underway() -> None:
        if wait_for(lambda: received_fraction(dst.address, run) > 0.2, timeout=60):
            breaks()

    breaker = threading.Thread(target=break_when_underway) if breaks else None
    if breaker:
        breaker.start()
    try:
        return orchestrator.migrate(name, src.address, dst.address, opts, **kw)
    finally:
        if breaker:
            breaker.join()
        with AgentClient(dst.address) as c:
            c.stop_if_hosted(name)


POSTCOPY_SPEC = pb.GuestSpec(size=32 * MiB, workload="random-write", seed=5, ops=12_000, threads=2,
                             ops_per_sec=2_000, page_size=mmap.PAGESIZE)
POSTCOPY_OPTIONS = dict(mode="postcopy", verify=True, max_bandwidth=4 * MiB)


@pytest.mark.parametrize("outage_s", [0.5, 5.0])
def test_link_cut_mid_postcopy_recovers(proxied, outage_s):
    proxy = proxied[2]
    doc = migrate_breaking_the_link(proxied, "wire", POSTCOPY_SPEC, orchestrator.RunOptions(**POSTCOPY_OPTIONS),
                                    lambda: proxy.cut(outage_s))
    assert proxy.cuts == 1
    assert doc["verified"] is True
    assert doc["pages"]["received"] == doc["pages"]["total"]
    link = doc["link"]
    assert link["outages"] >= 1, (link, doc["total_s"])
    assert link["paused_s"] >= outage_s * 0.5


def test_blackhole_is_an_outage_counted_from_the_last_byte(proxied, capsys):
    """Packets dropped, no reset: the keepalive notices within about a second, the
    progress shows PAUSED, and the report counts one outage as long as the silence."""
    from migrate.cli import ProgressLine

    proxy = proxied[2]
    paused: list[pb.MigrationStatus] = []

    def watch(status: pb.MigrationStatus) -> None:
        detail = json.loads(status.detail_json or "{}")
        if any(isinstance(p, dict) and p.get("link_down") for p in detail.values()):
            paused.append(status)

    doc = migrate_breaking_the_link(proxied, "hole", POSTCOPY_SPEC, orchestrator.RunOptions(**POSTCOPY_OPTIONS),
                                    lambda: proxy.blackhole(3.0), on_status=watch)
    assert proxy.cuts == 1
    assert doc["verified"] is True
    assert doc["link"]["outages"] == 1, doc["link"]
    assert doc["link"]["paused_s"] >= 2.0, doc["link"]
    assert paused, "the link was never reported down while it was silent"
    ProgressLine()(paused[-1])
    assert "PAUSED: link to the source down" in capsys.readouterr().err


PRECOPY_SPEC = pb.GuestSpec(size=32 * MiB, workload="random-write", seed=7, ops=30_000, threads=2,
                            ops_per_sec=3_000, page_size=mmap.PAGESIZE)


@pytest.mark.parametrize("mode", ["hybrid", "precopy"])
@pytest.mark.parametrize("cut_at", ["round", "switch"])
def test_link_cut_in_precopy_modes_recovers(proxied, mode, cut_at):
    """A pre-copy round's stream breaks, or the link is cut as the settle step (hybrid)
    or the stop-and-copy (precopy) begins: the round carries on after reconnecting,
    nothing stale is left, and the guest ends with the memory of an unmigrated run."""
    proxy = proxied[2]
    cut = functools.partial(proxy.cut, 1.0)
    opts = orchestrator.RunOptions(mode=mode, verify=True, max_bandwidth=4 * MiB, precopy_rounds=3)
    doc = migrate_breaking_the_link(proxied, f"{mode}-{cut_at}", PRECOPY_SPEC, opts,
                                    cut if cut_at == "round" else None,
                                    before_switchover=cut if cut_at == "switch" else None)
    assert proxy.cuts == 1
    if doc["precopy"].get("fallback"):
        pytest.skip(doc["precopy"]["fallback"])
    assert doc["mode"] == mode
    assert doc["verified"] is True
    assert doc["pages"]["received"] == doc["pages"]["total"]


def test_source_gone_for_good_fails_clearly(proxied):
    src, dst, proxy, plane = proxied
    spec = pb.GuestSpec(size=16 * MiB, workload="random-write", seed=5, ops=10_000_000, threads=1,
                        ops_per_sec=500, page_size=mmap.PAGESIZE)
    with AgentClient(src.address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name="lost", spec=spec), timeout=120)
    run: dict = {}

    def cut_for_good() -> None:
        if wait_for(lambda: received_fraction(dst.address, run) > 0.1, timeout=60):
            proxy.cut(3600)

    cutter = threading.Thread(target=cut_for_good)
    cutter.start()
    try:
        opts = orchestrator.RunOptions(mode="postcopy", max_bandwidth=1 * MiB, recovery_timeout=2.0, data_plane=plane)
        with pytest.raises(orchestrator.AgentError, match=LOST):
            orchestrator.migrate("lost", src.address, dst.address, opts)
    finally:
        cutter.join()
    with AgentClient(src.address) as c:  # the source keeps the guest's memory, paused, intact
        info = c.call("InspectGuest", pb.GuestRef(name="lost"))
        assert info.state == "migrating-out"
    with AgentClient(dst.address) as c:
        st = c.call("IncomingStatus", pb.RunRef(run_id=run["id"]))
        assert st.phase == "failed" and re.search(LOST, st.error)
        c.call("AbortIncoming", pb.RunRef(run_id=run["id"]))
    with AgentClient(src.address) as c:
        c.call("AbortOutgoing", pb.RunRef(run_id=run["id"]))
        c.call("StopGuest", pb.GuestRef(name="lost"))


def test_corrupted_batches_are_refused_and_fetched_again(proxied):
    src, dst, proxy, plane = proxied
    spec = pb.GuestSpec(size=32 * MiB, workload="random-write", seed=9, ops=20_000, threads=1,
                        ops_per_sec=10_000, page_size=mmap.PAGESIZE, content="random")
    with AgentClient(src.address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name="flip", spec=spec), timeout=120)
    proxy.corrupt(times=3)  # bits flipped in page data on its way to the destination
    try:
        doc = orchestrator.migrate("flip", src.address, dst.address,
                                   orchestrator.RunOptions(mode="postcopy", verify=True, max_bandwidth=16 * MiB,
                                                           data_plane=plane))
    finally:
        with AgentClient(dst.address) as c:
            c.stop_if_hosted("flip")
    assert doc["verified"] is True  # nothing corrupt was ever installed
    # Refused by checksum and fetched again (or, if a flip hit a frame header, the connection broke and recovered).
    assert doc["link"]["refused_batches"] + doc["link"]["outages"] >= 1, doc["link"]


def test_orchestrator_killed_mid_postcopy_is_resumed(agents, plane):
    import signal
    import subprocess

    from migrate import spawn

    src, dst = agents
    spec = pb.GuestSpec(size=32 * MiB, workload="random-write", seed=3, ops=12_000, threads=1,
                        ops_per_sec=2_000, page_size=mmap.PAGESIZE)
    with AgentClient(src.address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name="orphan", spec=spec), timeout=120)
    run = spawn.module_argv("migrate", "run", "orphan", "--from", src.address, "--to", dst.address,
                            "--mode", "postcopy", "--max-bandwidth", "4M", "--data-plane", plane)
    orchestrator_proc = subprocess.Popen(run, env=spawn.child_env(), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
    try:
        state: dict = {}
        assert wait_for(lambda: received_fraction(dst.address, state) > 0.1, timeout=60)
    finally:
        orchestrator_proc.send_signal(signal.SIGKILL)
        orchestrator_proc.wait()
    out = subprocess.run(run + ["--resume", "--verify"], env=spawn.child_env(), capture_output=True, text=True,
                         timeout=300)
    try:
        assert out.returncode == 0, out.stderr
        assert "yes: digest equals the unmigrated run" in out.stdout
        assert f"data plane     {plane}" in out.stdout
        with AgentClient(src.address) as c:  # released on the source
            assert not any(g.name == "orphan" for g in c.call("ListGuests", pb.ListGuestsRequest()).guests)
    finally:
        with AgentClient(dst.address) as c:
            c.stop_if_hosted("orphan")


def test_a_resumed_run_reports_its_time_from_the_original_start(agents):
    """An orchestrator that died after the switchover, resumed once the destination finished alone."""
    src, dst = agents
    spec = pb.GuestSpec(size=16 * MiB, workload="random-write", seed=3, ops=4_000, threads=1,
                        ops_per_sec=2_000, page_size=mmap.PAGESIZE)
    with AgentClient(src.address) as s, AgentClient(dst.address) as d:
        s.call("LaunchGuest", pb.LaunchGuestRequest(name="late", spec=spec), timeout=120)
        t_first = time.monotonic()  # the destination's run starts after this
        run = resumed_on_destination(s, d, "late", 4 * MiB)  # and the orchestrator died
        try:
            assert wait_for(lambda: d.call("IncomingStatus", run).phase == "complete", timeout=120)
            waited = time.monotonic() - t_first
            doc = orchestrator.resume("late", src.address, dst.address, orchestrator.RunOptions())
        finally:
            d.stop_if_hosted("late")
            s.stop_if_hosted("late")
    assert doc["total_s"] >= 0.8 * waited, (doc["total_s"], waited)  # waited includes PrepareOutgoing
    pages = doc["pages"]  # reported like any run: the same fields, adding up
    assert pages["before_resume"] + pages["pushed"] + pages["faulted"] + pages["recovered"] == pages["received"]


def test_resume_before_switchover_aborts_and_keeps_the_guest(agents):
    src, dst = agents
    spec = pb.GuestSpec(size=8 * MiB, workload="random-write", seed=3, ops=10_000_000, threads=1,
                        ops_per_sec=2_000, page_size=mmap.PAGESIZE)
    with AgentClient(src.address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name="early", spec=spec), timeout=120)
        c.call("PrepareOutgoing", pb.PrepareOutgoingRequest(name="early"))  # an orchestrator that died here
    try:
        with pytest.raises(orchestrator.AgentError, match="had not switched over"):
            orchestrator.resume("early", src.address, dst.address, orchestrator.RunOptions(mode="postcopy"))
        with AgentClient(src.address) as c:
            info = c.call("InspectGuest", pb.GuestRef(name="early"))
            assert info.state == "running" and not info.run_id
    finally:
        with AgentClient(src.address) as c:
            c.call("StopGuest", pb.GuestRef(name="early"))


class Restarter:
    """Kills an agent (SIGKILL, no cleanup) once a migration is underway, and starts it again
    with the same state directory and address."""

    def __init__(self, first: LocalAgent, state: str, watch: str, log_path: str) -> None:
        self.first = first
        self.second: LocalAgent | None = None
        self._args = (first.role, "--state-dir", state)
        self._watch = watch
        self._log = log_path
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        import os
        import signal

        run: dict = {}
        if not wait_for(lambda: received_fraction(self._watch, run) > 0.2, timeout=60):
            return
        os.kill(self.first.pid, signal.SIGKILL)
        self.first.proc.wait()
        time.sleep(0.5)  # the others notice it is gone
        self.second = LocalAgent(*self._args, listen=self.first.address, log_path=self._log)

    def join(self) -> LocalAgent:
        self._thread.join()
        assert self.second is not None, "the migration never got underway"
        return self.second

    def stop(self) -> None:
        self._thread.join()
        if self.second is not None:
            self.second.stop()
        self.first.stop()


def migrate_through_a_restart(name: str, src: str, dst: str, restarter: Restarter, plane: str) -> dict:
    opts = orchestrator.RunOptions(mode="postcopy", verify=True, max_bandwidth=4 * MiB, recovery_timeout=60,
                                   data_plane=plane, policy="bubble:step=64")
    try:
        return orchestrator.migrate(name, src, dst, opts)
    finally:
        restarter.join()


RESTART_SPEC = pb.GuestSpec(size=32 * MiB, workload="random-write", seed=4, ops=12_000, threads=2,
                            ops_per_sec=2_000, page_size=mmap.PAGESIZE)


def test_destination_agent_killed_and_restarted_finishes_the_migration(tmp_path, caplog, plane):
    import os

    state = str(tmp_path / "state")
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src:
        first = LocalAgent("dest", "--state-dir", state, log_path=str(tmp_path / "dst1.log"))
        restarter = None
        try:
            with AgentClient(src.address) as c:
                c.call("LaunchGuest", pb.LaunchGuestRequest(name="phoenix", spec=RESTART_SPEC), timeout=120)
            # the workers die with the agent; the runner lives on, its faulting threads blocked
            restarter = Restarter(first, state, first.address, str(tmp_path / "dst2.log"))
            doc = migrate_through_a_restart("phoenix", src.address, first.address, restarter, plane)
            assert "waiting up to 60 s for it to come back" in caplog.text  # not silent while it waits
            assert doc["verified"] is True
            assert doc["policy"] == "bubble:step=64"  # journaled: the restarted agent runs it too
            assert doc["pages"]["received"] == doc["pages"]["total"]
            # The pages installed before the restart count too (journaled every 0.25 s); those installed
            # after the last journal write count as recovered: the report adds up exactly, whatever the timing.
            pages = doc["pages"]
            assert pages["pushed"] + pages["faulted"] + pages["recovered"] == pages["total"], pages
            assert pages["before_resume"] == 0 and pages["recovered"] < pages["total"], pages
            with AgentClient(restarter.second.address) as c:
                assert c.call("InspectGuest", pb.GuestRef(name="phoenix")).state in ("running", "finished")
                c.call("StopGuest", pb.GuestRef(name="phoenix"))
            assert not os.listdir(state)  # journal and runner socket gone once done
        finally:
            (restarter or first).stop()


def test_source_agent_killed_and_restarted_serves_a_file_backed_guest(tmp_path, plane):
    """The source dies mid-post-copy, mid-batch as likely as not: the destination installs
    no page it has not received whole and checked, and the digest comes out equal."""
    import os

    state = str(tmp_path / "state")
    room = tmp_path / "ram"
    with LocalAgent("dest", log_path=str(tmp_path / "dst.log")) as dst:
        # restarted with --state-dir only: the journal says where the file is
        first = LocalAgent("source", "--state-dir", state, "--backing-dir", str(room),
                           log_path=str(tmp_path / "src1.log"))
        restarter = None
        try:
            with AgentClient(first.address) as c:
                c.call("LaunchGuest", pb.LaunchGuestRequest(name="lazarus", spec=RESTART_SPEC,
                                                            backing="file:ram.img"), timeout=120)
            # the guest's memory survives in its file
            restarter = Restarter(first, state, dst.address, str(tmp_path / "src2.log"))
            doc = migrate_through_a_restart("lazarus", first.address, dst.address, restarter, plane)
            assert doc["verified"] is True
            assert doc["link"]["outages"] >= 1
            with AgentClient(dst.address) as c:
                c.call("StopGuest", pb.GuestRef(name="lazarus"))
            assert not [f for f in os.listdir(state) if f.endswith(".json")]
            assert not os.listdir(room)  # the file went once the run completed
        finally:
            (restarter or first).stop()


def test_a_path_thread_that_hits_a_bug_fails_the_run_instead_of_ending_quietly(caplog) -> None:
    """paths.guarded: an unexpected exception in a path's thread reaches the run as
    its error (with the traceback logged); a thread that returns reports nothing."""
    from migrate.dest.paths import guarded

    errors: list[str] = []

    def buggy() -> None:
        raise KeyError("oops")

    guarded("bulk path", buggy, errors.append)()
    guarded("fault loop", lambda: None, errors.append)()
    assert errors == ["bulk path failed: KeyError('oops')"]
    assert "Traceback" in caplog.text and "bulk path failed" in caplog.text
