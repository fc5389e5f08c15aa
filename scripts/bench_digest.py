#!/usr/bin/env python3
"""The batch digest alone (mig_digest, docs/protocol.md "Digest"): GB/s and CPU-ms per MiB.

Two sizes: a batch's 512 KiB, digested again and again (in cache, as at the
destination, which digests what it has just received), and 256 MiB (from
memory, as at the source, which reads the guest's pages once). Timed with
this thread's CPU time, best of --repeat, so a shared machine disturbs it
little. Protocol 1's digest measured 23 GB/s in cache and 22.5 GB/s from
memory on the development machine (docs/performance.md).

usage: python scripts/bench_digest.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1 << 20
SIZES = (("in cache, 512 KiB", 512 << 10), ("from memory, 256 MiB", 256 * MiB))
BYTES_PER_TIMING = 2048 * MiB


def measure(size: int, repeat: int) -> float:
    """Best seconds to digest BYTES_PER_TIMING bytes, `size` bytes a call."""
    from migrate._native import ffi, lib

    from migrate.guest.workloads import fill_random

    data = bytearray(size)
    fill_random(data, seed=7)
    buf = ffi.from_buffer("uint8_t[]", data)
    calls = max(1, BYTES_PER_TIMING // size)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        for _ in range(calls):
            lib.mig_digest(buf, size)
        best = min(best, time.thread_time() - t0)
    return best * size * calls / BYTES_PER_TIMING


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timings of each size; the best is reported")
    args = ap.parse_args()
    for label, size in SIZES:
        seconds = measure(size, args.repeat)
        print(f"{label:>22}: {BYTES_PER_TIMING / seconds / 1e9:6.1f} GB/s, "
              f"{seconds * 1000 / (BYTES_PER_TIMING / MiB):.4f} CPU-ms per MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
