"""cffi (API mode) builders for the two native extensions.

``migrate._native``: the production layer (userfaultfd, bitmaps, page
batches, digest, dirty tracking, data plane, snapshots, the KVM VMM).
``migrate.guest._workloads``: the synthetic guest workloads (workload.c),
which only the test and demo guests run.

The headers are the one source of truth for what Python may call: the cdef
of each extension is the text between ``/* cffi: begin */`` and
``/* cffi: end */`` in its headers (any number of sections a header), where
``#define NAME value`` becomes ``#define NAME ...`` (cffi reads the value
from the compiled code), and a comment ``/* cffi: constants NAME ... */``
declares constants a system header defines (``#define NAME ...`` each).
Nothing else in a header reaches Python (C-only helpers stay out).
"""
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
_COMPILE = {"extra_compile_args": ["-O2", "-std=gnu11", "-Wall", "-pthread"], "extra_link_args": ["-pthread"]}

#: extension -> (its headers, in declaration order; its C sources)
EXTENSIONS = {
    "migrate._native": (
        ["uffd.h", "bitmap.h", "pages.h", "dirty.h", "snapshot.h", "alloc.h", "dp_wire.h", "dp_common.h",
         "dp_source.h", "dp_dest.h", "kvm.h"],
        ["alloc.c", "bitmap.c", "dirty.c", "dp_common.c", "dp_dest.c", "dp_source.c", "kvm.c", "pages.c",
         "snapshot.c", "uffd.c"],
    ),
    # bitmap.c too: a discard sets its pages' bits (mig_wl_watch_discards); stateless, so two copies are harmless.
    "migrate.guest._workloads": (["workload.h"], ["workload.c", "bitmap.c"]),
}

_SECTION = re.compile(r"/\* cffi: begin \*/(.*?)/\* cffi: end \*/", re.DOTALL)
_CONSTANTS = re.compile(r"/\* cffi: constants\s(.*?)\*/", re.DOTALL)
_DEFINE = re.compile(r"^(\s*#define\s+\w+)\s+.*$", re.MULTILINE)


def cdef_of(header: Path) -> str:
    """The declarations Python sees from one header (see the module docstring)."""
    text = header.read_text()
    parts = [f"/* {header.name} */"]
    parts += (f"#define {name} ..." for m in _CONSTANTS.finditer(text) for name in re.findall(r"\w+", m.group(1)))
    parts += (_DEFINE.sub(r"\1 ...", m.group(1)) for m in _SECTION.finditer(text))
    return "\n".join(parts)


def builder(module: str) -> FFI:
    """The cffi builder of one extension (module: a key of EXTENSIONS)."""
    headers, sources = EXTENSIONS[module]
    ffi = FFI()
    ffi.cdef("\n".join(cdef_of(HERE / h) for h in headers))
    ffi.set_source(
        module,
        "\n".join(f'#include "{h}"' for h in headers),
        sources=[f"native/{c}" for c in sources],
        include_dirs=[str(HERE)],
        **_COMPILE,
    )
    return ffi


native_ffi = builder("migrate._native")
workloads_ffi = builder("migrate.guest._workloads")

if __name__ == "__main__":
    # Development build: run from the project root; places each extension
    # in the package (migrate/_native.*.so, migrate/guest/_workloads.*.so)
    # for an editable checkout ...
    for ffi in (native_ffi, workloads_ffi):
        ffi.compile(tmpdir=str(HERE.parent), verbose=False)
    # ... and the KVM guest image next to its runner (migrate/guest/kvm_image.bin).
    import runpy
    runpy.run_path(str(HERE / "guest" / "build_image.py"))["build"]()
