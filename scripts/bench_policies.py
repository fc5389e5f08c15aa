"""Benchmark: push and prefetch policies side by side, and the REAP case (issue 15).

    python scripts/bench_policies.py [--size 1G] [--workloads seq-read,random-read,hotset,zipf]
                                     [--max-bandwidth 200M] [--ops 400000] [--threads 1] [--image 512M]
                                     [--json out.json]

Per workload, a fresh guest (same seed each time) runs until a tenth of its
--ops are done, then migrates post-copy over loopback (native data plane
and fault path, the push capped by --max-bandwidth so that the order of
pages matters) under `sequential`, `bubble` and `trend`; the `sequential`
run records the working set (--record-ws), and `replay` migrates the same
guest again with it. One row per (workload, policy): remote faults, guest
blocked ms, downtime, total time. Then REAP's case: an --image-sized
snapshot restored over --uffd-socket into a small C client
(tests/c/uffd_ws_client.c), which touches a fixed 10 % of it in random
order: a plain restore (pushed, the first cold start), a recording one
(--record-ws: no push until the client is quiet, so served by faults alone
as REAP's baseline, Firecracker's lazy restore, is), a replaying one
(--policy replay:ws= the recording), and one replaying the exact working
set (the bound): the client's time from its handshake until it has touched
its working set (the wait for the replayed pages included; the touching
alone in brackets) and the remote faults of each.

A policy of your own goes in --policies as module:Class (the destination
agent here loads policy modules); scripts/hotset_oracle.py, which pushes
hotset's hot tenths first, bounds what any push order saves on hotset.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # hotset_oracle, also under python -P

from hotset_oracle import hot_tenths  # noqa: E402  (scripts/, beside this file)

from migrate import orchestrator  # noqa: E402
from migrate.local import LocalAgent, wait_for  # noqa: E402
from migrate.policies import workingset  # noqa: E402
from migrate.units import parse_rate, parse_size  # noqa: E402
from tests.test_migration import launch, ops_done, spec, stop  # noqa: E402
from tests.test_restore import make_image, restore_touching_working_set  # noqa: E402

POLICIES = ("sequential", "bubble", "trend", "replay")


def one_run(src: str, dst: str, size: int, workload: str, ops: int, policy: str, max_bandwidth: int,
            record_ws: str = "", threads: int = 1) -> dict:
    s = spec(workload, size=size, ops=ops, threads=threads)
    launch(src, "bench", s)
    wait_for(lambda: ops_done(src, "bench") >= ops // 10, timeout=600)
    t0 = time.monotonic()
    doc = orchestrator.migrate("bench", src, dst, orchestrator.RunOptions(
        mode="postcopy", timeout=600, data_plane="native", fault_path="native", policy=policy,
        record_ws=record_ws, max_bandwidth=max_bandwidth))
    stop(dst, "bench")
    return {"faults": doc["faults"]["count"], "blocked_ms": doc["guest"]["blocked_ms"],
            "downtime_ms": doc["downtime_ms"], "total_s": doc["total_s"], "wall_s": time.monotonic() - t0,
            "hit_ratio": doc["prefetch"]["hit_ratio"], "neighbourhood": doc["prefetch"]["neighbourhood"],
            "written": doc["prefetch"]["written"]}


def policies(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    with LocalAgent("source", log_path=str(work / "src.log")) as src, \
            LocalAgent("dest", "--allow-policy-modules", log_path=str(work / "dst.log")) as dst:  # --policies mod:Cls
        for workload in filter(None, args.workloads.split(",")):
            ws = str(work / f"{workload}.ws")
            for policy in args.policies.split():
                name = f"{policy}{',' if ':' in policy else ':'}ws={ws}" if policy.startswith("replay") else policy
                row = one_run(src.address, dst.address, args.size, workload, args.ops, name, args.max_bandwidth,
                              record_ws=ws if policy == "sequential" else "", threads=args.threads)
                if policy == "sequential" and workload == "hotset":  # its recorded pages in the hot tenths
                    ranges = workingset.load(ws).ranges
                    row["ws_pages"] = sum(n for _, n in ranges)
                    row["ws_hot"] = sum(max(0, min(first + n, hot_end) - max(first, hot_first))
                                        for first, n in ranges for hot_first, hot_end in hot_ends(args))
                    print(f"{workload:12} {policy:10} recorded {row['ws_pages']} pages (faulted or found written), "
                          f"{row['ws_hot']} in the hot tenth")
                rows.append({"workload": workload, "policy": policy, **row})
                print(f"{workload:12} {policy:10} faults {row['faults']:7} blocked {row['blocked_ms']:9.1f} ms "
                      f"downtime {row['downtime_ms']:8.1f} ms total {row['total_s']:6.2f} s "
                      f"hits {row['hit_ratio']:.2f} neighbourhood {(row['neighbourhood'] or {}).get('pages')} "
                      f"written {row['written']}", flush=True)
    return rows


def hot_ends(args: argparse.Namespace) -> list[tuple[int, int]]:
    """[first, end) pages of each thread's hot tenth."""
    return [(first, first + n) for first, n in hot_tenths(args.size // 4096, args.threads)]


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """The issue's table (markdown): per workload and policy, remote faults (and the change against
    `sequential`), guest blocked ms, total time."""
    if not rows:
        return
    print(f"\n{args.size // (1 << 20)} MiB guest, {args.threads} thread(s), push capped at "
          f"{args.max_bandwidth // (1 << 20)} MiB/s, {args.ops} ops, switch at 10 %\n")
    print("| workload | policy | remote faults | vs sequential | blocked ms | total s |")
    print("|---|---|---:|---:|---:|---:|")
    base = {r["workload"]: r["faults"] for r in rows if r["policy"] == "sequential"}
    for r in rows:
        ref = base.get(r["workload"]) or 0
        change = f"{(r['faults'] - ref) * 100 / ref:+.0f} %" if ref else "-"
        print(f"| {r['workload']} | {r['policy']} | {r['faults']} | {change} | {r['blocked_ms']:.0f} | "
              f"{r['total_s']:.2f} |")
    print(flush=True)


def reap(args: argparse.Namespace, work: Path) -> dict:
    image = work / "snap.img"
    make_image(image, args.image // 4096)
    recorded, exact = str(work / "recorded.ws"), str(work / "exact.ws")
    npages = args.image // 4096
    workingset.save(exact, npages, 4096, [(npages - npages // 10, npages // 10)])  # what the client touches
    bw = args.reap_bandwidth
    with LocalAgent("source", "--image", f"snap={image}", log_path=str(work / "reap-src.log")) as src:
        cold = restore_touching_working_set(work, src, image, max_bandwidth=bw)  # a plain restore, pushed
        record = restore_touching_working_set(work, src, image, "--record-ws", recorded, max_bandwidth=bw)
        warm = restore_touching_working_set(work, src, image, "--policy", f"replay:ws={recorded}", max_bandwidth=bw)
        # the bound: the working set replayed whole, exactly (the recording's is a superset by fault blocks)
        ideal = restore_touching_working_set(work, src, image, "--policy", f"replay:ws={exact}", max_bandwidth=bw)
    out = {"ws_pages": cold["ws_pages"], "recorded_pages": workingset.load(recorded).pages,
           **{f"{k}_{m}": r[m] for k, r in (("first", cold), ("recording", record), ("replayed", warm),
                                           ("exact", ideal)) for m in ("ws_ms", "touch_ms", "faults")}}
    print(f"REAP {args.image // (1 << 20)} MiB, {out['ws_pages']} pages touched, handshake to working set touched "
          f"[touching alone] (remote faults):")
    for k in ("first", "recording", "replayed", "exact"):
        print(f"  {k:9} {out[k + '_ws_ms']:8.1f} ms [{out[k + '_touch_ms']:7.1f}] ({out[k + '_faults']} faults)"
              f"  first/this {out['first_ws_ms'] / max(out[k + '_ws_ms'], 1e-3):.1f}x"
              f"  recording/this {out['recording_ws_ms'] / max(out[k + '_ws_ms'], 1e-3):.1f}x", flush=True)
    print(f"  recorded {out['recorded_pages']} pages", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--image", type=parse_size, default=parse_size("512M"))
    ap.add_argument("--ops", type=int, default=400_000)
    ap.add_argument("--threads", type=int, default=1,
                    help="guest threads (vCPUs); each works on its own slice of RAM, so hotset's hot tenths "
                         "lie at the start of each slice, not only at page 0 where `sequential` starts")
    ap.add_argument("--workloads", default="seq-read,random-read,hotset,zipf")
    ap.add_argument("--policies", default=" ".join(POLICIES),
                    help="policies to compare, in order, space-separated (e.g. 'sequential bubble:min=128,"
                         "shape=aligned replay replay:block=1'; sequential records what each replay replays)")
    ap.add_argument("--max-bandwidth", type=parse_rate, default=parse_rate("200M"))
    ap.add_argument("--reap-bandwidth", default="0", help="--max-bandwidth of the REAP restores (0: none)")
    ap.add_argument("--skip-reap", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as tmp:
        doc = {"policies": policies(args, Path(tmp))}
        print_table(doc["policies"], args)
        if not args.skip_reap:
            doc["reap"] = reap(args, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
