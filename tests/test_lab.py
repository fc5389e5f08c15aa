"""The lab: two namespaces, a shaped veth, agents in each; nothing left behind, knobs measured.

Needs root, ip, tc and nft; skipped otherwise.
"""
from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from migrate import orchestrator, spawn
from migrate.bench.runs import run_options
from migrate.client import AgentClient
from migrate.lab import lifecycle, netns, state
from migrate.lab.link import LinkSpec, nft_ruleset, tbf_args
from migrate.lab.procs import alive
from migrate.local import wait_for
from migrate.proto import migrate_pb2 as pb

MiB = 1 << 20
needs_lab = pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "nft")),
                               reason="the lab needs root, iproute2 and nftables")


def test_link_profiles_parse_and_render():
    spec = LinkSpec.parse("1gbit/1ms/0.5%")
    assert spec == LinkSpec(rate=125_000_000, delay=0.001, loss=0.5)
    assert LinkSpec.parse("10gbit/100us").delay == pytest.approx(100e-6)
    assert LinkSpec.parse("lab") == LinkSpec()
    with pytest.raises(ValueError, match="bad link profile"):
        LinkSpec.parse("fast/1ms")
    assert tbf_args(spec)[:3] == ["tbf", "rate", "1000000000bit"]
    rules = nft_ruleset(spec, "lab0", 4242)
    assert "numgen random mod 10000 < 50 drop" in rules and "redirect to :4242" in rules
    assert nft_ruleset(LinkSpec(rate=1), "lab0", None) == ""


def _gone(record: dict) -> bool:
    pids = [record[k] for k in ("keeper_pid", "janitor_pid", "source_pid", "dest_pid", "relay_pid") if k in record]
    return (not any(netns.exists(ns) for ns in record["namespaces"]) and not state.path(record["name"]).exists()
            and not any(alive(p) for p in pids))


@needs_lab
def test_up_and_down_leave_nothing_behind(tmp_path):
    with lifecycle.Lab(LinkSpec(rate=125_000_000, delay=0.0005, loss=0.01), log=str(tmp_path / "lab.log")) as lab:
        record = lab.record
        assert all(netns.exists(ns) for ns in record["namespaces"])
        status = lifecycle.status(lab.name)
        assert status["keeper_alive"] and all(status["agents_alive"].values())
        assert {s["qdisc"] for s in status["link_stats"].values()} == {"tbf"}
        for endpoint in (lab.source, lab.dest):
            with AgentClient(endpoint) as c:
                assert c.call("Hello", pb.HelloRequest()).roles
    assert _gone(record)


@needs_lab
@pytest.mark.parametrize("also_janitor", [False, True])
def test_a_killed_lab_is_cleaned_up(tmp_path, also_janitor):
    """SIGKILL the keeper: its janitor removes everything; kill both: `lab down` does it from the state file."""
    lab = lifecycle.Lab(LinkSpec(delay=0.0002), log=str(tmp_path / "lab.log"))
    record = lab.record
    if also_janitor:
        os.kill(record["janitor_pid"], signal.SIGKILL)
    lab.keeper.kill()
    lab.keeper.wait()
    if also_janitor:
        assert wait_for(lambda: not alive(record["janitor_pid"]), timeout=10)
        assert state.path(lab.name).exists()  # nobody cleaned up yet
        assert lifecycle.down(lab.name)
    assert wait_for(lambda: _gone(record), timeout=30), record


def _migrate_across(lab: lifecycle.Lab, name: str, spec: pb.GuestSpec, **opts) -> tuple[dict, list]:
    """Launch on the lab's source, migrate (post-copy, --verify) once under way; return report and status polls."""
    with AgentClient(lab.source) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec), timeout=120)
        assert wait_for(lambda: c.call("InspectGuest", pb.GuestRef(name=name)).ops_done >= spec.ops // 5, 60)
    samples: list = []
    options = run_options("postcopy", lab.source_endpoint)
    options.verify = True
    for k, v in opts.items():
        setattr(options, k, v)
    try:
        doc = orchestrator.migrate(name, lab.source, lab.dest, options,
                                   on_status=lambda st: samples.append((time.monotonic(), st.bytes_wire)))
    finally:
        with AgentClient(lab.dest) as c:
            c.stop_if_hosted(name)
    return doc, samples


@needs_lab
def test_delay_is_real_and_migration_is_correct(tmp_path, plane):
    """1 ms each way: every remote fault costs at least the 2 ms round trip; the digest still matches."""
    with lifecycle.Lab(LinkSpec(delay=0.001), log=str(tmp_path / "lab.log")) as lab:
        spec = pb.GuestSpec(size=16 * MiB, workload="random-write", seed=3, ops=40_000, threads=1,
                            ops_per_sec=40_000, page_size=mmap.PAGESIZE)
        doc, _ = _migrate_across(lab, "delayed", spec, no_push=True, data_plane=plane)
    assert doc["verified"] is True
    lat = doc["faults"]["latency_us"]
    assert lat["count"] > 20
    assert lat["p50"] >= 2000, lat
    # faults on pages a neighbour's fetch already brought are woken at once; the rest wait >= 2 ms
    slow = sum(n for k, n in lat["hist_log2_us"].items() if int(k) >= 2048)
    assert slow >= 0.8 * lat["count"], lat


@needs_lab
def test_rate_limit_is_real(tmp_path, plane):
    """At 1 Gbit/s the push never exceeds 1 Gbit/s: overall, and on the link's own counters over any 0.25 s."""
    rate = 125_000_000
    with lifecycle.Lab(LinkSpec(rate=rate), log=str(tmp_path / "lab.log")) as lab:
        src_ns = lab.record["namespaces"][0]
        samples: list[tuple[float, int, float]] = []  # (before, link bytes, after) each read
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                before = time.monotonic()
                sent = lifecycle.qdisc_stats(src_ns)["bytes"]
                samples.append((before, sent, time.monotonic()))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            spec = pb.GuestSpec(size=96 * MiB, workload="idle", seed=3, ops=1, threads=1, ops_per_sec=0,
                                page_size=mmap.PAGESIZE, content="random")  # incompressible: wire = pages
            doc, _ = _migrate_across(lab, "shaped", spec, data_plane=plane)
        finally:
            done.set()
            sampler.join()
    assert doc["verified"] is True
    assert doc["bytes"]["wire"] >= 90 * MiB
    assert doc["bytes"]["wire"] / doc["total_s"] <= 1.1 * rate
    assert samples[-1][1] - samples[0][1] >= 90 * MiB  # the pages did cross this qdisc
    # a read happens somewhere between its before and after stamps (tc is a subprocess on a busy machine)
    for i, (t0, b0, _) in enumerate(samples):
        for _, b1, t1 in samples[i + 1:]:
            if t1 - t0 >= 0.25:
                assert (b1 - b0) / (t1 - t0) <= 1.1 * rate, (t1 - t0, b1 - b0)
                break


@needs_lab
def test_cli_up_status_down(tmp_path):
    name = lifecycle.unique_name("c")
    cli = spawn.module_argv("migrate", "lab")
    up = subprocess.run(cli + ["up", "--name", name, "--rate", "1gbit", "--delay", "100us"],
                        capture_output=True, text=True, timeout=120, env=spawn.child_env())
    try:
        assert up.returncode == 0, up.stderr
        assert "1gbit, 100us one-way delay" in up.stdout and "--source-endpoint 10.77.0.1:7070" in up.stdout
        st = subprocess.run(cli + ["status", "--name", name],
                            capture_output=True, text=True, timeout=60, env=spawn.child_env())
        assert "running" in st.stdout and "source up, dest up" in st.stdout
        again = subprocess.run(cli + ["up", "--name", name],
                               capture_output=True, text=True, timeout=60, env=spawn.child_env())
        assert again.returncode == 1 and "already up" in again.stderr and "Traceback" not in again.stderr
    finally:
        record = state.load(name)
        down = subprocess.run(cli + ["down", "--name", name],
                              capture_output=True, text=True, timeout=120, env=spawn.child_env())
    assert down.returncode == 0 and f"lab {name} is down" in down.stdout
    assert _gone(record)


def test_cli_rejects_bad_input_in_one_line():
    for args in (["up", "--delay", "5parsecs"], ["up", "--name", "Bad_Name"], ["up", "--loss", "120%"]):
        r = subprocess.run(spawn.module_argv("migrate", "lab", *args),
                           capture_output=True, text=True, env=spawn.child_env())
        assert r.returncode == 2 and "Traceback" not in r.stderr and "Error: Invalid value" in r.stderr, r.stderr


def test_cli_down_of_an_unknown_lab_fails_in_one_line(tmp_path):
    name = lifecycle.unique_name("nope")
    r = subprocess.run(spawn.module_argv("migrate", "lab", "down", "--name", name), capture_output=True, text=True,
                       timeout=60, env=spawn.child_env({"MIGRATE_LAB_DIR": str(tmp_path)}))
    assert r.returncode == 1 and r.stderr.strip() == f"Error: no lab named {name}", r.stderr
