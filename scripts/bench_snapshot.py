#!/usr/bin/env python3
"""Live snapshot (synchronous write-protect) against stop-and-copy, same guest, same run.

For each write rate a guest runner (default 1 GiB, `random-write` throttled
to RATE ops/s, each op a write to a random page) is started, warmed up, and
snapshotted twice into a file in --dir, one method after the other:

* live: `migrate snapshot`'s path (migrate.guest.snapshot): the guest pauses
  to write-protect and save its state, native threads save its memory while
  it runs, a write to an unsaved page waits for that page;
* stop-and-copy: pause the guest, copy its memory into the file
  (sendfile from the RAM memfd: one kernel copy, like the live path's pwrite), resume.

Reported per method: downtime, total time, guest blocked time (all threads:
stop-and-copy blocks every thread for its whole downtime), WP faults, MiB/s,
and the guest's pace during the save against its pace before. Each image is
checked against a reference run to its recorded op counts when --verify.

Where qemu-system-x86_64 and /dev/kvm work, QEMU 7.2+'s background snapshot
(`migrate` to a file with the background-snapshot capability) of a guest of
the same size sweeping its RAM (writing each page) runs beside it (--qemu).

    python scripts/bench_snapshot.py --size 1G --rates 10k,100k,1M,0 --qemu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guest.workloads import digest
from migrate.snapshot_image import reference_digest
from migrate.units import parse_size

MiB = 1 << 20


def _rate(text: str) -> float:
    """ops/s: a number with an optional k or M suffix (0: unthrottled)."""
    scale = {"k": 1e3, "K": 1e3, "M": 1e6}.get(text[-1:], 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def _pace(gp: GuestProcess, t0_ns: int, t1_ns: int) -> float:
    """The guest's ops/s between two CLOCK_REALTIME instants, from its own progress samples."""
    pts = [(t, o) for t, o in list(gp.progress) if t0_ns <= t <= t1_ns]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return 0.0
    return (pts[-1][1] - pts[0][1]) / ((pts[-1][0] - pts[0][0]) / 1e9)


def _new_file(directory: str, size: int) -> tuple[str, int]:
    path = os.path.join(directory, f"bench-snapshot-{os.getpid()}-{time.monotonic_ns()}.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return path, fd


def live(gp: GuestProcess, directory: str, size: int) -> tuple[dict, str, dict]:
    path, fd = _new_file(directory, size)
    t0 = time.monotonic()
    try:
        taken = gp.snapshot(fd)
    finally:
        os.close(fd)
    while not (st := gp.snapshot_status())["done"]:
        time.sleep(0.01)
    total = time.monotonic() - t0
    if st["error"]:
        raise RuntimeError(f"live snapshot failed: {st['error']}")
    t_end = taken["t_ns"] + st["elapsed_ns"]
    return ({"downtime_ms": taken["downtime_ms"], "total_s": total, "blocked_ms": st["blocked_ns"] / 1e6,
             "max_fault_ms": st["max_blocked_ns"] / 1e6, "wp_faults": st["wp_faults"],
             "mib_s": size / MiB / (st["elapsed_ns"] / 1e9),
             "pace_during": _pace(gp, taken["t_ns"], t_end + 30_000_000),
             "pace_before": _pace(gp, taken["t_ns"] - 1_000_000_000, taken["t_ns"])}, path, taken["state"])


def stop_and_copy(gp: GuestProcess, memfd: int, directory: str, size: int, threads: int) -> tuple[dict, str, dict]:
    path, fd = _new_file(directory, size)
    try:
        t_ns = time.time_ns()
        t0 = time.monotonic()
        state = gp.pause()
        done = 0
        while done < size:
            n = os.sendfile(fd, memfd, done, size - done)
            if n <= 0:
                raise RuntimeError("sendfile made no progress")
            done += n
        os.fdatasync(fd)
        gp.resume()
        down = time.monotonic() - t0
    finally:
        os.close(fd)
    return ({"downtime_ms": down * 1e3, "total_s": down, "blocked_ms": down * 1e3 * threads, "max_fault_ms": None,
             "wp_faults": 0, "mib_s": size / MiB / down, "pace_during": 0.0,
             "pace_before": _pace(gp, t_ns - 1_000_000_000, t_ns)}, path, state)


def one_rate(size: int, rate: float, threads: int, directory: str, warmup: float, verify: bool) -> dict:
    spec = GuestSpec(size=size, workload="random-write", seed=1, ops=1 << 50, threads=threads, ops_per_sec=rate)
    memfd = os.memfd_create("bench-snapshot", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)
    rows = {}
    try:
        with GuestProcess.launch(spec, memfd) as gp:
            for method in ("live", "stop-and-copy"):
                time.sleep(warmup)
                row, path, state = (live(gp, directory, size) if method == "live"
                                    else stop_and_copy(gp, memfd, directory, size, threads))
                try:
                    if verify:
                        with open(path, "rb") as f:
                            row["exact"] = digest(f.read()) == reference_digest(spec, "realistic", state)
                finally:
                    os.unlink(path)
                rows[method] = row
    finally:
        os.close(memfd)
    return rows


def qemu_background_snapshot(size: int, directory: str, warmup: float) -> dict:
    """QEMU's background snapshot of a guest sweeping (writing) its RAM, to a file."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from qemu_anchor import TinyGuest, launch_qemu, wait_migration  # QEMU helpers shared there

    guest = TinyGuest(size, "write")
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-qemu-") as tmp:
        out = os.path.join(directory, f"bench-snapshot-qemu-{os.getpid()}.img")
        proc, qmp = launch_qemu(tmp, "source", guest.qemu_argv(tmp, "source"))
        try:
            qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
            guest.wait_booted(tmp, qmp)
            time.sleep(warmup)
            qmp.cmd("migrate", uri=f"exec:cat > {out}")
            info = wait_migration(qmp, "background snapshot")
            total = info.get("total-time", 0) / 1e3
            return {"downtime_ms": float(info.get("downtime", 0)), "total_s": total, "blocked_ms": None,
                    "max_fault_ms": None, "wp_faults": None,
                    "mib_s": info.get("ram", {}).get("transferred", 0) / MiB / total if total else 0.0,
                    "pace_during": None, "pace_before": None}
        finally:
            qmp.close()
            proc.kill()
            proc.wait()
            if os.path.exists(out):
                os.unlink(out)


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(size: int, results: dict) -> str:
    lines = [f"snapshot of a {size // MiB} MiB guest (random-write at RATE ops/s; 0: unthrottled)",
             f"{'rate':>8} {'method':14} {'downtime ms':>12} {'total s':>8} {'blocked ms':>11} {'max ms':>7} "
             f"{'WP faults':>9} {'MiB/s':>7} {'pace during/before':>22} {'exact':>5}"]
    for rate, rows in results.items():
        for method, r in rows.items():
            pace = ("-" if r["pace_before"] is None else
                    f"{r['pace_during']:,.0f}/{r['pace_before']:,.0f}")
            lines.append(f"{rate:>8} {method:14} {r['downtime_ms']:>12.2f} {r['total_s']:>8.3f} "
                         f"{_fmt(r['blocked_ms'], '>11.1f'):>11} {_fmt(r['max_fault_ms'], '>7.2f'):>7} "
                         f"{_fmt(r['wp_faults'], '>9'):>9} {r['mib_s']:>7.0f} {pace:>22} "
                         f"{str(r.get('exact', '-')):>5}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rates", default="10k,100k,1M,0", help="random-write ops/s per guest, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds the guest runs before each snapshot")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the images are written (then removed)")
    ap.add_argument("--verify", action="store_true", help="check each image against a reference run")
    ap.add_argument("--qemu", action="store_true", help="also QEMU's background snapshot, where it runs")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    size = parse_size(args.size)
    results: dict = {}
    for text in args.rates.split(","):
        rate = _rate(text.strip())
        results[text.strip()] = one_rate(size, rate, args.threads, args.dir, args.warmup, args.verify)
        print("\n".join(table(size, {text.strip(): results[text.strip()]}).splitlines()[2:]), file=sys.stderr)
    if args.qemu:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from qemu_anchor import missing
        why = missing()
        if why:
            print(f"QEMU skipped: {why}", file=sys.stderr)
        else:
            try:
                results["qemu"] = {"qemu background": qemu_background_snapshot(size, args.dir, args.warmup)}
            except RuntimeError as err:
                print(f"QEMU's background snapshot failed: {err}", file=sys.stderr)
    print(table(size, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
