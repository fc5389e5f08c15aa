#!/usr/bin/env python3
"""QEMU's own post-copy next to ours, on a guest of the same size and access pattern.

Where `qemu-system-x86_64` is installed and /dev/kvm works, two QEMU
processes migrate post-copy over loopback, driven through QMP; then
`query-migrate` gives total-time, downtime, postcopy-requests and
(destination) postcopy-vcpu-blocktime. Our toolkit then migrates a guest between
two local agents. One table.

--guest tiny (default): QEMU boots a tiny guest of our own (36 bytes of
32-bit code behind a multiboot header) that sweeps its RAM page by page
forever, writing (or only reading) each page; ours runs the synthetic
`seq-write` (or `seq-read`) workload of the same size. The contents match:
QEMU's RAM is zero at boot and its guest touches pages at whatever pace its
vCPU gets (software virtualization can make that slow), so ours starts from
zero RAM too (content "zero": memfd holes) and touches pages at the rate
QEMU's guest did in the same run (read from its registers before and after
the warm-up; one op a page).

--guest kvm: both boot the very same multiboot image (migrate/guest/kvm_image.bin,
the kvm guest kind) with the same size, workload, seed, ops and vCPUs: QEMU
with -kernel/-append/-smp, ours with `--kind kvm`. Each guest reports the
digest of its own memory when its ops are done (QEMU: through isa-debugcon),
and the table's `| final digest |` row must agree (exit 1 otherwise). Ops
done during the migration: QEMU's from the guest's counters read through the
monitor before and after, ours from the progress the guest reports.

Installs nothing; exits 0 with a message saying what is missing otherwise.

    python scripts/compare_qemu.py --size 512M --pattern write
    python scripts/compare_qemu.py --guest kvm --size 1G --workload random-write --vcpus 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from migrate import orchestrator
from migrate.bench.runs import run_options
from migrate.client import AgentClient
from migrate.local import LocalAgent, wait_for
from migrate.proto import migrate_pb2 as pb
from migrate.units import parse_size

sys.path.insert(0, str(Path(__file__).resolve().parent))  # qemu_anchor beside it (python -P leaves it out)
from qemu_anchor import (  # noqa: E402,F401
    CpuMeter,
    KvmImageGuest,
    MiB,
    QemuPair,
    TinyGuest,
    add_our_options,
    blocked,
    downtime_ms,
    missing,
    qemu_blocked,
    said,
    skipped,
)


def run_qemu(guest: TinyGuest | KvmImageGuest, warmup: float, preempt: bool) -> dict:
    """QEMU post-copy of the guest over loopback; returns query-migrate's numbers (and the guest's)."""
    with tempfile.TemporaryDirectory(prefix="compare-qemu-") as tmp, QemuPair(guest, tmp, preempt) as pair:
        guest.wait_booted(tmp, pair.src_qmp)
        ops_booted, t_booted = guest.qemu_ops(tmp, "source", pair.src_qmp), time.monotonic()
        time.sleep(warmup)  # the guest works on its RAM meanwhile
        ops_before = guest.qemu_ops(tmp, "source", pair.src_qmp)
        ops_per_s = (ops_before - ops_booted) / (time.monotonic() - t_booted)
        with CpuMeter(pair.src.pid, pair.dst.pid) as meter:
            info, dinfo = pair.migrate()
        ops_after = guest.qemu_ops(tmp, "dest", pair.dst_qmp)
        ram = info.get("ram", {})
        return {"total_s": info.get("total-time", 0) / 1e3, "downtime_ms": downtime_ms(info),
                "remote_faults": ram.get("postcopy-requests", 0),
                **qemu_blocked(dinfo),
                "ops_during": ops_after - ops_before, "guest_ops_per_s": ops_per_s,
                "pages_data_zero": f"{ram.get('normal', 0)} / {ram.get('duplicate', 0)}",
                "wire_mib": ram.get("transferred", 0) / MiB, "fault_p50_us": None,
                **meter.per_mib(guest.size / MiB), "digest": guest.qemu_digest(tmp)}



def _ops_during(doc: dict) -> int:
    """Ops the guest did from the migration's start to its end, from the progress it reported."""
    points = doc["guest"]["progress"]
    at = [max((p["ops"] for p in points if p["host"] == host and lo <= p["t_s"] <= hi), default=0)
          for host, lo, hi in (("source", -1e9, 0.0), ("dest", -1e9, doc["total_s"]))]
    return max(at[1] - at[0], 0)


def run_ours(guest: TinyGuest | KvmImageGuest, warmup: float, plane: str = "", report_path: str = "",
             fault_path: str = "") -> dict:
    """Our post-copy of the same guest between two local agents (its full report to `report_path` if given:
    the stages behind the table's numbers)."""
    spec = guest.ours_spec()
    kvm = spec.kind == "kvm"
    with tempfile.TemporaryDirectory(prefix="compare-ours-") as tmp, \
            LocalAgent("source", log_path=f"{tmp}/source.log") as src, \
            LocalAgent("dest", log_path=f"{tmp}/dest.log") as dst:
        with AgentClient(src.address) as c:
            c.call("LaunchGuest", pb.LaunchGuestRequest(name="cmp", spec=spec), timeout=600)
            wait_for(lambda: c.call("InspectGuest", pb.GuestRef(name="cmp")).ops_done > 0, timeout=120)
            wait_for(lambda: False, timeout=warmup)
        try:
            with CpuMeter(src.pid, dst.pid) as meter:
                opts = run_options("postcopy", "", plane)
                opts.fault_path = fault_path or opts.fault_path
                doc = orchestrator.migrate("cmp", src.address, dst.address, opts)
            cpu = meter.per_mib(guest.size / MiB)
            if report_path:
                orchestrator.write_report(doc, report_path)
            digest = None
            if kvm:
                with AgentClient(dst.address) as c:
                    deadline = time.monotonic() + 3600
                    while not (info := c.call("InspectGuest", pb.GuestRef(name="cmp"))).guest_digest:
                        if time.monotonic() > deadline:
                            raise RuntimeError("our migrated guest reported no digest within 3600 s")
                        time.sleep(0.1)
                    digest = info.guest_digest
        finally:
            with AgentClient(dst.address) as c:
                c.stop_if_hosted("cmp")
    vcpus = doc["guest"]["vcpu_blocked_ms"] if kvm else []
    return {"total_s": doc["total_s"], "downtime_ms": doc["downtime_ms"], "remote_faults": doc["faults"]["count"],
            **(blocked(vcpus) if vcpus else {"blocked_ms": doc["guest"]["blocked_ms"], "vcpu_blocked": None}),
            "ops_during": _ops_during(doc), "guest_ops_per_s": doc["guest"]["ops_per_s_before"],
            "pages_data_zero": f"{doc['pages']['total'] - doc['pages']['zero']} / {doc['pages']['zero']}",
            "wire_mib": doc["bytes"]["wire"] / MiB,
            "fault_p50_us": doc["faults"]["latency_us"]["p50"], **cpu, "digest": digest}


def table(title: str, rows: dict[str, dict]) -> str:
    fields = [("total time", "total_s", "{:.2f} s"), ("downtime", "downtime_ms", "{:.1f} ms"),
              ("remote faults (postcopy-requests)", "remote_faults", "{}"),
              ("guest blocked, vCPUs summed (postcopy-vcpu-blocktime)", "blocked_ms", "{:.0f} ms"),
              ("each vCPU blocked", "vcpu_blocked", "{}"),
              ("guest ops before the migration, per second (tiny guest: pages touched)", "guest_ops_per_s",
               "{:.0f}"),
              ("guest ops during the migration", "ops_during", "{}"),
              ("pages moved as data / as zero (QEMU: normal / duplicate)", "pages_data_zero", "{}"),
              ("fault p50", "fault_p50_us", "{:.0f} µs"), ("bytes on the wire", "wire_mib", "{:.0f} MiB"),
              ("source CPU per guest MiB (not the vCPUs)", "src_cpu_ms_mib", "{:.2f} ms"),
              ("destination CPU per guest MiB (not the vCPUs)", "dst_cpu_ms_mib", "{:.2f} ms"),
              ("final digest", "digest", "{}")]
    names = list(rows)
    out = [f"post-copy over loopback, {title}", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in fields:
        if all(rows[n].get(key) is None for n in names):
            continue
        cells = ["-" if rows[n].get(key) is None else fmt.format(rows[n][key]) for n in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", choices=("tiny", "kvm"), default="tiny", help="which guest both sides run")
    ap.add_argument("--size", default="512M", help="guest RAM (default 512M)")
    ap.add_argument("--pattern", choices=("write", "read"), default="write",
                    help="tiny guest: what it does to each page")
    ap.add_argument("--workload", default="random-write", help="kvm guest: its workload")
    ap.add_argument("--vcpus", type=int, default=1, help="kvm guest: vCPUs (1-16)")
    ap.add_argument("--ops", type=int, default=1_000_000_000,
                    help="kvm guest: ops, then it reports its digest (enough to outlast the migration)")
    ap.add_argument("--seed", type=int, default=1, help="kvm guest: seed")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds the guest runs before migrating")
    add_our_options(ap)
    ap.add_argument("--report", default="", help="write our run's JSON report here (its stages, faults, pages)")
    args = ap.parse_args()
    try:
        size = parse_size(args.size)
        guest = TinyGuest(size, args.pattern) if args.guest == "tiny" else \
            KvmImageGuest(size, args.workload, args.vcpus, args.ops, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if skipped(missing()):
        return 0
    rows = {}
    try:
        rows["QEMU post-copy"] = run_qemu(guest, args.warmup, preempt=False)
        guest.match(rows["QEMU post-copy"])
        rows["QEMU post-copy + preempt"] = run_qemu(guest, args.warmup, preempt=True)
        rows["migrate (ours)"] = run_ours(guest, args.warmup, args.data_plane, args.report, args.fault_path)
    except (RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table(guest.title, rows))
    digests = {row["digest"] for row in rows.values()}
    if args.guest == "kvm" and len(digests) != 1:
        print(f"error: the guests' final digests differ: {', '.join(sorted(map(str, digests)))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
