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
import json
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from migrate import orchestrator
from migrate.bench.runs import run_options
from migrate.client import AgentClient
from migrate.local import LocalAgent, wait_for
from migrate.names import Content
from migrate.planes import DataPlane, FaultPath
from migrate.proto import migrate_pb2 as pb
from migrate.units import parse_size

MiB = 1 << 20
LOAD = 0x100000  # multiboot a.out kludge: the image is loaded here, entry right after the header

# The guest, 32-bit protected mode, EBX -> multiboot info (mem_upper in KiB above 1 MiB at [ebx+8]):
#   mov esi, [ebx+8] ; shl esi, 10 ; add esi, 0x100000   ; esi = end of RAM
#   mov edx, 0x200000 ; xor ecx, ecx                       ; sweep from 2 MiB, ecx = sweep count
# sweep: inc ecx ; mov edi, edx
# page:  mov [edi], ecx   (read pattern: mov eax, [edi]) ; add edi, 4096 ; cmp edi, esi ; jb page
#        jmp sweep
_CODE = {
    "write": bytes.fromhex("8b7308" "c1e60a" "81c600001000" "ba00002000" "31c9"
                           "41" "89d7" "890f" "81c700100000" "39f7" "72f4" "ebef"),
    "read": bytes.fromhex("8b7308" "c1e60a" "81c600001000" "ba00002000" "31c9"
                          "41" "89d7" "8b07" "81c700100000" "39f7" "72f4" "ebef"),
}


def guest_image(pattern: str) -> bytes:
    """Multiboot header (magic, flags: want memory info + a.out kludge, checksum, addresses) + code."""
    magic, flags = 0x1BADB002, 0x00010002
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, LOAD, LOAD, 0, 0, LOAD + 32)
    return header + _CODE[pattern]


def missing() -> str | None:
    """Why this machine cannot run the comparison, or None."""
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as err:
        return f"/dev/kvm is not usable: {err.strerror}"
    return None


class Qmp:
    """A QMP connection over a unix socket: one command at a time, events skipped."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU's QMP socket {path} did not appear") from None
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise RuntimeError("QEMU closed its QMP socket")
        return json.loads(line)

    def cmd(self, name: str, **args: object) -> object:
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error'].get('desc')}")

    def close(self) -> None:
        self.sock.close()


def _qemu(tmp: str, role: str, argv: list[str]) -> tuple[subprocess.Popen, Qmp]:
    sock = os.path.join(tmp, f"{role}.qmp")
    # debug-threads: vCPU threads named "CPU n/KVM", which CpuMeter leaves out
    proc = subprocess.Popen([*argv, "-name", f"{role},debug-threads=on", "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{role}.log"), "wb"))
    try:
        return proc, Qmp(sock)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise


_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, list[str]]:
    """(comm, the fields after it) of a /proc stat file."""
    with open(path) as f:
        text = f.read()
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def _own_cpu_ms(pid: int) -> float:
    """CPU of a process's threads, live and exited, less QEMU's vCPU threads ("CPU n/KVM")."""
    _, f = _stat(f"/proc/{pid}/stat")
    ticks = int(f[11]) + int(f[12])  # utime stime (cutime: reaped children, our guest runners among them)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, t = _stat(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:
            continue
        if comm.startswith("CPU ") and comm.endswith("/KVM"):
            ticks -= int(t[11]) + int(t[12])
    return ticks * _TICK_MS


def _helpers(pid: int) -> list[int]:
    """A process and its descendants, but not our guest runners (whose threads are the vCPUs)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"migrate.guest." in f.read():
                return []
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []
    return [pid] + [d for c in children for d in _helpers(c)]


class CpuMeter:
    """The CPU a VMM or an agent spends on a migration, helper processes included, vCPUs not:
    sampled every 50 ms from `with` to its end, so a helper that exits meanwhile counts up to
    its last sample. A load-independent view of where the time goes."""

    def __init__(self, *roots: int) -> None:
        self._roots = roots
        self._base: dict[int, float] = {}   # at the start; helpers started later begin at 0
        self._last: dict[int, tuple[int, float]] = {}  # pid -> (its root, its CPU ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        for root in self._roots:
            for pid in _helpers(root):
                try:
                    self._last[pid] = (root, _own_cpu_ms(pid))
                except FileNotFoundError:
                    pass

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self._base = {pid: ms for pid, (_, ms) in self._last.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def per_mib(self, mib: float) -> dict[str, float]:
        """The first root's CPU (its tree's) and the second's, per MiB over the measured span, in ms."""
        spent = [sum(ms - self._base.get(pid, 0.0) for pid, (r, ms) in self._last.items() if r == root)
                 for root in self._roots]
        return {"src_cpu_ms_mib": spent[0] / mib, "dst_cpu_ms_mib": spent[1] / mib}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REGS = ("ECX", "ESI", "EDI", "EIP")


def registers(qmp: Qmp) -> dict[str, int]:
    """The vCPU's 32-bit registers named in _REGS, from the monitor's `info registers`."""
    regs = str(qmp.cmd("human-monitor-command", **{"command-line": "info registers"}))
    return {w[:3]: int(w[4:], 16) for w in regs.split() if w[:3] in _REGS and w[3:4] == "="}


class TinyGuest:
    """The 36-byte sweeping guest (QEMU) beside the synthetic seq-write / seq-read workload (ours),
    with the same contents: zero RAM, pages touched at the rate QEMU's guest touched them (match())."""

    def __init__(self, size: int, pattern: str) -> None:
        self.size, self.pattern = size, pattern
        self.pages_per_s: float | None = None  # QEMU's guest's, once measured

    @property
    def title(self) -> str:
        rate = "" if self.pages_per_s is None else \
            (f"; RAM zero at boot on both sides, ours touching {self.pages_per_s:.0f} pages/s: the rate QEMU's"
             " guest did in this run")
        return f"{self.size // MiB} MiB guest sweeping its RAM ({self.pattern}){rate}"

    def match(self, qemu_row: dict) -> None:
        """Ours touches pages at the rate QEMU's guest did (the first QEMU run's)."""
        if self.pages_per_s is None:
            self.pages_per_s = qemu_row["guest_ops_per_s"]

    def qemu_argv(self, tmp: str, role: str) -> list[str]:
        kernel = os.path.join(tmp, "guest.bin")
        with open(kernel, "wb") as f:
            f.write(guest_image(self.pattern))
        return ["qemu-system-x86_64", "-accel", "kvm", "-m", f"{self.size // MiB}M", "-nodefaults",
                "-display", "none", "-kernel", kernel]

    def wait_booted(self, tmp: str, qmp: Qmp, timeout: float = 120.0) -> None:
        """Until the vCPU runs our code (the BIOS takes seconds under software virtualization)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if LOAD <= registers(qmp).get("EIP", 0) < LOAD + 32 + len(_CODE["write"]):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the QEMU guest did not reach its code within {timeout:g} s")

    def qemu_ops(self, tmp: str, role: str, qmp: Qmp) -> int:
        """Pages touched so far (one op a page, as ours counts seq-write's): ECX counts the sweeps
        from 1, EDI is the page in hand, ESI the end of the swept RAM (from 2 MiB)."""
        r = registers(qmp)
        sweep = (r["ESI"] - 0x200000) // 4096
        return (r["ECX"] - 1) * sweep + max(r["EDI"] - 0x200000, 0) // 4096

    def qemu_digest(self, tmp: str) -> str | None:
        return None

    def ours_spec(self) -> pb.GuestSpec:
        workload = {"write": "seq-write", "read": "seq-read"}[self.pattern]
        return pb.GuestSpec(size=self.size, workload=workload, seed=1, ops=10**12, threads=1,
                            ops_per_sec=self.pages_per_s or 0, page_size=mmap.PAGESIZE, content=Content.ZERO)


def said(text: str, key: str) -> str | None:
    """The word after `key` in the guest's text once its line is complete (isa-debugcon writes a
    character at a time: a line read too early ends anywhere), or None."""
    for line in text.splitlines(keepends=True):
        if key in line and line.endswith("\n"):
            return line.split(key, 1)[1].split()[0]
    return None


class KvmImageGuest:
    """The kvm guest kind's image, booted by QEMU and by our VMM with the same parameters."""

    def __init__(self, size: int, workload: str, vcpus: int, ops: int, seed: int) -> None:
        from migrate.guest.process import GuestSpec
        self.size = size
        self.spec = GuestSpec(size=size, workload=workload, seed=seed, ops=ops, threads=vcpus, kind="kvm")
        self.spec.validate()
        self.title = (f"{size // MiB} MiB kvm guest image, {workload}, {vcpus} vCPU(s), {ops} ops, seed {seed}"
                      " (both run the same image)")
        self._ops_addr = 0

    def qemu_argv(self, tmp: str, role: str) -> list[str]:
        from migrate.guest.kvm import qemu_argv
        return qemu_argv(self.spec, os.path.join(tmp, f"{role}.out"))

    def _text(self, tmp: str, role: str) -> str:
        try:
            with open(os.path.join(tmp, f"{role}.out")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_booted(self, tmp: str, qmp: Qmp | None, timeout: float = 120.0) -> None:
        """Until the guest has filled its RAM and done its first ops, as run_ours waits for ours (its
        start line comes before the fill, which under QEMU can outlast the warm-up: it would migrate
        half-zero RAM and count no ops). Without `qmp`, only until the line says where it counts them."""
        deadline = time.monotonic() + timeout
        while True:
            if (addr := said(self._text(tmp, "source"), " ops_done ")) is not None:
                self._ops_addr = int(addr, 16)
                if qmp is None or self.qemu_ops(tmp, "source", qmp) > 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the QEMU guest did not start its workload within {timeout:g} s")
            time.sleep(0.05)

    def qemu_ops(self, tmp: str, role: str, qmp: Qmp) -> int:
        """Ops done so far: the guest's per-vCPU counters, read through the monitor."""
        out = qmp.cmd("human-monitor-command", **{"command-line": f"xp /{self.spec.threads}gx {self._ops_addr}"})
        return sum(int(w, 16) for line in str(out).splitlines() for w in line.split(":", 1)[1].split())

    def qemu_digest(self, tmp: str, timeout: float = 3600.0) -> str:
        """The digest the guest reported: on the destination, or on the source if it finished before moving."""
        deadline = time.monotonic() + timeout
        while (digest := said(self._text(tmp, "source"), "digest ")
               or said(self._text(tmp, "dest"), "digest ")) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the migrated QEMU guest reported no digest within {timeout:g} s")
            time.sleep(0.1)
        return digest

    def ours_spec(self) -> pb.GuestSpec:
        s = self.spec
        return pb.GuestSpec(size=s.size, workload=s.workload, seed=s.seed, ops=s.ops, threads=s.threads,
                            ops_per_sec=0, page_size=s.page_size, kind="kvm")

    def match(self, qemu_row: dict) -> None:
        """Nothing to match: both run the same image at their own pace."""


def wait_migration(qmp: Qmp, what: str, timeout: float = 600.0) -> dict:
    """query-migrate until QEMU's migration (or snapshot: `what`) completes; RuntimeError if it fails."""
    deadline = time.monotonic() + timeout
    while (info := qmp.cmd("query-migrate")).get("status") not in ("completed", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU's {what} did not complete within {timeout:g} s")
        time.sleep(0.05)
    if info["status"] == "failed":
        raise RuntimeError(f"QEMU's {what} failed: {info.get('error-desc', '?')}")
    return info


def run_qemu(guest: TinyGuest | KvmImageGuest, warmup: float, preempt: bool) -> dict:
    """QEMU post-copy of the guest over loopback; returns query-migrate's numbers (and the guest's)."""
    with tempfile.TemporaryDirectory(prefix="compare-qemu-") as tmp:
        port = _free_port()
        procs = []
        try:
            src, src_qmp = _qemu(tmp, "source", guest.qemu_argv(tmp, "source"))
            procs.append(src)
            dst, dst_qmp = _qemu(tmp, "dest", guest.qemu_argv(tmp, "dest") + ["-incoming", "defer"])
            procs.append(dst)
            caps = [{"capability": "postcopy-ram", "state": True}]
            if preempt:
                caps.append({"capability": "postcopy-preempt", "state": True})
            src_qmp.cmd("migrate-set-capabilities", capabilities=caps)
            dst_qmp.cmd("migrate-set-capabilities",
                        capabilities=caps + [{"capability": "postcopy-blocktime", "state": True}])
            dst_qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            guest.wait_booted(tmp, src_qmp)
            ops_booted, t_booted = guest.qemu_ops(tmp, "source", src_qmp), time.monotonic()
            time.sleep(warmup)  # the guest works on its RAM meanwhile
            ops_before = guest.qemu_ops(tmp, "source", src_qmp)
            ops_per_s = (ops_before - ops_booted) / (time.monotonic() - t_booted)
            with CpuMeter(src.pid, dst.pid) as meter:
                src_qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
                src_qmp.cmd("migrate-start-postcopy")  # straight to post-copy: no pre-copy rounds
                info = wait_migration(src_qmp, "migration")
            dinfo = dst_qmp.cmd("query-migrate")
            ops_after = guest.qemu_ops(tmp, "dest", dst_qmp)
            ram = info.get("ram", {})
            return {"total_s": info.get("total-time", 0) / 1e3, "downtime_ms": float(info.get("downtime", 0)),
                    "remote_faults": ram.get("postcopy-requests", 0),
                    **_blocked(dinfo.get("postcopy-vcpu-blocktime") or [dinfo.get("postcopy-blocktime", 0)]),
                    "ops_during": ops_after - ops_before, "guest_ops_per_s": ops_per_s,
                    "pages_data_zero": f"{ram.get('normal', 0)} / {ram.get('duplicate', 0)}",
                    "wire_mib": ram.get("transferred", 0) / MiB, "fault_p50_us": None,
                    **meter.per_mib(guest.size / MiB), "digest": guest.qemu_digest(tmp)}
        finally:
            for p in procs:
                p.kill()
                p.wait()


def _blocked(per_vcpu: list[float]) -> dict:
    """Guest blocked time summed over the vCPUs, and each vCPU's (QEMU's postcopy-blocktime alone counts
    only the time all vCPUs were blocked at once: with 2 vCPUs not what ours sums)."""
    return {"blocked_ms": float(sum(per_vcpu)), "vcpu_blocked": " / ".join(f"{b:.0f}" for b in per_vcpu) + " ms"}


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
            **(_blocked(vcpus) if vcpus else {"blocked_ms": doc["guest"]["blocked_ms"], "vcpu_blocked": None}),
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
    ap.add_argument("--data-plane", choices=[p.value for p in DataPlane], default="",
                    help="our data plane (default: native)")
    ap.add_argument("--fault-path", choices=[p.value for p in FaultPath], default="",
                    help="our fault path (default: grpc; native needs the native data plane)")
    ap.add_argument("--report", default="", help="write our run's JSON report here (its stages, faults, pages)")
    args = ap.parse_args()
    try:
        size = parse_size(args.size)
        guest = TinyGuest(size, args.pattern) if args.guest == "tiny" else \
            KvmImageGuest(size, args.workload, args.vcpus, args.ops, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    why = missing()
    if why:
        print(f"skipped: {why}")
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
