"""cffi (API mode) builder for migrate._native.

Every ``native/*.c`` file is compiled into one extension; every
``native/*.cdef`` file holds the declarations Python may call. C does the
syscalls, ioctls and hot loops; policy stays in Python.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef("\n".join(p.read_text() for p in sorted(HERE.glob("*.cdef"))))
ffibuilder.set_source(
    "migrate._native",
    '#include "migrate_native.h"',
    sources=[str(p.relative_to(HERE.parent)) for p in sorted(HERE.glob("*.c"))],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    # Development build: run from the project root; places the extension
    # next to the package (migrate/_native.*.so) for an editable checkout.
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=False)
    # ... and the KVM guest image next to its runner (migrate/guest/kvm_image.bin).
    import runpy
    runpy.run_path(str(HERE / "guest" / "build_image.py"))["build"]()
