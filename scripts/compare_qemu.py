#!/usr/bin/env python3
"""QEMU's own post-copy next to ours, on a guest of the same size and access pattern.

Where `qemu-system-x86_64` is installed and /dev/kvm works, boots a tiny
guest of our own (below: 36 bytes of 32-bit code behind a multiboot header,
so QEMU's -kernel loads it straight into protected mode) that sweeps its RAM
page by page forever, writing (or only reading) each page. Two QEMU
processes, post-copy over loopback driven through QMP; then `query-migrate`
gives total-time, downtime, postcopy-requests and (destination)
postcopy-blocktime. Our toolkit then migrates a guest of the same size
running `seq-write` (or `seq-read`) between two local agents. One table.

Installs nothing; exits 0 with a message saying what is missing otherwise.

    python scripts/compare_qemu.py --size 512M --pattern write
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
import time

from migrate import orchestrator
from migrate.bench.runs import run_options
from migrate.client import AgentClient
from migrate.local import LocalAgent, wait_for
from migrate.planes import DataPlane
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


def _qemu(tmp: str, role: str, size_mib: int, kernel: str, extra: list[str]) -> tuple[subprocess.Popen, Qmp]:
    sock = os.path.join(tmp, f"{role}.qmp")
    proc = subprocess.Popen(["qemu-system-x86_64", "-accel", "kvm", "-m", f"{size_mib}M", "-nodefaults",
                             "-display", "none", "-kernel", kernel, "-qmp", f"unix:{sock},server=on,wait=off",
                             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, f"{role}.log"), "wb"))
    try:
        return proc, Qmp(sock)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise


def _wait_booted(qmp: Qmp, timeout: float = 120.0) -> None:
    """Until the vCPU runs our code (the BIOS takes seconds under software virtualization)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        regs = qmp.cmd("human-monitor-command", **{"command-line": "info registers"})
        eip = next((int(w[4:], 16) for w in str(regs).split() if w.startswith("EIP=")), 0)
        if LOAD <= eip < LOAD + 32 + len(_CODE["write"]):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the QEMU guest did not reach its code within {timeout:g} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_migration(qmp: Qmp, what: str, timeout: float = 600.0) -> dict:
    """Poll query-migrate until it completes; RuntimeError naming `what` if it fails or takes too long."""
    deadline = time.monotonic() + timeout
    while (info := qmp.cmd("query-migrate")).get("status") not in ("completed", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU's {what} did not complete within {timeout:g} s")
        time.sleep(0.05)
    if info["status"] == "failed":
        raise RuntimeError(f"QEMU's {what} failed: {info.get('error-desc', '?')}")
    return info


def run_qemu(size: int, pattern: str, warmup: float, preempt: bool) -> dict:
    """QEMU post-copy of the sweeping guest over loopback; returns query-migrate's numbers."""
    with tempfile.TemporaryDirectory(prefix="compare-qemu-") as tmp:
        kernel = os.path.join(tmp, "guest.bin")
        with open(kernel, "wb") as f:
            f.write(guest_image(pattern))
        port = _free_port()
        procs = []
        try:
            src, src_qmp = _qemu(tmp, "source", size // MiB, kernel, [])
            procs.append(src)
            dst, dst_qmp = _qemu(tmp, "dest", size // MiB, kernel, ["-incoming", "defer"])
            procs.append(dst)
            caps = [{"capability": "postcopy-ram", "state": True}]
            if preempt:
                caps.append({"capability": "postcopy-preempt", "state": True})
            src_qmp.cmd("migrate-set-capabilities", capabilities=caps)
            dst_qmp.cmd("migrate-set-capabilities",
                        capabilities=caps + [{"capability": "postcopy-blocktime", "state": True}])
            dst_qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            _wait_booted(src_qmp)
            time.sleep(warmup)  # the guest sweeps its RAM meanwhile: every page is touched
            src_qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            src_qmp.cmd("migrate-start-postcopy")  # straight to post-copy: no pre-copy rounds
            info = wait_migration(src_qmp, "migration")
            dinfo = dst_qmp.cmd("query-migrate")
            ram = info.get("ram", {})
            return {"total_s": info.get("total-time", 0) / 1e3, "downtime_ms": float(info.get("downtime", 0)),
                    "remote_faults": ram.get("postcopy-requests", 0),
                    "blocked_ms": float(dinfo.get("postcopy-blocktime", 0)),
                    "wire_mib": ram.get("transferred", 0) / MiB, "fault_p50_us": None}
        finally:
            for p in procs:
                p.kill()
                p.wait()


def run_ours(size: int, pattern: str, warmup: float, plane: str = "") -> dict:
    """Our post-copy of a seq-write / seq-read guest of the same size between two local agents."""
    workload = {"write": "seq-write", "read": "seq-read"}[pattern]
    spec = pb.GuestSpec(size=size, workload=workload, seed=1, ops=10**12, threads=1, ops_per_sec=0,
                        page_size=mmap.PAGESIZE)
    with tempfile.TemporaryDirectory(prefix="compare-ours-") as tmp, \
            LocalAgent("source", log_path=f"{tmp}/source.log") as src, \
            LocalAgent("dest", log_path=f"{tmp}/dest.log") as dst:
        with AgentClient(src.address) as c:
            c.call("LaunchGuest", pb.LaunchGuestRequest(name="cmp", spec=spec), timeout=600)
            wait_for(lambda: False, timeout=warmup)
        try:
            doc = orchestrator.migrate("cmp", src.address, dst.address, run_options("postcopy", "", plane))
        finally:
            with AgentClient(dst.address) as c:
                c.stop_if_hosted("cmp")
    return {"total_s": doc["total_s"], "downtime_ms": doc["downtime_ms"], "remote_faults": doc["faults"]["count"],
            "blocked_ms": doc["guest"]["blocked_ms"], "wire_mib": doc["bytes"]["wire"] / MiB,
            "fault_p50_us": doc["faults"]["latency_us"]["p50"]}


def table(size: int, pattern: str, rows: dict[str, dict]) -> str:
    fields = [("total time", "total_s", "{:.2f} s"), ("downtime", "downtime_ms", "{:.1f} ms"),
              ("remote faults (postcopy-requests)", "remote_faults", "{}"),
              ("guest blocked (postcopy-blocktime)", "blocked_ms", "{:.0f} ms"),
              ("fault p50", "fault_p50_us", "{:.0f} µs"), ("bytes on the wire", "wire_mib", "{:.0f} MiB")]
    names = list(rows)
    out = [f"post-copy over loopback, {size // MiB} MiB guest sweeping its RAM ({pattern})", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in fields:
        cells = ["-" if rows[n].get(key) is None else fmt.format(rows[n][key]) for n in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M", help="guest RAM (default 512M)")
    ap.add_argument("--pattern", choices=("write", "read"), default="write", help="what the guest does to each page")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds the guest runs before migrating")
    ap.add_argument("--data-plane", choices=[p.value for p in DataPlane], default="",
                    help="our data plane (default: native)")
    args = ap.parse_args()
    try:
        size = parse_size(args.size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    why = missing()
    if why:
        print(f"skipped: {why}")
        return 0
    rows = {}
    try:
        rows["QEMU post-copy"] = run_qemu(size, args.pattern, args.warmup, preempt=False)
        rows["QEMU post-copy + preempt"] = run_qemu(size, args.pattern, args.warmup, preempt=True)
        rows["migrate (ours)"] = run_ours(size, args.pattern, args.warmup, args.data_plane)
    except (RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table(size, args.pattern, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
