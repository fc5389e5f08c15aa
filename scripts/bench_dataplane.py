#!/usr/bin/env python3
"""A data plane alone: a contiguous guest vs. a scattered set of pages (issue 11, item 6).

Two processes on loopback, no agents: a source process serving a memfd of
incompressible RAM (--plane native: a DataServer; grpc: the bulk server's
Pages.Bulk), and for every run a fresh destination process that restores an
idle guest (a restore-mode runner, its memory registered with userfaultfd)
and pulls with the plane's bulk path (NativeBulk, BulkLoop). The
"contiguous" case pulls all of RAM; the "scattered" case marks a random
(1 - --fraction) of the pages received before the start, so the bulk path
asks for the rest: single pages and short runs scattered over all of RAM.

Printed for every run, and as medians per case: MiB/s of guest memory moved
(from start() to the last page in) and CPU ms per MiB moved of each side
(getrusage of each process, all threads, kernel time included; the guest
runner is not counted, it sleeps), and the scattered/contiguous ratio (the
target: >= 0.8). Cases alternate, --repeat times each: the machine is shared,
so compare within one run.

usage: python scripts/bench_dataplane.py [--plane native|grpc] [--size-mib 1024] [--fraction 0.2] [--repeat 3]
                                        [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate import spawn  # noqa: E402

MiB = 1 << 20
PAGE = mmap.PAGESIZE
KEY = bytes(range(32))
CASES = ("contiguous", "scattered")
PLANES = ("native", "grpc")
RUN_ID = "bench"


def cpu_now() -> float:
    """This process's CPU seconds so far, user + system, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], pass_fds=pass_fds,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=spawn.child_env(),
                            cwd=os.getcwd())


def ask(proc: subprocess.Popen, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    reply = proc.stdout.readline()
    if not reply:
        raise RuntimeError(f"bench child {proc.pid} ended (asked {line!r})")
    return reply.strip()


# ------------------------------------------------------------------ the two roles

def serve(plane: str, memfd: int, size: int) -> None:
    """Source role: serve the memfd; answer every stdin line with this process's CPU seconds."""
    if plane == "grpc":
        from migrate import rpc
        from migrate.batches import add_pages_servicer
        from migrate.source.bulk_server import CALLS, ENCODERS, BulkPages
        mem = memoryview(mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ))
        server = rpc.server(CALLS)
        add_pages_servicer(BulkPages(mem, PAGE, RUN_ID, 1, "never", ENCODERS), server)
        port = rpc.bind(server, "127.0.0.1:0")
        server.start()
        print(port, flush=True)
        for _ in sys.stdin:
            print(cpu_now(), flush=True)
        server.stop(0).wait()
        return
    from migrate.source.dataplane import DataServer
    with DataServer(memfd, size, PAGE, "127.0.0.1", key=KEY, compress="never") as server:
        server.freeze()  # nothing writes this RAM any more, as after a switchover: pages go out from the mapping
        print(server.port, flush=True)
        for _ in sys.stdin:
            print(cpu_now(), flush=True)


def pull(plane: str, endpoint: str, size: int, fraction: float, seed: int) -> None:
    """Destination role: restore an idle guest, mark all but a random `fraction` of its pages
    received (all of them missing when fraction is 1), pull the rest on "go", print the result."""
    from migrate._native import lib

    from migrate.bitmap import SharedBitmap
    from migrate.dest.bulk import BulkLoop
    from migrate.dest.dataplane import NativeBulk
    from migrate.dest.paths import Memory
    from migrate.guest.process import GuestProcess, GuestSpec
    from migrate.uffd import Uffd

    spec = GuestSpec(size=size, workload="idle", seed=1, ops=0)
    npages = size // PAGE
    memfd = os.memfd_create("bench-dest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)
    guest = GuestProcess.launch(spec, memfd, restore=True)
    uffd = Uffd(guest.uffd)
    guest.uffd = None
    bitmap = SharedBitmap.create(npages)
    try:
        if fraction < 1:  # every bit set, then the missing ones cleared (pages are a multiple of 64 here)
            bits = bytearray(b"\xff" * (npages // 8))
            for page in random.Random(seed).sample(range(npages), round(fraction * npages)):
                bits[page // 8] &= ~(1 << (page % 8))
            bitmap.load_bytes(bits)
        want = npages - bitmap.count()
        mem = Memory.over(uffd, bitmap, guest.regions, PAGE)
        if plane == "grpc":
            bulk = BulkLoop(mem, endpoint, RUN_ID, recovery_timeout=10)
        else:
            bulk = NativeBulk(mem, endpoint, KEY, recovery_timeout=10)
        print("ready", flush=True)
        sys.stdin.readline()
        cpu0, t0 = cpu_now(), time.perf_counter()
        bulk.start(0)
        if plane == "grpc":
            while not bitmap.is_full() and not bulk.failure():
                time.sleep(0.002)
        else:
            while lib.mig_dpd_wait(bulk.handle, 1000) == 0:
                pass
        seconds, cpu = time.perf_counter() - t0, cpu_now() - cpu0
        bulk.stop()
        last = bulk.last
        if "error" in last or last["pages"] != want or not bitmap.is_full():
            raise SystemExit(f"bench: the pull went wrong: {last} (wanted {want} pages)")
        print(json.dumps({"seconds": seconds, "cpu_s": cpu, "pages": want, "requests": last["requests"],
                          "batches": last["batches"], "bytes_wire": last["bytes_wire"]}), flush=True)
    finally:
        guest.stop()
        uffd.close()
        bitmap.close()
        os.close(memfd)


# ------------------------------------------------------------------ the driver

def one_run(plane: str, source: subprocess.Popen, endpoint: str, size: int, fraction: float, seed: int) -> dict:
    dest = child("dest", plane, endpoint, str(size), repr(fraction), str(seed))
    try:
        if dest.stdout.readline().strip() != "ready":
            raise RuntimeError("the destination did not get ready")
        src0 = float(ask(source, "cpu"))
        out = json.loads(ask(dest, "go"))
        src_cpu = float(ask(source, "cpu")) - src0
    finally:
        dest.stdin.close()
        dest.wait(60)
        dest.stdout.close()
    mib = out["pages"] * PAGE / MiB
    return {"mib": mib, "mib_s": mib / out["seconds"], "src_ms_mib": 1000 * src_cpu / mib,
            "dst_ms_mib": 1000 * out["cpu_s"] / mib, "pages_per_request": out["pages"] / max(out["requests"], 1),
            "pages_per_batch": out["pages"] / max(out["batches"], 1), "wire_mib": out["bytes_wire"] / MiB}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--plane", choices=PLANES, default="native")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--fraction", type=float, default=0.2, help="share of the pages missing in the scattered case")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--case", choices=CASES, action="append", help="run only this case (e.g. to profile it)")
    ap.add_argument("--json", help="write the runs here")
    args = ap.parse_args()
    size = args.size_mib * MiB
    from migrate.guest.workloads import fill_random
    memfd = os.memfd_create("bench-source", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)
    with mmap.mmap(memfd, size) as m:
        fill_random(m, seed=7)
    source = child("source", args.plane, str(memfd), str(size), pass_fds=(memfd,))
    cases = tuple(args.case or CASES)
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    try:
        endpoint = f"127.0.0.1:{int(source.stdout.readline())}"
        for rep in range(args.repeat):
            for case in cases:
                fraction = 1.0 if case == "contiguous" else args.fraction
                r = one_run(args.plane, source, endpoint, size, fraction, seed=rep)
                runs[case].append(r)
                print(f"{case:>10} #{rep + 1}: {r['mib']:7.1f} MiB at {r['mib_s']:7.1f} MiB/s, CPU ms/MiB source "
                      f"{r['src_ms_mib']:.2f} dest {r['dst_ms_mib']:.2f}, {r['pages_per_request']:.0f} pages/request,"
                      f" {r['pages_per_batch']:.1f} pages/batch", flush=True)
    finally:
        source.stdin.close()
        source.wait(30)
        source.stdout.close()
        os.close(memfd)
    med = {case: {k: statistics.median(r[k] for r in runs[case]) for k in ("mib_s", "src_ms_mib", "dst_ms_mib")}
           for case in cases}
    for case in cases:
        m = med[case]
        print(f"median {case:>10}: {m['mib_s']:7.1f} MiB/s, CPU ms/MiB source {m['src_ms_mib']:.2f} "
              f"dest {m['dst_ms_mib']:.2f} both {m['src_ms_mib'] + m['dst_ms_mib']:.2f}")
    ratios = [s["mib_s"] / c["mib_s"] for c, s in zip(runs.get("contiguous", []), runs.get("scattered", []))]
    if ratios:
        print(f"scattered / contiguous rate, per pair: {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.2f}, target >= 0.80)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "median": med, "ratios": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "source":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "dest":
        pull(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
    else:
        sys.exit(main())
