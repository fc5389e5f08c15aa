#!/usr/bin/env python3
"""A drain next to QEMU's: N guests moved post-copy over loopback, at most P at a time, by QEMU and by ours.

The anchor of issue 16's drain target on this machine. Both sides run the
very same guests: the kvm guest kind's image (migrate/guest/kvm_image.bin),
--guests of --size each, --workload (default hotset: 90 % of its ops on a
tenth of its RAM, as bench_drain's guests, but unthrottled: the image has
no pacing, so each vCPU burns a core on both sides), 1 vCPU, seed i+1 for
guest i (--workload idle: no ops, the vCPUs stopped as the reference's
below: what concurrency costs without guests competing for the CPU).
QEMU: each guest in its own source/destination pair of
`qemu-system-x86_64` processes (the destinations started ahead, waiting
for the stream, as our destination keeps warm runners), at most P
migrating at once, each straight to post-copy (no preempt). Ours: one
source and one destination agent, `migrate drain`'s Drain with --parallel
P and the guests of the kvm kind.

Each side's reference, in the same run: one idle guest of N x --size
migrated alone, --reference-runs times (the median run counts) (the image with no ops: its RAM filled, then nothing; its
vCPU runs on neither side during the migration: QEMU's source is stopped
and its destination started with -S, since the image's vCPU spins once
done, and our VMM no longer runs a finished vCPU). Its rate is guest RAM
over the run's total time (QEMU: query-migrate's total-time; ours: the
report's total_s, prepare to complete).

Per P and side: the drain time (the first run's start to the last run's
end), the aggregate MiB/s (guest RAM moved over that), its ratio to the
side's own reference, each guest's total time, downtime and blocked time
(QEMU: postcopy-vcpu-blocktime, summed over the vCPUs), its remote faults,
and both hosts' CPU seconds over the drain: the VMM processes or agents
(helpers included) apart from the guests' vCPUs (QEMU's vCPU threads; our
guest runners), the vCPUs of the guests waiting on the source and of those
already moved included. The guests' pace (ops/s) before the drain and
during it (from its start to the last run's end, the guests' ops read on
the destination then) says how much CPU the vCPUs got: QEMU and ours
share two cores differently between the guests and the transfer.

Exits 0 with a message when QEMU or /dev/kvm is missing; every QEMU
process and agent it started is ended by PID on the way out (Ctrl-C and
SIGTERM too), its temporary directories removed.

    python scripts/drain_qemu.py [--guests 4] [--size 256M] [--parallel 1,2,4] [--workload hotset]
                                 [--warmup 1] [--data-plane native] [--fault-path grpc] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from migrate import orchestrator
from migrate.bench.runs import run_options
from migrate.client import AgentClient
from migrate.drain import Drain
from migrate.local import LocalAgent, wait_for
from migrate.proto import migrate_pb2 as pb
from migrate.units import parse_size

sys.path.insert(0, str(Path(__file__).resolve().parent))  # qemu_anchor beside it (python -P leaves it out)
from qemu_anchor import (  # noqa: E402
    CpuMeter,
    KvmImageGuest,
    MiB,
    QemuPair,
    add_our_options,
    downtime_ms,
    missing,
    qemu_blocked,
    skipped,
)

#: Ops enough that a guest is still busy when the slowest drain ends (never waited for).
OPS = 10**13
#: Seconds between two query-migrate of a QEMU run: a finished run makes room for the next this late at most.
POLL = 0.01


class Sides:
    """Both sides' settings, from the command line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.guests, self.size, self.workload, self.vcpus = args.guests, args.size, args.workload, args.vcpus
        self.busy = args.workload != "idle"  # idle: no ops, the vCPUs stopped as the reference's
        self.warmup = args.warmup
        self.opts = run_options("postcopy", "", args.data_plane)
        self.opts.fault_path = args.fault_path or self.opts.fault_path
        self.opts.timeout = 600
        self.drained(), self.idle()  # each guest checks its spec: ValueError

    def drained(self) -> list[KvmImageGuest]:
        ops = OPS if self.busy else 0
        return [KvmImageGuest(self.size, self.workload, self.vcpus, ops, seed) for seed in range(1, self.guests + 1)]

    def idle(self) -> KvmImageGuest:
        return KvmImageGuest(self.guests * self.size, "idle", self.vcpus, 0, 1)

    @property
    def mib(self) -> float:
        return self.guests * self.size / MiB


def _cpu(meter: CpuMeter, src: list[int], dst: list[int]) -> dict:
    """Both hosts' CPU seconds over the meter's span: the VMMs or agents, and the guests' vCPUs."""
    (src_own, src_guests), (dst_own, dst_guests) = meter.spent_ms(*src), meter.spent_ms(*dst)
    return {"src_own_s": src_own / 1e3, "src_guests_s": src_guests / 1e3,
            "dst_own_s": dst_own / 1e3, "dst_guests_s": dst_guests / 1e3}


def _qemu_row(info: dict, dinfo: dict) -> dict:
    return {"total_s": info.get("total-time", 0) / 1e3, "downtime_ms": downtime_ms(info),
            "blocked_ms": qemu_blocked(dinfo)["blocked_ms"],
            "faults": info.get("ram", {}).get("postcopy-requests", 0)}


def _ours_row(doc: dict) -> dict:
    return {"total_s": doc["total_s"], "downtime_ms": doc["downtime_ms"],
            "blocked_ms": float(sum(doc["guest"]["vcpu_blocked_ms"])), "faults": doc["faults"]["count"],
            "stages_s": {"prepare": doc["timings_ms"]["prepare"] / 1e3, "switchover": doc["switchover_s"],
                         "transfer": doc["transfer_s"]}, "warm": doc["warm_runner"]}  # the JSON's: where the time went


# ------------------------------------------------------------------ QEMU
def qemu_reference(sides: Sides) -> dict:
    """One idle guest of all the drained RAM, alone, its vCPU stopped."""
    guest = sides.idle()
    with tempfile.TemporaryDirectory(prefix="drain-qemu-") as tmp, QemuPair(guest, tmp, stopped=True) as pair:
        guest.wait_booted(tmp, pair.src_qmp)
        pair.stop()
        with CpuMeter(pair.src.pid, pair.dst.pid) as meter:
            info, dinfo = pair.migrate(POLL)
        return {**_qemu_row(info, dinfo), **_cpu(meter, [pair.src.pid], [pair.dst.pid])}


def qemu_drain(sides: Sides, parallel: int) -> dict:
    """The guests in their own QEMU pairs, at most `parallel` migrating at once."""
    guests = sides.drained()
    with tempfile.TemporaryDirectory(prefix="drain-qemu-") as tmp, ExitStack() as stack:
        pairs = []
        for i, guest in enumerate(guests):
            os.mkdir(os.path.join(tmp, f"g{i}"))
            pairs.append(stack.enter_context(QemuPair(guest, os.path.join(tmp, f"g{i}"), stopped=not sides.busy)))
        for guest, pair in zip(guests, pairs):
            guest.wait_booted(pair.tmp, pair.src_qmp)
            if not sides.busy:
                pair.stop()  # before the drain: a guest waiting its turn would spin meanwhile
        pace = Pace(lambda: sum(g.qemu_ops(p.tmp, "source", p.src_qmp) for g, p in zip(guests, pairs)), sides)

        def one(pair: QemuPair) -> tuple[float, dict]:
            started = time.monotonic()
            return started, _qemu_row(*pair.migrate(POLL))

        src, dst = [p.src.pid for p in pairs], [p.dst.pid for p in pairs]
        pool = ThreadPoolExecutor(parallel, thread_name_prefix="qemu-run")
        with CpuMeter(*src, *dst) as meter:
            try:
                runs = [f.result() for f in [pool.submit(one, p) for p in pairs]]
            finally:
                pool.shutdown(wait=False, cancel_futures=True)  # on an error the pairs' end stops the others
        pace.mark(sum(g.qemu_ops(p.tmp, "dest", p.dst_qmp) for g, p in zip(guests, pairs)))
        t0 = min(started for started, _ in runs)
        rows = [{**row, "started_s": started - t0} for started, row in runs]
        return _drain_result(sides, rows, max(r["started_s"] + r["total_s"] for r in rows), pace,
                             _cpu(meter, src, dst))


# ------------------------------------------------------------------ ours
def _launch(agent: LocalAgent, name: str, guest: KvmImageGuest) -> None:
    with AgentClient(agent.address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=guest.ours_spec()), timeout=600)


def _inspect(agent: LocalAgent, name: str) -> pb.GuestInfo:
    with AgentClient(agent.address) as c:
        return c.call("InspectGuest", pb.GuestRef(name=name))


def _clear(agents: tuple[LocalAgent, LocalAgent], names: list[str]) -> None:
    """Stop the guests wherever they are (moved, or left on the source by an error)."""
    for agent in agents:
        with AgentClient(agent.address) as c:
            for name in names:
                c.stop_if_hosted(name)


def _wait_ready(agent: LocalAgent, name: str, busy: bool) -> None:
    """Until the guest has filled its RAM and done its first ops (no ops: until its digest, once filled)."""
    if not wait_for(lambda: _inspect(agent, name).ops_done > 0 if busy else _inspect(agent, name).guest_digest,
                    timeout=600):
        raise RuntimeError(f"our guest {name} did not fill its RAM and start within 600 s")


def ours_reference(src: LocalAgent, dst: LocalAgent, sides: Sides) -> dict:
    """One idle guest of all the drained RAM, alone: its digest said, its (finished) vCPU no longer runs."""
    _launch(src, "reference", sides.idle())
    try:
        _wait_ready(src, "reference", busy=False)
        with CpuMeter(src.pid, dst.pid) as meter:
            doc = orchestrator.migrate("reference", src.address, dst.address, sides.opts)
        return {**_ours_row(doc), **_cpu(meter, [src.pid], [dst.pid])}
    finally:
        _clear((src, dst), ["reference"])


def ours_drain(src: LocalAgent, dst: LocalAgent, sides: Sides, parallel: int) -> dict:
    """The same guests under the source agent, drained by `migrate drain`'s Drain."""
    names = [f"p{parallel}g{i}" for i in range(sides.guests)]
    try:
        for name, guest in zip(names, sides.drained()):
            _launch(src, name, guest)
        for name in names:
            _wait_ready(src, name, sides.busy)
        pace = Pace(lambda: sum(_inspect(src, n).ops_done for n in names), sides)
        with CpuMeter(src.pid, dst.pid) as meter:
            outcomes = Drain(src.address, [dst.address], sides.opts, parallel=parallel).run()
        pace.mark(sum(_inspect(dst, n).ops_done for n in names))
        failed = [f"{o.name}: {o.error}" for o in outcomes if not o.moved]
        if failed:
            raise RuntimeError(f"our drain did not move {'; '.join(failed)}")
        start = min(o.started for o in outcomes)
        rows = [{**_ours_row(o.report), "started_s": o.started - start} for o in outcomes]
        return _drain_result(sides, rows, max(o.ended for o in outcomes) - start, pace,
                             _cpu(meter, [src.pid], [dst.pid]))
    finally:
        _clear((src, dst), names)


# ------------------------------------------------------------------ both
class Pace:
    """The guests' ops per second, each guest's mean: over the warm-up (`count` read before and after
    it), then from there to the drain's end (mark(): the ops of the moved guests): how much of the CPU
    their vCPUs got, before and while their RAM moved."""

    def __init__(self, count: Callable[[], int], sides: Sides) -> None:
        self.guests = sides.guests
        self.marks: list[tuple[float, int]] = []
        self.mark(count())
        time.sleep(sides.warmup)
        self.mark(count())

    def mark(self, ops: int) -> None:
        self.marks.append((time.monotonic(), ops))

    def rates(self) -> dict[str, float]:
        (t0, o0), (t1, o1), (t2, o2) = self.marks
        return {"pace_before": (o1 - o0) / (t1 - t0) / self.guests, "pace_during": (o2 - o1) / (t2 - t1) / self.guests}


def _drain_result(sides: Sides, rows: list[dict], wall: float, pace: Pace, cpu: dict) -> dict:
    rows = sorted(rows, key=lambda r: r["started_s"])
    return {"drain_s": wall, "mib_s": sides.mib / wall, **pace.rates(), "guests": rows,
            "slowest_per_median": max(r["total_s"] for r in rows) / statistics.median(r["total_s"] for r in rows),
            **cpu}


def median_run(runs: list[dict]) -> dict:
    """The run of the median total time (the upper one of an even count), with every run's total beside it."""
    ranked = sorted(runs, key=lambda r: r["total_s"])
    return {**ranked[len(ranked) // 2], "all_total_s": ", ".join(f"{r['total_s']:.2f}" for r in runs)}


def _each(rows: list[dict], key: str, fmt: str) -> str:
    return " / ".join(fmt.format(r[key]) for r in rows)


def tables(sides: Sides, refs: dict[str, dict], drains: dict[int, dict[str, dict]]) -> str:
    """The references, one table per --parallel, and the summary across them."""
    ref_mib_s = {side: sides.mib / ref["total_s"] for side, ref in refs.items()}
    out = [f"reference: one idle {sides.mib:.0f} MiB kvm guest alone (RAM filled, no ops; its vCPU runs on"
           " neither side), the run of the median total time", "",
           "| | " + " | ".join(refs) + " |", "|---|" + "---|" * len(refs)]
    for label, fmt in (("total time (median; all runs)", "{total_s:.2f} s ({all_total_s})"),
                       ("downtime", "{downtime_ms:.1f} ms"), ("remote faults", "{faults}"),
                       ("source CPU: VMM or agent / vCPU", "{src_own_s:.2f} / {src_guests_s:.2f} s"),
                       ("destination CPU: VMM or agent / vCPU", "{dst_own_s:.2f} / {dst_guests_s:.2f} s")):
        out.append(f"| {label} | " + " | ".join(fmt.format(**ref) for ref in refs.values()) + " |")
    out.append("| MiB/s (guest RAM over total time) | "
               + " | ".join(f"{ref_mib_s[side]:.0f}" for side in refs) + " |")
    for parallel, sides_done in drains.items():
        names = list(sides_done)
        doing = f"{sides.workload} unthrottled" if sides.busy else "idle (RAM filled, no ops; vCPUs not running)"
        out += ["", f"--parallel {parallel}: {sides.guests} x {sides.size // MiB} MiB kvm guests, {doing},"
                f" {sides.vcpus} vCPU(s) each (guests in start order)", "",
                "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        rows = [("drain time (first start to last end)", lambda d, s: f"{d['drain_s']:.2f} s"),
                ("aggregate MiB/s", lambda d, s: f"{d['mib_s']:.0f}"),
                ("of its own idle reference", lambda d, s: f"{d['mib_s'] / ref_mib_s[s]:.0%}"),
                ("guest pace before, ops/s each", lambda d, s: f"{d['pace_before'] / 1e6:.1f} M"),
                ("guest pace during the drain (moved guests on the destination)",
                 lambda d, s: f"{d['pace_during'] / 1e6:.1f} M"
                 + (f" ({d['pace_during'] / d['pace_before']:.0%})" if d["pace_before"] else "")),
                ("started at", lambda d, s: _each(d["guests"], "started_s", "{:.2f}") + " s"),
                ("total time", lambda d, s: _each(d["guests"], "total_s", "{:.2f}") + " s"),
                ("slowest / median total", lambda d, s: f"{d['slowest_per_median']:.2f}x"),
                ("downtime", lambda d, s: _each(d["guests"], "downtime_ms", "{:.0f}") + " ms"),
                ("blocked (vCPUs summed)", lambda d, s: _each(d["guests"], "blocked_ms", "{:.0f}") + " ms"),
                ("remote faults, all guests", lambda d, s: f"{sum(r['faults'] for r in d['guests'])}"),
                ("source CPU: VMMs or agent / vCPUs", lambda d, s: f"{d['src_own_s']:.2f} / {d['src_guests_s']:.2f} s"),
                ("destination CPU: VMMs or agent / vCPUs",
                 lambda d, s: f"{d['dst_own_s']:.2f} / {d['dst_guests_s']:.2f} s")]
        for label, cell in rows:
            out.append(f"| {label} | " + " | ".join(cell(sides_done[s], s) for s in names) + " |")
    names = list(refs)
    out += ["", "| --parallel | " + " | ".join(f"{s}: drain, MiB/s, of idle" for s in names) + " |",
            "|---|" + "---|" * len(names)]
    out.append("| idle reference | " + " | ".join(f"{refs[s]['total_s']:.2f} s, {ref_mib_s[s]:.0f}, 100 %"
                                                   for s in names) + " |")
    for parallel, sides_done in drains.items():
        out.append(f"| {parallel} | " + " | ".join(
            f"{d['drain_s']:.2f} s, {d['mib_s']:.0f}, {d['mib_s'] / ref_mib_s[s]:.0%}"
            for s, d in sides_done.items()) + " |")
    return "\n".join(out)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the `with` blocks and `finally` clauses end every process started."""
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", type=int, default=4, help="guests drained (default 4)")
    ap.add_argument("--size", default="256M", help="each guest's RAM (default 256M)")
    ap.add_argument("--parallel", default="1,2,4", help="runs at once, comma-separated (default 1,2,4)")
    ap.add_argument("--workload", default="hotset", help="the drained guests' workload (default hotset)")
    ap.add_argument("--vcpus", type=int, default=1, help="each guest's vCPUs (default 1)")
    ap.add_argument("--reference-runs", type=int, default=3,
                    help="idle reference runs per side, the median's the reference (default 3; one run on a busy"
                         " machine can be off by half)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds the guests run before each drain")
    add_our_options(ap)
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    try:
        args.size = parse_size(args.size)
        parallels = [int(p) for p in args.parallel.split(",")]
        if min(args.guests, args.reference_runs, *parallels) < 1:
            raise ValueError("--guests, --parallel and --reference-runs must be at least 1")
        sides = Sides(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if skipped(missing()):
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    refs: dict[str, dict] = {}
    drains: dict[int, dict[str, dict]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="drain-ours-") as logs, \
                LocalAgent("source", log_path=f"{logs}/source.log") as src, \
                LocalAgent("dest", "--warm-runners", str(args.guests), log_path=f"{logs}/dest.log") as dst:
            refs["QEMU post-copy"] = median_run([qemu_reference(sides) for _ in range(args.reference_runs)])
            refs["migrate (ours)"] = median_run([ours_reference(src, dst, sides) for _ in range(args.reference_runs)])
            for parallel in parallels:
                drains[parallel] = {"QEMU post-copy": qemu_drain(sides, parallel),
                                    "migrate (ours)": ours_drain(src, dst, sides, parallel)}
                print(f"--parallel {parallel} done", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(tables(sides, refs, drains))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"}, "references": refs,
                       "drains": {str(p): d for p, d in drains.items()}}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
