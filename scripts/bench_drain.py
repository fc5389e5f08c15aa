"""Benchmark: `migrate drain` at several --parallel, against one idle guest's rate in the same run.

    python scripts/bench_drain.py [--guests 4] [--size 256M] [--ops-per-sec 300000] [--workload hotset]
                                  [--parallel 1,2,4]
                                  [--baseline-size 1G] [--mode postcopy] [--data-plane native]
                                  [--fault-path grpc] [--warm-runners 4] [--threads] [--json out.json]

On one local source and one local destination agent (loopback): first one
idle guest of --baseline-size migrates alone (its rate over its whole run,
prepare to complete, is the reference: the drain's aggregate counts the
same; its rate after the resume is printed too), then for each --parallel,
--guests fresh `hotset` guests
are drained. Prints, per --parallel: the drain's wall time, each guest's
total and blocked time and its push rate (bulk bytes over its post-copy
time: the fairness measure), and the aggregate MiB/s (guest RAM moved over
the drain's wall time). The destination agent keeps --warm-runners guest
runners started ahead (migrate.guest.warm; WARM says which runs took one).
With --threads, every thread under the two agents (theirs and their guest
runners') is sampled during each drain from /proc/PID/task/TID/schedstat:
its CPU time and its time runnable but waiting for a CPU, summed by
process and thread name (C threads are named: dps-bulk, dpd-install,
dpd-fault...; Python threads carry their process's name).
The issue's targets, checked at the end: the
aggregate of the largest --parallel at least 80 % of the reference, no
guest's total time past 2x the median, push rates within 2x of each other.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate import orchestrator, report  # noqa: E402
from migrate.bench.procs import descendants  # noqa: E402
from migrate.client import AgentClient  # noqa: E402
from migrate.drain import Drain  # noqa: E402
from migrate.local import LocalAgent  # noqa: E402
from migrate.names import Mode  # noqa: E402
from migrate.proto import migrate_pb2 as pb  # noqa: E402
from migrate.units import parse_size  # noqa: E402

MiB = 1 << 20
#: Enough operations that a guest is still busy when its migration ends.
OPS = 2_000_000_000


def launch(src: str, name: str, size: int, workload: str, rate: float) -> None:
    busy = workload != "idle"
    spec = pb.GuestSpec(size=size, workload=workload, seed=3, ops=OPS if busy else 0, threads=1,
                        ops_per_sec=rate if busy else 0.0, page_size=mmap.PAGESIZE)
    with AgentClient(src) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec), timeout=600)


def clear(dst: str, names: list[str]) -> None:
    with AgentClient(dst) as c:
        for name in names:
            c.stop_if_hosted(name)


def agent_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of an agent: (its own threads, the children it has reaped).

    Kept apart because the reaped children are the gRPC plane's bulk servers
    and, on the source, the runners of the guests it released, whose
    workload (a hotset guest burns a core) is not the migration's cost: summed,
    they made the source look 5x dearer in a drain than in one idle run.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own, children = (sum(int(v) for v in fields[i:i + 2]) / os.sysconf("SC_CLK_TCK") for i in (11, 13))
    return own, children


def cpu_ms_per_mib(before: tuple[float, float], after: tuple[float, float], mib: float) -> dict:
    return {"own": round((after[0] - before[0]) * 1000 / mib, 2),
            "children": round((after[1] - before[1]) * 1000 / mib, 2)}


def push_mib_s(doc: dict) -> float:
    """Bulk bytes pushed over the run's post-copy time: how fast the run's own push went."""
    pushed = doc["pages"]["pushed"] * doc["pages"]["page_size"]
    return pushed / MiB / doc["transfer_s"] if doc["transfer_s"] else 0.0


def run_options(args: argparse.Namespace) -> orchestrator.RunOptions:
    return orchestrator.RunOptions(mode=args.mode, timeout=600, data_plane=args.data_plane, fault_path=args.fault_path)


def own_cpu_ms(agents: tuple[LocalAgent, LocalAgent]) -> float:
    """Both agents' own CPU (their threads, not their reaped children), in ms."""
    return sum(agent_cpu_s(a.pid)[0] for a in agents) * 1000


def baseline(src: LocalAgent, dst: LocalAgent, args: argparse.Namespace) -> tuple[float, float, float]:
    """One idle guest alone: (MiB/s after the resume, the issue's reference; MiB/s over its whole run;
    both agents' own CPU ms per MiB, what a drain's pages cost without faults)."""
    size = args.baseline_size
    launch(src.address, "baseline", size, "idle", 0.0)
    try:
        cpu0 = own_cpu_ms((src, dst))
        doc = orchestrator.migrate("baseline", src.address, dst.address, run_options(args))
        cpu_ms_per_mib = (own_cpu_ms((src, dst)) - cpu0) / (size / MiB)
    finally:
        clear(dst.address, ["baseline"])
    return report.transfer_mib_s(doc), size / MiB / doc["total_s"], cpu_ms_per_mib


class ThreadTimes:
    """Who got the CPUs during a drain: run and wait seconds of every thread under the agents.

    Sampled every `every` s (a thread that ends between two samples loses
    at most that much), summed by (process, thread name); the agents are
    named by role, their children (guest runners) by their command name.
    """

    def __init__(self, agents: dict[int, str], every: float = 0.05) -> None:
        self._agents = agents
        self._first = self._sample()
        self._last = dict(self._first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True, name="thread-times")
        self._thread.start()

    def _processes(self) -> dict[int, str]:
        """The agents and their descendants, each with the name it is summed under ("": its command's)."""
        return {pid: self._agents.get(pid, "") for pid in descendants(self._agents)}

    def _sample(self) -> dict[tuple[int, int], tuple[str, str, int, int]]:
        out = {}
        for pid, role in self._processes().items():
            try:
                tids = os.listdir(f"/proc/{pid}/task")
                role = role or Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            for tid in tids:
                try:
                    comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                    run_ns, wait_ns = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2])
                except (OSError, ValueError):
                    continue
                out[(pid, int(tid))] = (role, comm.rstrip("0123456789"), run_ns, wait_ns)
        return out

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self._last.update(self._sample())

    def stop(self) -> list[dict]:
        """Rows (process, thread, threads, run_s, wait_s), the largest run first."""
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())
        sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        for key, (role, comm, run_ns, wait_ns) in self._last.items():
            run0, wait0 = self._first[key][2:] if key in self._first else (0, 0)
            row = sums[(role, comm)]
            row[0] += 1
            row[1] += (run_ns - run0) / 1e9
            row[2] += (wait_ns - wait0) / 1e9
        rows = [{"process": role, "thread": comm, "threads": n, "run_s": round(run, 3), "wait_s": round(wait, 3)}
                for (role, comm), (n, run, wait) in sums.items()]
        return sorted(rows, key=lambda r: -r["run_s"])


def drain_once(src: LocalAgent, dst: LocalAgent, args: argparse.Namespace, parallel: int) -> dict:
    names = [f"p{parallel}g{i}" for i in range(args.guests)]
    for name in names:
        launch(src.address, name, args.size, args.workload, args.ops_per_sec)
    time.sleep(args.warmup)
    cpu0 = agent_cpu_s(src.pid), agent_cpu_s(dst.pid)
    times = ThreadTimes({src.pid: "source agent", dst.pid: "destination agent"}) if args.threads else None
    t0 = time.monotonic()
    try:
        outcomes = Drain(src.address, [dst.address], run_options(args), parallel=parallel).run()
    finally:
        wall = time.monotonic() - t0
        threads = times.stop() if times else []
        mib = args.guests * args.size / MiB
        cpu = [cpu_ms_per_mib(c0, agent_cpu_s(a.pid), mib) for a, c0 in zip((src, dst), cpu0)]
        clear(dst.address, names)
    rows = [{"guest": o.name, "moved": o.moved, "error": o.error,
             **({"total_s": o.report["total_s"], "blocked_ms": o.report["guest"]["blocked_ms"],
                 "push_mib_s": round(push_mib_s(o.report), 1), "prepare_ms": o.report["timings_ms"]["prepare"],
                 "finish_s": o.report["precopy"]["stamps"].get("finish", 0.0), "warm": o.report["warm_runner"],
                 "faults": o.report["pages"]["faulted"], "fault_count": o.report["faults"]["count"],
                 "duplicates": o.report["pages"]["duplicates"],
                 "asked_in_flight": o.report["faults"].get("asked_in_flight", 0),
                 "switchover_s": o.report["switchover_s"], "transfer_s": o.report["transfer_s"],
                 "started_s": round(o.started - t0, 3)} if o.moved else {})} for o in outcomes]
    return {"parallel": parallel, "wall_s": round(wall, 3),
            "aggregate_mib_s": round(args.guests * args.size / MiB / wall, 1),
            "cpu_ms_per_mib": {"source_agent": cpu[0], "dest_agent": cpu[1]}, "guests": rows, "threads": threads}


def verdict(result: dict, reference: float, after_resume: float) -> list[str]:
    """The issue's targets for one --parallel, as lines saying met or missed (`reference`: the idle guest's
    rate over its whole run)."""
    moved = [g for g in result["guests"] if g["moved"]]
    totals = [g["total_s"] for g in moved]
    rates = [g["push_mib_s"] for g in moved if g["push_mib_s"]]
    lines = []
    if totals:
        worst = max(totals) / statistics.median(totals)
        lines.append(f"slowest guest {worst:.2f}x the median total (target <= 2)")
    if rates:
        lines.append(f"push rates {min(rates):.0f}-{max(rates):.0f} MiB/s, {max(rates) / min(rates):.2f}x apart "
                     f"(target <= 2)")
    agg = result["aggregate_mib_s"]
    resumed = f"; {agg / after_resume:.0%} of its {after_resume:.0f} MiB/s after the resume" if after_resume else ""
    lines.append(f"aggregate {agg:.0f} MiB/s = {agg / reference:.0%} of one idle guest's {reference:.0f} MiB/s over "
                 f"its whole run (target >= 80 % at the largest --parallel{resumed})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--size", type=parse_size, default="256M")
    ap.add_argument("--ops-per-sec", type=float, default=300_000)
    ap.add_argument("--workload", default="hotset",
                    help="The drained guests' workload (idle: the cost of running migrations at once, no faults).")
    ap.add_argument("--parallel", default="1,2,4")
    ap.add_argument("--baseline-size", type=parse_size, default="1G")
    ap.add_argument("--mode", choices=list(Mode), default="postcopy")
    ap.add_argument("--data-plane", choices=["native", "grpc"], default="native")
    ap.add_argument("--fault-path", choices=["grpc", "native"], default="grpc",
                    help="The urgent path: grpc (the default of a run), or native (needs the native plane).")
    ap.add_argument("--warm-runners", type=int, default=4,
                    help="Runners the destination agent keeps started ahead (its --warm-runners; 0: none).")
    ap.add_argument("--warmup", type=float, default=1.0, help="Seconds the guests run before the drain.")
    ap.add_argument("--threads", action="store_true",
                    help="Print each drain's CPU and runqueue wait per thread of the agents and guests.")
    ap.add_argument("--json", default=None, help="Write the results here.")
    args = ap.parse_args()
    logs = tempfile.mkdtemp(prefix="bench-drain-")
    results = []
    with LocalAgent("source", log_path=f"{logs}/source.log") as src, \
            LocalAgent("dest", "--warm-runners", str(args.warm_runners), log_path=f"{logs}/dest.log") as dst:
        after_resume, reference, idle_cpu = baseline(src, dst, args)
        print(f"one idle {args.baseline_size // MiB} MiB guest alone: {after_resume:.0f} MiB/s after the resume, "
              f"{reference:.0f} MiB/s over its whole run (prepare to complete; the drain's aggregate counts the same); "
              f"agents' own CPU {idle_cpu:.2f} ms/MiB")
        for parallel in (int(p) for p in args.parallel.split(",")):
            result = drain_once(src, dst, args, parallel)
            results.append(result)
            print(f"\n--parallel {parallel}: drained {args.guests} x {args.size // MiB} MiB "
                  f"in {result['wall_s']:.2f} s")
            print(f"  {'GUEST':10} {'START':>7} {'PREPARE':>9} {'WARM':>4} {'RESUMED':>8} {'TRANSFER':>9} "
                  f"{'TOTAL':>8} {'BLOCKED':>9} {'FAULTED':>8} {'PUSH':>11} {'FINISH':>7}")
            for g in result["guests"]:
                if g["moved"]:
                    print(f"  {g['guest']:10} {g['started_s']:6.2f}s {g['prepare_ms']:7.0f}ms "
                          f"{'yes' if g['warm'] else 'no':>4} {g['switchover_s'] or 0:7.2f}s "
                          f"{g['transfer_s']:8.2f}s {g['total_s']:7.2f}s {g['blocked_ms']:7.0f}ms {g['faults']:8d} "
                          f"{g['push_mib_s']:6.0f} MiB/s {g['finish_s']:6.2f}s")
                else:
                    print(f"  {g['guest']:10} not moved: {g['error']}")
            cpu = result["cpu_ms_per_mib"]
            print(f"  agents' CPU (ms/MiB, own + reaped children): source {cpu['source_agent']['own']:.2f} + "
                  f"{cpu['source_agent']['children']:.2f}, destination {cpu['dest_agent']['own']:.2f} + "
                  f"{cpu['dest_agent']['children']:.2f}")
            moved = [g for g in result["guests"] if g["moved"]]
            print(f"  faults {sum(g['fault_count'] for g in moved)}, of them on a page deep in the bulk's window "
                  f"(asked at once) {sum(g['asked_in_flight'] for g in moved)}; pages that came twice "
                  f"{sum(g['duplicates'] for g in moved)} of {len(moved) * args.size // mmap.PAGESIZE}")
            faults = sum(g["faults"] for g in moved)
            beyond = (cpu["source_agent"]["own"] + cpu["dest_agent"]["own"] - idle_cpu) * args.guests * args.size / MiB
            result["cpu_ms_per_fault"] = round(beyond / faults, 3) if faults else None
            if faults:
                print(f"  agents' own CPU beyond the idle guest's per MiB: {beyond:.0f} ms, "
                      f"{beyond / faults * 1000:.0f} µs per faulted page ({faults} faults)")
            if result["threads"]:
                print(f"  threads (CPU and runqueue wait, s, over {result['wall_s']:.2f} s on {os.cpu_count()} CPUs; "
                      f"at least 5 ms):")
                for t in result["threads"]:
                    if max(t["run_s"], t["wait_s"]) >= 0.005:
                        print(f"    {t['process']:18} {t['thread']:16} {t['threads']:3d} {t['run_s']:7.3f} "
                              f"{t['wait_s']:7.3f}")
            for line in verdict(result, reference, after_resume):
                print(f"  {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reference_mib_s": reference, "after_resume_mib_s": after_resume,
                       "idle_cpu_ms_per_mib": idle_cpu, "args": {k: v for k, v in vars(args).items() if k != "json"},
                       "results": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
