"""Builds the KVM guest image (native/guest/) into a flat multiboot binary.

    python native/guest/build_image.py [OUT]     (default: migrate/guest/kvm_image.bin)

The system's gcc, ld and objcopy compile entry.S and guest.c freestanding,
link them at 1 MiB (guest.ld) and strip the ELF to the loaded bytes: a
multiboot "a.out kludge" image that `qemu-system-x86_64 -kernel` and our VMM
(migrate.guest.kvm) both load. `pip install .` runs this (setup.py).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent.parent / "migrate" / "guest" / "kvm_image.bin"
CFLAGS = ["-O2", "-std=gnu11", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-mno-red-zone", "-mgeneral-regs-only",
          "-fno-tree-loop-distribute-patterns", "-Wall", "-Werror"]


def build(out: Path = DEFAULT_OUT) -> Path:
    """Compile and link the image to `out` (CalledProcessError if a tool fails)."""
    with tempfile.TemporaryDirectory(prefix="kvm-image-") as tmp:
        objs = []
        for src in ("entry.S", "guest.c"):
            obj = Path(tmp) / (src + ".o")
            subprocess.run(["gcc", *CFLAGS, "-c", str(HERE / src), "-o", str(obj)], check=True)
            objs.append(str(obj))
        elf = Path(tmp) / "guest.elf"
        subprocess.run(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-no-pie", "--build-id=none",
                        "--no-warn-rwx-segments", "-T", str(HERE / "guest.ld"), "-o", str(elf), *objs], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "-j", ".rodata", "-j", ".data",
                        str(elf), str(out)], check=True)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
