#!/usr/bin/env python3
"""Regenerate migrate/proto/*_pb2*.py and migrate_pb2.pyi from proto/migrate.proto.

The generated modules are kept in the repository so that installing needs no
protoc; tests/test_proto.py fails when they are stale. The .pyi stub gives
the message classes to mypy (the runtime module builds them from a descriptor). grpc_tools emits a
top-level ``import migrate_pb2``; we rewrite it to a package-relative import.

usage: python scripts/gen_proto.py [OUTDIR]   (default: migrate/proto)
"""
import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={outdir}",
        f"--pyi_out={outdir}",
        f"--grpc_python_out={outdir}",
        str(ROOT / "proto" / "migrate.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    grpc_file = outdir / "migrate_pb2_grpc.py"
    text = re.sub(r"^import migrate_pb2 as", "from . import migrate_pb2 as",
                  grpc_file.read_text(), flags=re.M)
    grpc_file.write_text(text)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "migrate" / "proto")
