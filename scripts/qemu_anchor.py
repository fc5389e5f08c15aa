"""QEMU as the anchor of our measurements: its post-copy over QMP, its guests, and the CPU it spends.

Shared by scripts/compare_qemu.py (one guest, QEMU's post-copy next to
ours), scripts/drain_qemu.py (many guests at once) and
scripts/bench_snapshot.py (QEMU's background snapshot): launching QEMU with
a QMP socket, the two guests both sides can run (TinyGuest: 36 bytes that
sweep RAM; KvmImageGuest: the kvm guest kind's image), one guest's
source/destination pair armed for post-copy (QemuPair), and CpuMeter,
which tells a VMM's or an agent's own CPU from its guest's.

scripts/ is not a package: its scripts import this module after putting
their own directory (and only it) first on sys.path.
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
import threading
import time

from migrate.bench.procs import descendants
from migrate.names import Content
from migrate.planes import DataPlane, FaultPath
from migrate.proto import migrate_pb2 as pb

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


def add_our_options(ap: argparse.ArgumentParser) -> None:
    """--data-plane and --fault-path: how our side of a comparison runs."""
    ap.add_argument("--data-plane", choices=[p.value for p in DataPlane], default="",
                    help="our data plane (default: native)")
    ap.add_argument("--fault-path", choices=[p.value for p in FaultPath], default="",
                    help="our fault path (default: grpc; native needs the native data plane)")


def missing() -> str | None:
    """Why this machine cannot run the comparison, or None."""
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as err:
        return f"/dev/kvm is not usable: {err.strerror}"
    return None


def skipped(why: str | None) -> bool:
    """True, having said so, when `why` (missing()'s answer) says this machine cannot run QEMU: the
    scripts then exit 0."""
    if why:
        print(f"skipped: {why}")
    return bool(why)


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
        self.file.close()
        self.sock.close()


def launch_qemu(tmp: str, role: str, argv: list[str]) -> tuple[subprocess.Popen, Qmp]:
    """QEMU with its QMP socket, files and log in `tmp` under `role`'s name; killed again if QMP never answers."""
    sock = os.path.join(tmp, f"{role}.qmp")
    # debug-threads: vCPU threads named "CPU n/KVM", which CpuMeter tells apart
    with open(os.path.join(tmp, f"{role}.log"), "wb") as log:
        proc = subprocess.Popen([*argv, "-name", f"{role},debug-threads=on",
                                 "-qmp", f"unix:{sock},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
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


def _cpu_ms(pid: int) -> tuple[float, float]:
    """CPU of a process's threads, live and exited: (all but QEMU's vCPU threads ("CPU n/KVM"), those)."""
    _, f = _stat(f"/proc/{pid}/stat")
    ticks = int(f[11]) + int(f[12])  # utime stime (cutime: reaped children, our guest runners among them)
    vcpus = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, t = _stat(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:
            continue
        if comm.startswith("CPU ") and comm.endswith("/KVM"):
            vcpus += int(t[11]) + int(t[12])
    return (ticks - vcpus) * _TICK_MS, vcpus * _TICK_MS


def _is_runner(pid: int) -> bool:
    """Is pid one of our guest runners (whose threads are the vCPUs, or the synthetic guest's workers)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"migrate.guest." in f.read()
    except OSError:
        return False


class CpuMeter:
    """The CPU a VMM or an agent spends on a migration, helper processes included, and apart from it
    the CPU its guests' vCPUs burn (QEMU's vCPU threads; our guest runners): sampled every 50 ms from
    `with` to its end, so a process that exits meanwhile counts up to its last sample. A load-independent
    view of where the time goes."""

    def __init__(self, *roots: int) -> None:
        self._roots = roots
        self._base: dict[int, tuple[float, float]] = {}  # at the start; processes started later begin at 0
        self._last: dict[int, tuple[int, float, float]] = {}  # pid -> (its root, its own CPU ms, its guest's)
        self._runners: set[int] = set()  # once a runner, always: its command line is empty once it has exited
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _walk_into(self, pid: int) -> bool:
        """Whether to walk into pid's children: not a guest runner's (a runner stands for its whole guest)."""
        if _is_runner(pid):
            self._runners.add(pid)
        return pid not in self._runners

    def _sample(self) -> None:
        for pid, root in descendants(self._roots, self._walk_into).items():
            try:
                own, vcpus = _cpu_ms(pid)
            except FileNotFoundError:
                continue
            self._last[pid] = (root, 0.0, own + vcpus) if pid in self._runners else (root, own, vcpus)

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self._base = {pid: (own, guest) for pid, (_, own, guest) in self._last.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def spent_ms(self, *roots: int) -> tuple[float, float]:
        """(own CPU, guests' CPU) in ms over the measured span, summed over the trees of `roots`."""
        own = guest = 0.0
        for pid, (root, o, g) in self._last.items():
            if root in roots:
                base = self._base.get(pid, (0.0, 0.0))
                own, guest = own + o - base[0], guest + g - base[1]
        return own, guest

    def per_mib(self, mib: float) -> dict[str, float]:
        """The first root's own CPU (its tree's) and the second's, per MiB over the measured span, in ms."""
        return {"src_cpu_ms_mib": self.spent_ms(self._roots[0])[0] / mib,
                "dst_cpu_ms_mib": self.spent_ms(self._roots[1])[0] / mib}


def free_port() -> int:
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
        """Until the guest has filled its RAM and done its first ops (a guest of no ops: until its digest,
        which follows the fill), as run_ours waits for ours (its start line comes before the fill, which
        under QEMU can outlast the warm-up: it would migrate half-zero RAM and count no ops). Without
        `qmp`, only until the line says where it counts them."""
        deadline = time.monotonic() + timeout
        while True:
            text = self._text(tmp, "source")
            if (addr := said(text, " ops_done ")) is not None:
                self._ops_addr = int(addr, 16)
                if qmp is None or (said(text, "digest ") if self.spec.ops == 0
                                   else self.qemu_ops(tmp, "source", qmp)):
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


def wait_migration(qmp: Qmp, what: str, timeout: float = 600.0, every: float = 0.05) -> dict:
    """query-migrate every `every` s until QEMU's migration (or snapshot: `what`) completes; RuntimeError
    if it fails."""
    deadline = time.monotonic() + timeout
    while (info := qmp.cmd("query-migrate")).get("status") not in ("completed", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU's {what} did not complete within {timeout:g} s")
        time.sleep(every)
    if info["status"] == "failed":
        raise RuntimeError(f"QEMU's {what} failed: {info.get('error-desc', '?')}")
    return info


class QemuPair:
    """One guest's source and destination QEMU over loopback, armed for post-copy: the source boots the
    guest, the destination waits for the stream (-incoming); migrate() moves the guest straight to
    post-copy (no pre-copy rounds). Files in `tmp`, named by role; close() kills both by PID.

    `stopped`: the guest's vCPUs do not run on the destination (-S: it stays paused), and stop() stops
    them on the source, for a guest whose work is done: the kvm image's vCPUs spin once done (our VMM no
    longer runs them), which would burn a core of the migration's."""

    def __init__(self, guest: TinyGuest | KvmImageGuest, tmp: str, preempt: bool = False,
                 stopped: bool = False) -> None:
        self.guest, self.tmp = guest, tmp
        self.procs: list[subprocess.Popen] = []
        self.qmps: list[Qmp] = []
        self.port = free_port()
        try:
            self.src, self.src_qmp = self._launch("source", [])
            self.dst, self.dst_qmp = self._launch("dest", ["-incoming", "defer"] + (["-S"] if stopped else []))
            caps = [{"capability": "postcopy-ram", "state": True}]
            if preempt:
                caps.append({"capability": "postcopy-preempt", "state": True})
            self.src_qmp.cmd("migrate-set-capabilities", capabilities=caps)
            self.dst_qmp.cmd("migrate-set-capabilities",
                             capabilities=caps + [{"capability": "postcopy-blocktime", "state": True}])
            self.dst_qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{self.port}")
        except BaseException:
            self.close()
            raise

    def _launch(self, role: str, extra: list[str]) -> tuple[subprocess.Popen, Qmp]:
        proc, qmp = launch_qemu(self.tmp, role, self.guest.qemu_argv(self.tmp, role) + extra)
        self.procs.append(proc)
        self.qmps.append(qmp)
        return proc, qmp

    def stop(self) -> None:
        """Stop the guest's vCPUs on the source."""
        self.src_qmp.cmd("stop")

    def migrate(self, every: float = 0.05) -> tuple[dict, dict]:
        """Post-copy to the destination: (the source's query-migrate at the end, the destination's), the
        source asked every `every` s meanwhile."""
        self.src_qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{self.port}")
        self.src_qmp.cmd("migrate-start-postcopy")
        info = wait_migration(self.src_qmp, "migration", every=every)
        return info, self.dst_qmp.cmd("query-migrate")

    def close(self) -> None:
        for qmp in self.qmps:
            qmp.close()
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()
        self.qmps.clear()

    def __enter__(self) -> QemuPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def downtime_ms(info: dict) -> float:
    """query-migrate's downtime. QEMU 7.2 takes a post-copy switchover of under 1 ms (downtime 0) for
    "not set" and reports the time since its clock's zero, the host's uptime, instead: 0 then."""
    downtime = float(info.get("downtime", 0))
    return 0.0 if downtime > info.get("total-time", 0) else downtime


def blocked(per_vcpu: list[float]) -> dict:
    """Guest blocked time summed over the vCPUs, and each vCPU's (QEMU's postcopy-blocktime alone counts
    only the time all vCPUs were blocked at once: with 2 vCPUs not what ours sums)."""
    return {"blocked_ms": float(sum(per_vcpu)), "vcpu_blocked": " / ".join(f"{b:.0f}" for b in per_vcpu) + " ms"}


def qemu_blocked(dinfo: dict) -> dict:
    """blocked() of a QEMU destination's query-migrate (postcopy-vcpu-blocktime, per vCPU)."""
    return blocked(dinfo.get("postcopy-vcpu-blocktime") or [dinfo.get("postcopy-blocktime", 0)])
