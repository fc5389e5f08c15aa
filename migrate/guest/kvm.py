"""The kvm guest kind: a minimal VMM (native/kvm.c) running the multiboot
guest image (native/guest/) on guest RAM.

    python -m migrate.guest.kvm [--image PATH] RUNNER-ARGS...

Same arguments, control protocol, memfd layout and restore mode as the
synthetic runner (migrate.guest.runner): only the engine differs. Guest RAM
is one KVM memory slot over the memfd mapping, so on a destination the
vCPU threads fault through KVM into the userfaultfd the runner handed to
its agent. ``--threads`` is the vCPU count.

Source mode loads the image (the shipped migrate/guest/kvm_image.bin unless
--image) like a multiboot loader: the image at its load address, the
multiboot info and command line (`workload=W seed=S ops=N vcpus=V vmm=1`)
below 1 MiB, the bootstrap vCPU at the entry in 32-bit protected mode.

The execution state (pause/state/resume) holds, per vCPU, KVM's general
and special registers, XSAVE area, XCRs, pending events and the MSRs the
kernel has (base64 of KVM's structs), plus the ops it reported and whether
it is started / finished. ``stats`` adds ``vcpu_blocked_ms`` (per vCPU, time
asleep inside KVM_RUN: waiting on missing pages, see native/kvm.c) and
``guest_digest`` (what the guest reported for its own memory at the end).
"""
from __future__ import annotations

import argparse
import base64
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

from migrate.guest.runner import WARM_IMPORTS, Runner, parse_args  # noqa: F401 - WARM_IMPORTS: for migrate.guest.warm
from migrate.guest.runner import main as runner_main
from migrate.names import GuestKind

IMAGE = Path(__file__).with_name("kvm_image.bin")
MAX_VCPUS = 16
#: The image must end below the workload region (native/guest/guest.c WL_BASE).
IMAGE_AREA = (1 << 20, 4 << 20)
#: The workload region leaves 2 MiB at the top of RAM (QEMU's firmware tables).
MIN_SIZE = 8 << 20
#: QEMU's pc machine keeps RAM below 4 GiB up to 3.5 GiB; the guest maps 4 GiB.
MAX_SIZE = 3 << 30
MBI_ADDR, CMDLINE_ADDR = 0x9000, 0x9100
MB_MAGIC, MB_LOADER_MAGIC, MB_AOUT_KLUDGE = 0x1BADB002, 0x2BADB002, 1 << 16
STATE_VERSION = 1
PARTS = ("regs", "sregs", "xsave", "xcrs", "events")
#: The order KVM wants them back: special registers before general, XCRs before XSAVE, events last.
SET_ORDER = ("sregs", "regs", "xcrs", "xsave", "events")


class KvmError(ValueError):
    """The kvm guest cannot run: no usable /dev/kvm, a bad image, a bad spec."""


def check_spec(spec: Any) -> None:
    """KvmError unless a GuestSpec of kind kvm can run (its vCPUs are its threads)."""
    if not 1 <= spec.threads <= MAX_VCPUS:
        raise KvmError(f"a kvm guest has 1 to {MAX_VCPUS} vCPUs, not {spec.threads}")
    if not MIN_SIZE <= spec.size <= MAX_SIZE:
        raise KvmError(f"a kvm guest has {MIN_SIZE >> 20} MiB to {MAX_SIZE >> 30} GiB of RAM, not {spec.size} bytes")
    if spec.size % (1 << 20):
        raise KvmError(f"a kvm guest's RAM is whole MiB (QEMU's -m), not {spec.size} bytes")
    if spec.ops_per_sec:
        raise KvmError("a kvm guest runs unthrottled: ops_per_sec must be 0")


def kvm_device() -> str:
    """The KVM device: /dev/kvm, or $MIGRATE_KVM_DEVICE (tests point it at a missing file)."""
    return os.environ.get("MIGRATE_KVM_DEVICE") or "/dev/kvm"


def kvm_problem() -> str | None:
    """Why the KVM device cannot run a guest here, or None."""
    dev = kvm_device()
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        return f"{dev} is not usable: {err.strerror}"
    return None


def cmdline(spec: Any, vmm: bool = True) -> str:
    """The guest's multiboot command line (QEMU: -append; `vmm=1`: our VMM starts the other vCPUs)."""
    line = f"workload={spec.workload} seed={spec.seed} ops={spec.ops} vcpus={spec.threads}"
    return line + (" vmm=1" if vmm else "")


def qemu_argv(spec: Any, debugcon: str, image: Path = IMAGE) -> list[str]:
    """QEMU booting the same image with the same parameters; the guest's text goes to file `debugcon`."""
    return ["qemu-system-x86_64", "-accel", "kvm", "-m", f"{spec.size >> 20}M", "-smp", str(spec.threads),
            "-nodefaults", "-display", "none", "-kernel", str(image), "-append", cmdline(spec, vmm=False),
            "-debugcon", f"file:{debugcon}"]


def parse_image(data: bytes, size: int) -> tuple[int, int, bytes]:
    """(load address, entry, bytes to load) of a multiboot a.out-kludge image; KvmError otherwise."""
    for off in range(0, min(len(data), 8192) - 31, 4):
        magic, flags, check = struct.unpack_from("<3I", data, off)
        if magic == MB_MAGIC and (magic + flags + check) & 0xFFFFFFFF == 0:
            break
    else:
        raise KvmError("not a multiboot image: no valid header in its first 8 KiB")
    if not flags & MB_AOUT_KLUDGE:
        raise KvmError("multiboot image without load addresses (flag 16): ELF images are not supported")
    header, load, load_end, bss_end, entry = struct.unpack_from("<5I", data, off + 12)
    start = off - (header - load)
    if not load <= header or start < 0:
        raise KvmError(f"multiboot header at 0x{header:x} lies before its load address 0x{load:x}")
    load_end = load_end or load + len(data) - start
    bss_end = max(bss_end, load_end)
    lo, hi = IMAGE_AREA
    if load < lo or bss_end > min(hi, size):
        raise KvmError(f"image occupies 0x{load:x}-0x{bss_end:x}: it must fit in 0x{lo:x}-0x{hi:x}")
    if load_end - load > len(data) - start:
        raise KvmError(f"image file holds {len(data) - start} bytes, its header loads {load_end - load}")
    if not load <= entry < load_end:
        raise KvmError(f"entry 0x{entry:x} is outside the loaded image 0x{load:x}-0x{load_end:x}")
    return load, entry, data[start:start + load_end - load]


def _ffi() -> tuple[Any, Any]:
    from migrate._native import ffi, lib
    return ffi, lib


class Machine:
    """The VM, with the workload engine's interface (start/pause/state/progress)
    so that migrate.guest.runner drives it unchanged."""

    def __init__(self, mem: Any, spec: Any) -> None:
        ffi, lib = _ffi()
        self.spec = spec
        self._mem = mem
        self.size = spec.size
        self.n = spec.threads
        self._buf = ffi.from_buffer("uint8_t[]", mem, require_writable=True)
        err = ffi.new("char[256]")
        vm = lib.mig_kvm_new(kvm_device().encode(), self._buf, self.size, self.n, err, 256)
        if vm == ffi.NULL:
            ffi.release(self._buf)
            raise KvmError(ffi.string(err).decode(errors="replace"))
        self._vm = vm
        self._first_ns = 0
        self._last_ns = 0
        self._ran = False                    # the latest start ran a vCPU
        self._text = b""
        self.guest_digest = ""

    @property
    def address(self) -> int:
        ffi, _ = _ffi()
        return int(ffi.cast("uintptr_t", self._buf))

    def watch_discards(self, removed: object) -> None:
        """Nothing in a KVM guest discards its RAM (no balloon device): nothing to report."""

    def attach_snapshot(self, snap: object) -> None:
        """As watch_discards: no discard ever needs a page saved first."""

    def boot(self, image: bytes) -> None:
        """Load a multiboot image and multiboot info; the bootstrap vCPU waits at the entry."""
        load, entry, body = parse_image(image, self.size)
        line = cmdline(self.spec).encode() + b"\0"
        mem = self._mem
        mem[load:load + len(body)] = body
        mem[CMDLINE_ADDR:CMDLINE_ADDR + len(line)] = line
        # flags: mem_lower/mem_upper (bit 0) and cmdline (bit 2)
        mem[MBI_ADDR:MBI_ADDR + 20] = struct.pack("<5I", 1 | 4, 640, (self.size >> 10) - 1024, 0, CMDLINE_ADDR)
        rc = _ffi()[1].mig_kvm_boot(self._vm, entry, MBI_ADDR)
        if rc:
            raise OSError(-rc, f"cannot set the boot vCPU's state: {os.strerror(-rc)}")

    # ------------------------------------------------------ engine interface
    def _info(self) -> list[Any]:
        ffi, lib = _ffi()
        out = []
        for i in range(self.n):
            info = ffi.new("mig_kvm_vcpu_info *")
            lib.mig_kvm_info(self._vm, i, info)
            out.append(info)
        return out

    def start(self) -> None:
        """Run the started, unfinished vCPUs (none: nothing runs, as a finished workload)."""
        ffi, lib = _ffi()
        self._ran = any(v.active and not v.finished for v in self._info())
        if self._ran:
            self._first_ns = time.time_ns()
        rc = lib.mig_kvm_start(self._vm)
        if rc:
            raise RuntimeError(f"cannot start the vCPUs: {os.strerror(-rc)}")

    def pause(self) -> None:
        """Stop every vCPU between two instructions. The last op's time is taken here
        (for a finished guest: when the runner's progress loop notices, within ~20 ms)."""
        was_running = self.running
        _ffi()[1].mig_kvm_pause(self._vm)
        if was_running and self._ran:
            self._last_ns = time.time_ns()
        self._ran = False

    @property
    def running(self) -> bool:
        return bool(_ffi()[1].mig_kvm_running(self._vm))

    @property
    def finished(self) -> bool:
        return all(v.finished for v in self._info())

    @property
    def ops_done(self) -> int:
        return sum(v.ops for v in self._info())

    def first_op_ns(self) -> int:
        return self._first_ns

    def last_op_ns(self) -> int:
        return self._last_ns

    def error(self) -> str:
        ffi, lib = _ffi()
        buf = ffi.new("char[256]")
        lib.mig_kvm_error(self._vm, buf, 256)
        return ffi.string(buf).decode(errors="replace")

    def vcpu_blocked_ms(self) -> list[float]:
        return [round(v.blocked_ns / 1e6, 3) for v in self._info()]

    def vcpu_run_ms(self) -> list[float]:
        return [round(v.run_ns / 1e6, 3) for v in self._info()]

    def poll_text(self) -> list[str]:
        """The guest's complete text lines since the last call (a "digest" line is remembered)."""
        ffi, lib = _ffi()
        buf = ffi.new("char[4096]")
        n = lib.mig_kvm_text(self._vm, buf, 4096)
        self._text += ffi.buffer(buf, n)[:]
        *lines, self._text = self._text.split(b"\n")
        out = [raw.decode(errors="replace") for raw in lines]
        for line in out:
            if line.startswith("digest "):
                self.guest_digest = line.split()[1]
        return out

    def export_state(self) -> dict:
        """The execution state; vCPU registers only while paused (exact then).

        The guest's text is read first and its unfinished line carried along:
        a digest the guest wrote since the last poll, or half of one, would
        otherwise stay behind on this host."""
        self.poll_text()
        ffi, lib = _ffi()
        vcpus = []
        paused = not self.running
        for i, info in enumerate(self._info()):
            v: dict[str, Any] = {"ops": info.ops, "active": bool(info.active), "finished": bool(info.finished)}
            if paused and info.active:
                for part, name in enumerate(PARTS):
                    size = lib.mig_kvm_part_size(self._vm, part)
                    buf = ffi.new("uint8_t[]", size)
                    rc = lib.mig_kvm_get_part(self._vm, i, part, buf, size)
                    if rc < 0:
                        raise OSError(-rc, f"vCPU {i}: cannot read its {name}: {os.strerror(-rc)}")
                    v[name] = base64.b64encode(ffi.buffer(buf, size)[:]).decode()
                idx, val = ffi.new("uint32_t[32]"), ffi.new("uint64_t[32]")
                got = lib.mig_kvm_get_msrs(self._vm, i, idx, val, 32)
                v["msrs"] = [[int(idx[k]), int(val[k])] for k in range(max(got, 0))]
            vcpus.append(v)
        return {"version": STATE_VERSION, "kind": GuestKind.KVM, "workload": self.spec.workload, "seed": self.spec.seed,
                "ops": self.spec.ops, "nvcpus": self.n, "size": self.size, "vcpus": vcpus,
                "guest_digest": self.guest_digest, "text": self._text.decode("latin-1"), "last_op_ns": self._last_ns}

    def import_state(self, state: dict) -> None:
        """Load an exported (paused) state: ValueError if it does not fit this VM."""
        ffi, lib = _ffi()
        if not isinstance(state, dict) or state.get("kind") != GuestKind.KVM \
                or not isinstance(state.get("vcpus"), list):
            raise ValueError("not the execution state of a kvm guest")
        for key, mine in (("workload", self.spec.workload), ("seed", self.spec.seed), ("ops", self.spec.ops),
                          ("nvcpus", self.n), ("size", self.size)):
            if state.get(key) != mine:
                raise ValueError(f"execution state is for {key}={state.get(key)!r}, this guest has {mine!r}")
        if len(state["vcpus"]) != self.n:
            raise ValueError(f"execution state has {len(state['vcpus'])} vCPUs, this guest has {self.n}")
        for i, v in enumerate(state["vcpus"]):
            if v.get("active"):
                self._load_vcpu(i, v)
            rc = lib.mig_kvm_set_progress(self._vm, i, int(v.get("ops", 0)), bool(v.get("active")),
                                          bool(v.get("finished")))
            if rc:
                raise RuntimeError("cannot import state while the vCPUs run")
        self.guest_digest = str(state.get("guest_digest", ""))
        self._text = str(state.get("text", "")).encode("latin-1")
        self._last_ns = int(state.get("last_op_ns", 0))

    def _load_vcpu(self, i: int, v: dict) -> None:
        ffi, lib = _ffi()
        try:
            blobs = {name: base64.b64decode(v[name], validate=True) for name in PARTS}
            msrs = [(int(k), int(d)) for k, d in v.get("msrs", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"execution state vCPU {i}: bad register data ({e})") from None
        for name in SET_ORDER:
            part = PARTS.index(name)
            blob = blobs[name]
            if len(blob) != lib.mig_kvm_part_size(self._vm, part):
                raise ValueError(f"execution state vCPU {i}: {name} is {len(blob)} bytes, this KVM wants "
                                 f"{lib.mig_kvm_part_size(self._vm, part)}")
            rc = lib.mig_kvm_set_part(self._vm, i, part, blob, len(blob))
            if rc:
                raise ValueError(f"execution state vCPU {i}: KVM refuses its {name}: {os.strerror(-rc)}")
        if msrs:
            rc = lib.mig_kvm_set_msrs(self._vm, i, [k for k, _ in msrs], [d for _, d in msrs], len(msrs))
            if rc:
                raise ValueError(f"execution state vCPU {i}: KVM refuses MSR 0x{msrs[-rc - 1][0]:x}")


class KvmRunner(Runner):
    """The runner with a KVM VM as its engine."""

    KIND = GuestKind.KVM
    PROG = "migrate.guest.kvm"
    _reported = ""                           # the VMM error already sent as an event

    def make_engine(self) -> Machine:
        return Machine(self.mem, self.spec)

    def prepare(self) -> None:
        """Load and boot the image, unless --no-fill: RAM and registers then come with a state."""
        if self.args.no_fill:
            return
        path = Path(self.args.image)
        try:
            image = path.read_bytes()
        except OSError as err:
            raise KvmError(f"cannot read the guest image {path}: {err.strerror}") from None
        self.wl.boot(image)

    def progress(self) -> None:
        for line in self.wl.poll_text():
            if not line.startswith("digest "):
                self.send({"event": "guest-text", "line": line[:200]})
        err = self.wl.error()
        if err and err != self._reported:
            self._reported = err
            self.send({"event": "guest-error", "error": err})
        super().progress()

    def stats(self) -> dict:
        self.wl.poll_text()
        return {**super().stats(), "kind": self.KIND, "vcpu_blocked_ms": self.wl.vcpu_blocked_ms(),
                "vcpu_run_ms": self.wl.vcpu_run_ms(),
                "guest_digest": self.wl.guest_digest, "error": self.wl.error()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--image", default=str(IMAGE))
    mine, rest = ap.parse_known_args(argv)
    args = parse_args(rest)
    args.image = mine.image
    return runner_main(runner_cls=KvmRunner, args=args)


if __name__ == "__main__":
    sys.exit(main())
