"""`migrate bench`: a 2-cell x 2-rep matrix on loopback writes every metric, resumes, and plots."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from migrate import spawn
from migrate.bench import driver, summary
from migrate.bench.matrix import Matrix, load_toml

MiB = 1 << 20


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    m = Matrix(sizes=[8 * MiB], workloads=["hotset", "random-write"], reps=2, ops=200_000, ops_per_sec=200_000)
    lines: list[str] = []
    driver.run_matrix(m.check(), str(out), say=lines.append)
    return out, m, lines


def test_bench_writes_every_metric(bench_dir):
    out, _, lines = bench_dir
    records = [json.loads(line) for line in (out / driver.RESULTS).read_text().splitlines()]
    assert [r["kind"] for r in records].count("baseline") == 2
    runs = [r for r in records if r["kind"] == "run"]
    assert len(runs) == 4 and all("report" in r and r["report"]["verified"] for r in runs)
    assert all(r["report"]["timeline"] and r["report"]["switchover_s"] is not None for r in runs)
    rows = list(csv.DictReader((out / driver.SUMMARY).open()))
    assert len(rows) == 2
    for metric in summary.METRICS:
        for stat in ("min", "median", "max"):
            assert all(row[f"{metric}_{stat}"] != "" for row in rows), metric
    assert float(rows[0]["total_s_min"]) <= float(rows[0]["total_s_median"]) <= float(rows[0]["total_s_max"])
    assert any(line.startswith("[6/6]") for line in lines)  # progress was shown


def test_bench_resumes_without_redoing_runs(bench_dir):
    out, m, _ = bench_dir
    before = (out / driver.RESULTS).read_text()
    lines: list[str] = []
    driver.run_matrix(m, str(out), say=lines.append)
    assert (out / driver.RESULTS).read_text() == before
    assert lines == ["resuming: 6 of 6 runs already in " + str(out / driver.RESULTS)]


def test_bench_plot_renders(bench_dir, tmp_path):
    out, _, _ = bench_dir
    for args, name in (([], "bench.png"), (["--run", "1"], "run.png")):
        png = tmp_path / name
        r = subprocess.run(spawn.module_argv("migrate", "plot", str(out), "-o", str(png), *args),
                           capture_output=True, text=True, timeout=120, env=spawn.child_env())
        assert r.returncode == 0, r.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_toml_matrix_and_bad_input(tmp_path):
    cfg = tmp_path / "bench.toml"
    cfg.write_text('sizes = ["64M", "1G"]\nworkloads = "zipf"\nmodes = ["postcopy", "hybrid"]\n'
                   'links = ["loopback", "1gbit/1ms"]\nreps = 2\n')
    m = load_toml(str(cfg)).check()
    assert m.sizes == [64 * MiB, 1 << 30] and m.workloads == ["zipf"] and len(m.cells()) == 8
    cfg.write_text("sizes = 1\nwarp = 9\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_toml(str(cfg))
    r = subprocess.run(spawn.module_argv("migrate", "bench", "--link", "fast", "-o", str(tmp_path / "o")),
                       capture_output=True, text=True, env=spawn.child_env())
    assert r.returncode == 1 and "bad link profile" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("script", ["bench_modes.py", "bench_drain.py", "bench_core.py", "bench_dataplane.py",
                                    "bench_digest.py", "bench_policies.py", "bench_snapshot.py", "compare_qemu.py",
                                    "drain_qemu.py"])
def test_bench_scripts_start(script):
    """Each benchmark script builds its options (two named a constant that had moved: AttributeError)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / script
    r = subprocess.run([sys.executable, "-P", str(path), "--help"], capture_output=True, text=True, timeout=60,
                       check=False, env=spawn.child_env())
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr


@pytest.fixture
def bench_core(monkeypatch):
    """scripts/bench_core.py as a module (scripts/ is not a package)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    return importlib.import_module("bench_core")


def test_core_bench_raw_baseline_runs_between_two_processes(bench_core):
    """scripts/bench_core.py's baseline: a raw server and client process pair that stream and echo for real."""
    raw = bench_core.raw_baseline(64)  # enough CPU to show in /proc (10 ms ticks)
    assert raw["stream_mib_s"] > 0 and raw["cpu_ms_per_mib"] > 0
    assert 0 < raw["rtt_p50_us"] <= raw["rtt_p99_us"]


def test_core_bench_raw_c_stream_runs_between_two_processes(bench_core):
    """scripts/bench_core.py's C baseline: a sender and a receiver process move the bytes for real."""
    raw = bench_core.raw_c_baseline(256)  # enough CPU to show in getrusage
    assert raw["stream_mib_s"] > 0 and raw["cpu_ms_per_mib"] > 0


def test_core_bench_usage_counts_cpu_of_processes_started_during_the_run(bench_core):
    """Usage counts a worker born after it started from zero, and the root only from its start."""
    usage = bench_core.Usage({"me": os.getpid()})
    spin = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n" \
           "print(flush=True)\nsys.stdin.read()"
    worker = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        worker.stdout.readline()  # done spinning, still alive
        used = usage.stop()
    finally:
        worker.stdin.close()
        worker.wait(timeout=10)
    assert used["cpu_s"]["me"] >= 0.5
    assert used["rss"]["me"] > 0


def test_core_bench_usage_leaves_out_an_exiting_guest_runner(bench_core, monkeypatch):
    """A runner is told apart when first seen: once it exits its command line reads empty (its memory is
    being torn down), and it was then taken for a worker born during the run, its whole CPU charged to the
    agent (the filling of its RAM: ~1.2 ms per guest MiB on the source)."""
    spin = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n" \
           "print(flush=True)\nsys.stdin.read()"
    runner = subprocess.Popen([sys.executable, "-c", spin, "migrate.guest.runner"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        runner.stdout.readline()  # its CPU is spent before the run, as a runner's filling of its RAM
        usage = bench_core.Usage({"me": os.getpid()})
        real = bench_core._is_runner
        monkeypatch.setattr(bench_core, "_is_runner", lambda pid: None if pid == runner.pid else real(pid))
        used = usage.stop()  # the runner exiting now: its command line cannot tell any more
    finally:
        runner.stdin.close()
        runner.wait(timeout=10)
    assert used["cpu_s"]["me"] < 0.4


def test_drain_bench_thread_times_count_a_threads_cpu(monkeypatch):
    """scripts/bench_drain.py --threads: a thread that burns CPU under a watched process shows with its run time."""
    import importlib
    import threading
    import time
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    bench_drain = importlib.import_module("bench_drain")
    times = bench_drain.ThreadTimes({os.getpid(): "this test"})
    burnt, done = threading.Event(), threading.Event()

    def burn() -> None:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        burnt.set()
        done.wait()  # alive until the last sample: a thread that ends between two samples loses its time

    burner = threading.Thread(target=burn)
    burner.start()
    burnt.wait()
    rows = times.stop()
    done.set()
    burner.join()
    assert sum(r["run_s"] for r in rows if r["process"] == "this test") >= 0.04, rows


@pytest.fixture
def scripts(monkeypatch):
    """scripts/ on sys.path (it is not a package): its modules import as `importlib.import_module(name)`."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))


def test_cpu_meter_counts_a_runner_any_thread_started(scripts):
    """scripts/qemu_anchor.py's CpuMeter: a guest runner an agent started from one of its gRPC threads counts
    as the guests' CPU (/proc/PID/task/PID/children lists the main thread's children only: it was missed)."""
    import importlib
    import threading

    from migrate.local import wait_for

    qemu_anchor = importlib.import_module("qemu_anchor")
    started: list[subprocess.Popen] = []
    measured = threading.Event()

    def start() -> None:
        # "migrate.guest." in its command line: what marks a runner
        started.append(subprocess.Popen([sys.executable, "-c", "while True: pass", "migrate.guest.burn"]))
        measured.wait()  # alive meanwhile, as an agent's threads are: the child of a thread that ends is the main's

    starter = threading.Thread(target=start)
    starter.start()
    try:
        wait_for(lambda: started, timeout=60)
        with qemu_anchor.CpuMeter(os.getpid(), os.getpid()) as meter:
            seen = wait_for(lambda: meter.spent_ms(os.getpid())[1] >= 50, timeout=60)
    finally:
        measured.set()
        starter.join()
        for proc in started:
            proc.kill()
            proc.wait()
    assert seen, meter.spent_ms(os.getpid())


def test_cpu_meter_keeps_an_exited_runner_the_guests(scripts):
    """CpuMeter: a runner that has exited (a zombie until its agent reaps it, its command line empty) stays the
    guests' CPU: it moved to the agent's own, making the source agent dear and its guests' CPU negative."""
    import importlib
    from pathlib import Path

    from migrate.local import wait_for

    qemu_anchor = importlib.import_module("qemu_anchor")
    burn = "import time\nend = time.process_time() + 0.1\nwhile time.process_time() < end: pass"
    runner = subprocess.Popen([sys.executable, "-c", burn, "migrate.guest.burn"])
    try:
        with qemu_anchor.CpuMeter(os.getpid(), os.getpid()) as meter:
            wait_for(lambda: meter.spent_ms(os.getpid())[1] > 0, timeout=60)  # seen alive
            wait_for(lambda: Path(f"/proc/{runner.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                     timeout=60)  # exited, not reaped: the meter's last sample sees the zombie
    finally:
        runner.wait()
    own, guests = meter.spent_ms(os.getpid())
    assert guests >= 50, (own, guests)


def test_drain_qemu_skips_without_qemu_and_prints_its_tables(scripts, monkeypatch, capsys):
    """scripts/drain_qemu.py: exit 0 with a message when QEMU or /dev/kvm is missing; its tables put each side's
    drain against its own idle reference."""
    import importlib

    drain_qemu = importlib.import_module("drain_qemu")
    monkeypatch.setattr(drain_qemu, "missing", lambda: "qemu-system-x86_64 is not installed")
    monkeypatch.setattr("sys.argv", ["drain_qemu.py", "--guests", "2", "--size", "64M"])
    assert drain_qemu.main() == 0 and "skipped: qemu-system-x86_64 is not installed" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["drain_qemu.py", "--size", "1M"])
    assert drain_qemu.main() == 2 and "error:" in capsys.readouterr().err

    cpu = {"src_own_s": 0.5, "src_guests_s": 2.0, "dst_own_s": 1.0, "dst_guests_s": 1.5}
    ref = drain_qemu.median_run([{"total_s": t, "downtime_ms": 1.0, "faults": 0, **cpu} for t in (0.9, 0.5, 0.4)])
    guests = [{"total_s": t, "downtime_ms": 2.0, "blocked_ms": 30.0, "faults": 5, "started_s": s}
              for t, s in ((0.5, 0.0), (1.0, 0.1))]
    drain = {"drain_s": 1.1, "mib_s": 128 / 1.1, "pace_before": 2e7, "pace_during": 1e7, "guests": guests,
             "slowest_per_median": 4 / 3,
             **cpu}
    monkeypatch.setattr("sys.argv", ["drain_qemu.py", "--guests", "2", "--size", "64M"])
    text = drain_qemu.tables(drain_qemu.Sides(drain_qemu.argparse.Namespace(
        guests=2, size=64 << 20, workload="hotset", vcpus=1, warmup=1.0, data_plane="", fault_path="")),
        {"QEMU post-copy": ref, "migrate (ours)": ref}, {2: {"QEMU post-copy": drain, "migrate (ours)": drain}})
    assert "| total time (median; all runs) | 0.50 s (0.90, 0.50, 0.40) | 0.50 s (0.90, 0.50, 0.40) |" in text
    assert "| of its own idle reference | 45% | 45% |" in text
    assert "| total time | 0.50 / 1.00 s | 0.50 / 1.00 s |" in text
    assert "| source CPU: VMMs or agent / vCPUs | 0.50 / 2.00 s | 0.50 / 2.00 s |" in text
    assert "| 2 | 1.10 s, 116, 45% | 1.10 s, 116, 45% |" in text
    assert "| guest pace during the drain (moved guests on the destination) | 10.0 M (50%) | 10.0 M (50%) |" in text


def test_qemu_downtime_under_a_millisecond_is_not_the_hosts_uptime(scripts):
    """QEMU 7.2 reports a post-copy switchover under 1 ms as its clock's reading (the host's uptime, hours)."""
    import importlib

    qemu_anchor = importlib.import_module("qemu_anchor")
    assert qemu_anchor.downtime_ms({"total-time": 330, "downtime": 54733579}) == 0.0
    assert qemu_anchor.downtime_ms({"total-time": 330, "downtime": 5}) == 5.0


def test_descendants_walks_every_threads_children_and_stops_where_told():
    """migrate.bench.procs.descendants, the benchmark scripts' one process-tree walk: a grandchild started from
    a child's second thread is found under its root, and not once `enter` says to stop at the child."""
    from migrate.bench.procs import descendants

    # the thread lives on (the children of a thread that ended are its main thread's)
    grandchild = "import subprocess, sys, threading\n" \
                 "def start():\n" \
                 "    print(subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], " \
                 "stdin=sys.stdin).pid, flush=True)\n" \
                 "    sys.stdin.read()\n" \
                 "t = threading.Thread(target=start); t.start(); t.join()"
    child = subprocess.Popen([sys.executable, "-c", grandchild], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        grand = int(child.stdout.readline())
        me = os.getpid()
        assert descendants([me])[child.pid] == me and descendants([me])[grand] == me
        assert child.pid in descendants([me], enter=lambda pid: pid != child.pid)
        assert grand not in descendants([me], enter=lambda pid: pid != child.pid)
    finally:
        child.stdin.close()
        child.wait(timeout=10)
