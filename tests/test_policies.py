"""Push and prefetch policies (migrate.policies): parsing, and real migrations under each policy.

The oracle stays the digest: a policy only reorders pages, so every policy
must migrate every workload with the unmigrated guest's digest. The
reductions asked of trend and replay are asserted on fault counts, never
on timings.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_cli import assert_clean_error, run_cli
from test_faults import fault_server
from test_migration import WORKLOADS, migrate_at, spec

from migrate import orchestrator, spawn
from migrate.bitmap import SharedBitmap
from migrate.client import AgentClient
from migrate.dest.faults import NEIGHBOURHOOD
from migrate.policies import BUILTINS, PolicyError, parse, workingset
from migrate.policies.base import DEFAULT_PAGES, AdaptiveSize, Neighbourhood, Policy, RunInfo, Tick
from migrate.policies.runner import PolicyRunner
from migrate.proto import migrate_pb2 as pb

MiB = 1 << 20


class Nothing(Policy):
    """A user's policy, loaded as test_policies:Nothing (pytest puts tests/ on the path)."""

    params = {"pages": int}

    def __init__(self, pages: int = 16) -> None:
        self.pages = pages


def test_parse_builtins_and_params():
    assert parse("trend:window=5,ahead=64").build().window == 5
    assert str(parse("bubble:step=32")) == "bubble:step=32"
    assert type(parse("test_policies:Nothing").build()).__name__ == "Nothing"
    assert parse("test_policies:Nothing:pages=4").build().pages == 4


@pytest.mark.parametrize("text, message", [
    ("nosuch", "unknown policy 'nosuch'"),
    ("trend:speed=3", "policy trend takes no parameter 'speed' (it takes: window, ahead)"),
    ("trend:window=x", "window='x' is not a valid int"),
    ("trend:window=1", "window must be >= 3"),
    ("replay:eager=2", "eager is 0 or 1"),
    ("bubble:min=64,max=32", "1 <= min <= max <= 128 pages"),
    ("bubble:shape=forward", "shape is around or aligned"),
    ("trend:window", "is not key=value"),
    ("nosuchmod:Cls", "policy module 'nosuchmod' cannot be imported"),
    ("test_policies:Missing", "has no Policy subclass named 'Missing'"),
    ("replay:ws=/nonexistent/ws.json", "cannot read working set /nonexistent/ws.json"),
])
def test_bad_policies_say_why_in_one_line(text, message):
    with pytest.raises(PolicyError) as err:
        parse(text).build()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bubble_neighbourhood_floor_and_shape():
    """bubble:min=128,shape=aligned fetches each fault's aligned 128-page block and never shrinks it (hotset)."""
    bubble = parse("bubble:min=128,shape=aligned").build()
    assert bubble.start(RunInfo(1024, 4096)).neighbourhood == Neighbourhood(128, "aligned")
    nb = Neighbourhood(128, "aligned")
    d = bubble.decide(Tick(faults=[700], prefetched=1000, hits=0, queued=0, neighbourhood=nb))
    assert d.neighbourhood is None and d.push[0] == (701, 256)


def test_neighbourhood_shapes():
    assert Neighbourhood(4).pages_of(6, 100) == [4, 5, 7]
    assert Neighbourhood(3, "forward", 2).pages_of(6, 100) == [8, 10, 12]
    assert Neighbourhood(3, "backward").pages_of(1, 100) == [0]
    assert Neighbourhood(4, "around").pages_of(10, 100) == [11, 9, 12, 8]


def test_working_set_round_trip(tmp_path):
    ranges = workingset.ranges_of([5, 6, 7, 1, 2, 9])
    assert ranges == [(5, 3), (1, 2), (9, 1)]
    assert workingset.unpack(workingset.pack(ranges), 10) == ranges
    path = str(tmp_path / "ws.json")
    workingset.save(path, 10, 4096, ranges)
    assert workingset.load(path).ranges == tuple(ranges)
    with pytest.raises(ValueError):
        workingset.unpack(workingset.pack([(9, 2)]), 10)


def test_replay_fetches_the_recorded_pages_blocks_before_the_resume():
    assert workingset.blocks_of([(20, 1), (3, 2), (17, 1), (30, 4)], 16, 40) == [(16, 16), (0, 16), (32, 8)]
    run = RunInfo(40, 4096, ((20, 1), (3, 2)))
    eager = parse("replay").build().start(run)
    assert eager.before_resume == [(16, 16), (0, 16)] and eager.push == []
    lazy = parse("replay:eager=0,block=1").build().start(run)
    assert lazy.before_resume == [] and lazy.push == [(20, 1), (3, 2)]


def test_adaptive_size_grows_on_hits_and_falls_back_to_the_default_block():
    size = AdaptiveSize(start=32)
    assert size.update(64, 60) == 64 and size.update(64, 64) == 128 and size.update(64, 64) == 128
    for _ in range(6):
        size.update(64, 0)
    assert size.pages == DEFAULT_PAGES  # not below: every page moves once, a prefetch is never in vain


class Feed:
    """A fault path as a policy runner sees it: the neighbourhoods it was told."""

    def __init__(self) -> None:
        self.told: list[Neighbourhood] = []

    def new_faults(self) -> list[int]:
        return []

    def prefetch_counts(self) -> tuple[int, int]:
        return 0, 0

    def set_neighbourhood(self, nb: Neighbourhood) -> None:
        self.told.append(nb)


class UsedFeed(Feed):
    """A fault path that faulted on `faults` and counts as hits whatever it is told was used."""

    def __init__(self, faults: list[int]) -> None:
        super().__init__()
        self.faults, self.used = faults, 0

    def new_faults(self) -> list[int]:
        out, self.faults = self.faults, []
        return out

    def prefetch_counts(self) -> tuple[int, int]:
        return 64, self.used

    def count_used(self, used: SharedBitmap) -> int:
        self.used += used.count()
        return used.count()


class Written:
    """A written-page scan that finds `pages` once."""

    def __init__(self, npages: int, pages: list[int]) -> None:
        self.bitmap, self.pages, self.total = SharedBitmap.create(npages), pages, 0

    def scan(self) -> SharedBitmap:
        self.bitmap.clear_range(0, self.bitmap.nbits)
        for p in self.pages:
            self.bitmap.set_range(p)
        self.total += len(self.pages)
        self.pages = []
        return self.bitmap


def test_written_pages_count_as_hits_and_join_the_recorded_working_set():
    """The pages a scan finds written are hits for the policy and, recording, join the working set after
    the faults, each once; the last scan comes with the stop."""
    feed, written = UsedFeed([40, 41]), Written(1024, [7, 8, 9, 40, 300])
    runner = PolicyRunner(parse("bubble").build(), "bubble", RunInfo(1024, 4096), feed, None, record=True,
                          written=written)
    try:
        runner.step()  # a turn of its thread (not started here: the order is the test's)
        assert feed.used == 5 and written.total == 5
        assert runner.working_set() == [(40, 2), (7, 3), (300, 1)]
        written.pages = [500]
        runner.stop()
        assert runner.working_set()[-1] == (500, 1) and runner.summary()["written_pages"] == 6
    finally:
        written.bitmap.close()


def test_the_first_neighbourhood_reaches_the_fault_path_even_the_default():
    """`sequential` names the default block: the gRPC fault path, whose own readahead runs until told,
    must be told it too (it was not, and `sequential` ran with a readahead there)."""
    feed = Feed()
    runner = PolicyRunner(parse("sequential").build(), "sequential", RunInfo(64, 4096), feed, None)
    runner.start()
    runner.stop()
    assert feed.told == [Neighbourhood()]


def test_cli_rejects_bad_policy_in_one_line():
    out = run_cli("run", "g", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--policy", "trend:speed=3")
    assert_clean_error(out, "policy trend takes no parameter 'speed'")


def test_dest_agent_imports_policy_modules_only_when_allowed(agents, tmp_path):
    """--policy module:Class runs a module of the client's choosing in the destination agent: opt-in."""
    from migrate.local import LocalAgent
    from migrate.rpc import AgentError

    s = spec("hotset", size=4 * MiB, ops=5_000)
    with pytest.raises(AgentError, match="start it with --allow-policy-modules"):
        migrate_at(agents, "g", s, 0.3, policy="test_policies:Nothing", data_plane="native")
    src, _ = agents
    on_path = {"PYTHONPATH": os.pathsep.join([spawn.child_env()["PYTHONPATH"], str(Path(__file__).parent)])}
    with LocalAgent("dest", "--allow-policy-modules", log_path=str(tmp_path / "dest2.log"), env=on_path) as dst:
        doc = migrate_at((src, dst), "g", s, 0.3, policy="test_policies:Nothing", data_plane="native")
    assert doc["verified"] is True and doc["policy"] == "test_policies:Nothing"


def test_dest_serve_checks_its_restore_policy_in_one_line(tmp_path):
    sock = str(tmp_path / "u.sock")
    out = run_cli("dest", "serve", "--listen", "127.0.0.1:0", "--uffd-socket", sock, "--restore-from",
                  "127.0.0.1:1", "--image", "snap", "--policy", "replay:ws=/nonexistent/ws.json")
    assert_clean_error(out, "cannot read working set /nonexistent/ws.json")
    out = run_cli("dest", "serve", "--listen", "127.0.0.1:0", "--record-ws", str(tmp_path / "ws.json"))
    assert_clean_error(out, "go with --uffd-socket")


def _faults(doc: dict) -> int:
    return doc["faults"]["count"]


@pytest.mark.parametrize("policy", sorted(BUILTINS))
@pytest.mark.parametrize("workload", WORKLOADS)
def test_each_policy_migrates_every_workload(agents, policy, workload, tmp_path):
    ws = ""
    if policy == "replay":
        ws = str(tmp_path / "ws.json")
        workingset.save(ws, 2048, 4096, [(100, 50), (0, 10)])
        policy = f"replay:ws={ws}"
    doc = migrate_at(agents, "g", spec(workload, size=8 * MiB, ops=20_000), 0.3, policy=policy,
                     data_plane="native", fault_path="native")
    assert doc["verified"] is True
    assert doc["policy"] == policy.split(":")[0]
    assert doc["pages"]["prefetched"] == doc["prefetch"]["pages"]


@pytest.mark.parametrize("policy", sorted(BUILTINS))
def test_each_policy_on_the_grpc_paths(agents, policy, tmp_path):
    if policy == "replay":
        ws = str(tmp_path / "ws.json")
        workingset.save(ws, 2048, 4096, [(100, 50), (0, 10)])
        policy = f"replay:ws={ws}"
    doc = migrate_at(agents, "g", spec("hotset", size=8 * MiB, ops=20_000), 0.3, policy=policy, data_plane="grpc")
    assert doc["verified"] is True


#: (data plane, fault path): every pair that exists (the native fault path needs the native plane).
PATHS = [("native", "native"), ("native", "grpc"), ("grpc", "grpc")]


@pytest.mark.parametrize("data_plane, fault_path", PATHS)
def test_trend_halves_the_faults_of_a_sequential_reader(agents, data_plane, fault_path):
    s = spec("seq-read", size=16 * MiB, ops=30_000)
    opts = dict(no_push=True, data_plane=data_plane, fault_path=fault_path)
    base = migrate_at(agents, "g", s, 0.1, policy="sequential", **opts)
    trend = migrate_at(agents, "g", s, 0.1, policy="trend", **opts)
    assert base["verified"] and trend["verified"]
    assert _faults(trend) * 2 <= _faults(base), (_faults(trend), _faults(base))
    assert trend["pages"]["prefetched"] == trend["prefetch"]["pages"] > 0
    assert trend["prefetch"]["hit_ratio"] > 0.5
    assert base["prefetch"]["neighbourhood"] == {"pages": 16, "shape": "aligned", "stride": 1}
    grown = trend["prefetch"]["neighbourhood"]  # trend's adaptive size starts at 32 and doubles on hits
    assert grown["shape"] == "forward" and grown["pages"] > 32, grown


def migrate_paused(agents, name: str, s: pb.GuestSpec, **opts) -> dict:
    """Launch `name` paused, migrate it (it does all its work on the destination), stop it there.

    The same guest then touches the same pages in the same order on every
    run, whatever the machine's speed: a deterministic working set."""
    src, dst = agents
    with AgentClient(src.address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=s, start_paused=True), timeout=120)
    try:
        doc = orchestrator.migrate(name, src.address, dst.address,
                                   orchestrator.RunOptions(mode="postcopy", verify=True, **opts))
    finally:
        for agent in agents:
            with AgentClient(agent.address) as c:
                c.stop_if_hosted(name)
    return doc


def test_replay_cuts_the_faults_of_a_repeated_hotset_migration_by_nine_tenths(agents, tmp_path):
    """The second migration of the same guest (same seed, same work) fetches what the first one's
    guest touched before it resumes (REAP's case); the first, under `sequential`, is the baseline.

    The guest starts paused and does all of its (little) work on the destination, as a function
    invocation does: with much work, hotset's cold 10 % of accesses land in nearly every 64 KiB
    block and the working set is the whole guest, and replaying it is a stop-and-copy. The
    recording holds the pages faulted on and those found written (migrate.dest.written): with
    the push on, most pages the guest writes came before it touched them, and a recording of
    faults alone left them out.
    """
    ws = str(tmp_path / "hotset.ws")
    s = spec("hotset", size=32 * MiB, ops=1_500, rate=10_000)
    opts = dict(max_bandwidth=20 * MiB, data_plane="native", fault_path="native")
    first = migrate_paused(agents, "g", s, policy="sequential", record_ws=ws, **opts)
    recorded = workingset.load(ws)
    assert first["prefetch"]["written"] > 0
    assert recorded.pages > _faults(first), (recorded.pages, _faults(first))  # written pages it never faulted on
    fetched = sum(n for _, n in workingset.blocks_of(recorded.ranges, 16, recorded.npages))
    assert fetched * 2 < recorded.npages, fetched  # a working set, not the whole guest
    second = migrate_paused(agents, "g", s, policy=f"replay:ws={ws}", **opts)
    assert first["verified"] and second["verified"]
    assert _faults(first) >= 40, _faults(first)  # the guest worked on the destination
    assert _faults(second) * 10 <= _faults(first), (_faults(second), _faults(first))


def test_bubble_sees_the_pre_paged_pages_the_guest_writes(agents):
    """hotset writes three accesses in four: the written-page scan shows bubble its pre-paged pages
    used though the guest never faults on them or right past them, so its hit ratio is no longer the
    few per cent the fault path sees alone (measured: 0.04-0.06 without the scan, 0.14-0.20 with it),
    the signal its neighbourhood grows on; a reader writes nothing, and the scan finds nothing. Random RAM: a
    zero page is left a hole (lazy zero pages), never pre-paged, so it could be no hit."""
    opts = dict(max_bandwidth=20 * MiB, data_plane="native", fault_path="native", policy="bubble")
    hot_spec, reader_spec = (spec(w, size=32 * MiB, ops=20_000, rate=20_000) for w in ("hotset", "random-read"))
    hot_spec.content = reader_spec.content = "random"
    hot = migrate_paused(agents, "g", hot_spec, **opts)
    reader = migrate_paused(agents, "g", reader_spec, **opts)
    assert hot["verified"] and reader["verified"]
    assert hot["prefetch"]["written"] > 0 and reader["prefetch"]["written"] == 0
    # what the neighbourhood does with the ratio is AdaptiveSize's (its own tests); its size at the end
    # of one run follows the last few samples, which the machine's load moves
    assert hot["prefetch"]["hit_ratio"] >= 0.1, hot["prefetch"]


def test_grpc_fault_path_moves_a_policy_neighbourhood_on_with_faults_on_pages_in_flight():
    """A reader that caught up with its forward readahead (a fault on a page in flight) gets the
    unasked rest of its neighbourhood asked, as on the native path, but in runs of at least half a
    request, never page by page."""
    with fault_server() as (server, asked):
        server.neighbourhood = Neighbourhood(128, "forward")
        server.on_faults([(100, 1, 0)])
        # pages [101, 229): the first NEIGHBOURHOOD - 1 with the fault's page, the rest in whole requests
        assert asked == [(100, NEIGHBOURHOOD), (100 + NEIGHBOURHOOD, 64), (164 + NEIGHBOURHOOD, 65 - NEIGHBOURHOOD)]
        asked.clear()
        server.on_faults([(110, 1, 0)])  # in flight: 10 pages further on, too few to ask
        assert asked == []
        server.on_faults([(150, 1, 0)])  # in flight: 50 pages further on
        assert asked == [(229, 50)]
        server.neighbourhood = None  # the built-in readahead asked past it already
        asked.clear()
        server.on_faults([(250, 1, 0)])
        assert asked == []
