"""Benchmark: postcopy vs hybrid vs precopy, side by side in one run.

    python scripts/bench_modes.py [--size 1G] [--repeat 3] [--workloads random-write,hotset]
                                  [--dirty-rates 1,10,50,max] [--data-planes native,grpc] [--verify]
                                  [--rounds] [--json out.json]

The issue's case (issue 11, item 6), a hotset guest at 200000 ops/s:

    python scripts/bench_modes.py --size 512M --workloads hotset --dirty-rates ops200000 --rounds

For each workload, dirty rate and mode, a fresh guest runs on a local source
agent for --warmup seconds, then migrates to a local destination agent over
loopback. A dirty rate is the share of RAM the guest writes per second
(one op writes one page: --ops-per-sec = rate x pages), as users run
guests; "opsN" runs the guest at N ops/s; "max" is an unthrottled guest
writing as fast as one thread can. Modes alternate within each repetition
so drift of a shared machine hits them alike. Prints one row per (workload, mode) with medians
over the repetitions: total time, downtime, bytes on the wire, pages
faulted, guest blocked time, and the guest's throughput during the
migration as a fraction of its throughput before. --rounds also prints
each run's pre-copy rounds (pages sent, seconds, pages dirtied meanwhile),
why it switched and how many pages were left for post-copy.
"""
from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate import orchestrator  # noqa: E402
from migrate.client import AgentClient  # noqa: E402
from migrate.local import LocalAgent  # noqa: E402
from migrate.names import Mode  # noqa: E402
from migrate.planes import DataPlane  # noqa: E402
from migrate.proto import migrate_pb2 as pb  # noqa: E402
from migrate.units import parse_size  # noqa: E402

MiB = 1 << 20
#: Enough operations that an unthrottled guest is still busy when the migration ends.
OPS = 2_000_000_000


def ops_per_sec(rate: str, size: int) -> float:
    """A dirty rate ("10": 10 % of RAM per second; "ops5000": 5000 ops/s; "max": unthrottled) as the guest's ops/s."""
    if rate.startswith("ops"):
        return float(rate[3:])
    return 0.0 if rate == "max" else float(rate) / 100 * (size // mmap.PAGESIZE)


def rate_label(rate: str) -> str:
    return rate if rate == "max" or rate.startswith("ops") else rate + "%"


def one_run(src: str, dst: str, name: str, size: int, workload: str, rate: str, mode: str, warmup: float,
            plane: str = "", verify: bool = False, rounds: int = 10) -> dict:
    spec = pb.GuestSpec(size=size, workload=workload, seed=5, ops=OPS, threads=1,
                        ops_per_sec=ops_per_sec(rate, size), page_size=mmap.PAGESIZE)
    with AgentClient(src) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec), timeout=600)
    time.sleep(warmup)
    try:
        doc = orchestrator.migrate(name, src, dst, orchestrator.RunOptions(mode=mode, timeout=600, data_plane=plane,
                                                                           verify=verify, precopy_rounds=rounds))
    finally:
        for agent in (dst, src):
            with AgentClient(agent) as c:
                c.stop_if_hosted(name)
    g = doc["guest"]
    return {"total_s": doc["total_s"], "downtime_ms": doc["downtime_ms"], "wire_mib": doc["bytes"]["wire"] / MiB,
            "faulted": doc["pages"]["faulted"], "blocked_ms": g["blocked_ms"],
            "throughput": g["ops_per_s_during"] / g["ops_per_s_before"] if g["ops_per_s_before"] else 0.0,
            "rounds": len(doc["precopy"]["rounds"]), "parts": doc["downtime_parts"],
            "switch_reason": doc["precopy"].get("switch_reason", ""), "precopy": doc["precopy"],
            "postcopy_pages": doc["pages"]["total"] - doc["pages"]["before_resume"],
            "verified": doc.get("verified"), "postcopy_s": doc["transfer_s"]}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(results: dict[tuple[str, str, str], list[dict]]) -> str:
    head = (f"{'workload':13} {'dirty/s':>9} {'plane':6} {'mode':9} {'total s':>8} {'downtime ms':>12} "
            f"{'(min-max)':>14} {'wire MiB':>9} {'faulted':>8} {'blocked ms':>11} {'tput':>6} {'rounds':>6}")
    lines = [head, "-" * len(head)]
    for (workload, rate, plane, mode), rows in results.items():
        dts = [r["downtime_ms"] for r in rows]
        lines.append(f"{workload:13} {rate_label(rate):>9} {plane:6} {mode:9} {median(rows, 'total_s'):8.2f} "
                     f"{median(rows, 'downtime_ms'):12.2f} {f'({min(dts):.1f}-{max(dts):.1f})':>14} "
                     f"{median(rows, 'wire_mib'):9.0f} "
                     f"{median(rows, 'faulted'):8.0f} {median(rows, 'blocked_ms'):11.1f} "
                     f"{median(rows, 'throughput'):6.2f} {median(rows, 'rounds'):6.0f}")
    return "\n".join(lines)


def rounds_text(row: dict) -> str:
    """One run's pre-copy rounds, why it switched and what post-copy had left."""
    pre = row["precopy"]
    lines = [f"    steps (s): {pre.get('stamps', {})}"]
    lines += [f"    round {r['round']}: sent {r['sent']} pages in {r['seconds']:.3f} s "
              f"({r['wall_s']:.3f} s with its scan), {r['dirty']} dirtied meanwhile ({r['dirty_rate']:.0f}/s)"
              for r in pre["rounds"]]
    lines += [f"    settle: dropped {s['discarded']}, then {s['dirty']} dirty" for s in pre.get("settle", [])]
    if pre.get("switch_reason"):
        lines.append(f"    switched: {pre['switch_reason']}")
    lines.append(f"    downtime parts {row['parts']}; left for post-copy: {row['postcopy_pages']} pages, "
                 f"faulted {row['faulted']}; pre-copy {sum(r['seconds'] for r in pre['rounds']):.2f} s, "
                 f"post-copy {row['postcopy_s']:.2f} s of {row['total_s']:.2f} s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds the guest runs before migrating")
    ap.add_argument("--workloads", default="random-write,hotset")
    ap.add_argument("--dirty-rates", default="1,10,50,max",
                    help="percent of RAM the guest writes per second, or max (unthrottled)")
    ap.add_argument("--modes", default=",".join(Mode))
    ap.add_argument("--json", help="also write every run's numbers here")
    ap.add_argument("--data-planes", default=",".join(p.value for p in DataPlane),
                    help="the data planes, comma-separated")
    ap.add_argument("--verify", action="store_true", help="check every migrated guest's memory (migrate run --verify)")
    ap.add_argument("--rounds", action="store_true", help="print each run's pre-copy rounds")
    ap.add_argument("--precopy-rounds", type=int, default=orchestrator.RunOptions.precopy_rounds,
                    help="most pre-copy rounds (migrate run --precopy-rounds)")
    args = ap.parse_args()
    size = parse_size(args.size)
    workloads, rates, modes = args.workloads.split(","), args.dirty_rates.split(","), args.modes.split(",")
    data_planes = args.data_planes.split(",")
    for rate in rates:
        number = rate[3:] if rate.startswith("ops") else rate
        if rate != "max" and not number.replace(".", "", 1).isdigit():
            ap.error(f"--dirty-rates: {rate!r} is neither a percentage, opsN nor max")
    for plane in data_planes:
        if plane not in {p.value for p in DataPlane}:
            ap.error(f"--data-planes: unknown plane {plane!r}")
    results: dict[tuple[str, str, str, str], list[dict]] = {
        (w, r, p, m): [] for w in workloads for r in rates for p in data_planes for m in modes}
    with tempfile.TemporaryDirectory(prefix="bench-modes-") as tmp, \
            LocalAgent("source", log_path=f"{tmp}/source.log") as src, \
            LocalAgent("dest", log_path=f"{tmp}/dest.log") as dst:
        for rep in range(args.repeat):
            for workload, rate, plane, mode in results:
                row = one_run(src.address, dst.address, f"b{rep}-{workload}-{rate}-{plane}-{mode}", size, workload,
                              rate, mode, args.warmup, plane, args.verify, args.precopy_rounds)
                results[(workload, rate, plane, mode)].append(row)
                print(f"[{rep + 1}/{args.repeat}] {workload:13} {rate:>4} {plane:6} {mode:9} total "
                      f"{row['total_s']:.2f} s, downtime {row['downtime_ms']:.2f} ms, "
                      f"blocked {row['blocked_ms']:.0f} ms"
                      f"{'' if row['verified'] is None else ', verified ' + str(row['verified'])}",
                      file=sys.stderr, flush=True)
                if args.rounds:
                    print(rounds_text(row), file=sys.stderr, flush=True)
    print(f"{size // MiB} MiB guest, 1 thread, loopback, medians of {args.repeat} runs "
          "(tput: guest ops/s during the migration / before)")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"/".join(k): rows for k, rows in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
