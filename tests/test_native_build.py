"""The native layer's declarations come from its headers, once (native/build_native.py)."""
from __future__ import annotations

import importlib
import re
import runpy
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parent.parent / "native"
pytestmark = pytest.mark.skipif(not (NATIVE / "build_native.py").exists(), reason="needs the source tree")


@pytest.fixture(scope="module")
def build() -> dict:
    return runpy.run_path(str(NATIVE / "build_native.py"))


def test_no_declaration_is_kept_by_hand_beside_the_headers() -> None:
    assert not list(NATIVE.glob("*.cdef"))


def test_every_name_a_header_marks_for_python_is_in_its_extension(build: dict) -> None:
    for module, (headers, _) in build["EXTENSIONS"].items():
        lib = importlib.import_module(module).lib
        for header in headers:
            cdef = re.sub(r"/\*.*?\*/", "", build["cdef_of"](NATIVE / header), flags=re.DOTALL)
            names = set(re.findall(r"(\w+)\(", cdef)) | set(re.findall(r"#define (\w+)", cdef))
            assert names, f"{header} gives {module} nothing"
            assert not [n for n in names if not hasattr(lib, n)], (module, header)


def test_a_define_reaches_python_with_its_compiled_value(build: dict) -> None:
    from migrate._native import lib

    assert "#define MIG_BATCH_ROOM_FIXED ..." in build["cdef_of"](NATIVE / "pages.h")
    assert lib.MIG_BATCH_ROOM_FIXED == 84 and lib.DP_KEY_LEN == 32


def test_the_workloads_live_apart_from_the_production_layer() -> None:
    from migrate._native import lib as native
    from migrate.guest._workloads import lib as workloads

    assert hasattr(workloads, "mig_wl_new") and not hasattr(native, "mig_wl_new")
    assert hasattr(native, "mig_uffd_copy") and not hasattr(workloads, "mig_uffd_copy")
