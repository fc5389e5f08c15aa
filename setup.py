"""Build hooks: compiles native/ into two cffi (API mode) extensions,
migrate._native (the production layer) and migrate.guest._workloads (the
synthetic workloads), see native/build_native.py; and the KVM guest image
(native/guest/) into migrate/guest/kvm_image.bin."""
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithGuestImage(build_py):
    """build_py, plus the guest image compiled with the system's gcc/ld/objcopy."""

    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location("build_image", ROOT / "native" / "guest" / "build_image.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.build(Path(self.build_lib) / "migrate" / "guest" / "kvm_image.bin")


setup(
    cffi_modules=["native/build_native.py:native_ffi", "native/build_native.py:workloads_ffi"],
    cmdclass={"build_py": BuildWithGuestImage},
)
