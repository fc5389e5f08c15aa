"""`migrate plot` on a report: three panels render from the report's fields alone."""
from __future__ import annotations

import json
import subprocess

from migrate import spawn
from migrate.plot import _cdf

MiB = 1 << 20


def report() -> dict:
    """A report as `migrate run --report` writes it (no bench timeline, no baseline)."""
    progress = [{"t_s": -1 + i * 0.1, "ops": i * 100_000, "host": "source"} for i in range(10)]
    progress += [{"t_s": 0.05 + i * 0.1, "ops": 1_000_000 + i * 80_000, "host": "dest"} for i in range(12)]
    return {
        "guest": {"name": "vm1", "size": 64 * MiB, "workload": "hotset", "threads": 1, "blocked_ms": 12.0,
                  "progress": progress, "ops_per_s_before": 1e6, "ops_per_s_during": 8e5},
        "mode": "postcopy", "total_s": 1.2, "downtime_ms": 2.5,
        "pages": {"total": 16384, "received": 16384, "pushed": 15000, "faulted": 1384, "zero": 10,
                  "page_size": 4096},
        "faults": {"count": 100, "latency_us": {"count": 100, "p50": 300.0, "p99": 2000.0, "max": 2100.0,
                                                "mean": 400.0, "hist_log2_us": {"128": 20, "256": 60, "1024": 19,
                                                                                "2048": 1}}},
        "bytes": {"wire": 40 * MiB, "pages": 64 * MiB}, "compression_ratio": 1.6,
    }


def test_cdf_from_log2_histogram():
    xs, ys = _cdf({"256": 60, "128": 20, "1024": 20})
    assert xs == [128, 256, 512, 2048] and ys == [0.0, 0.2, 0.8, 1.0]


def test_report_plot_renders(tmp_path):
    src = tmp_path / "vm1.json"
    src.write_text(json.dumps(report()))
    png = tmp_path / "vm1.png"
    r = subprocess.run(spawn.module_argv("migrate", "plot", str(src), "-o", str(png)),
                       capture_output=True, text=True, timeout=120, env=spawn.child_env())
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_plot_rejects_other_files_in_one_line(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    r = subprocess.run(spawn.module_argv("migrate", "plot", str(bad), "-o", str(tmp_path / "x.png")),
                       capture_output=True, text=True, timeout=60, env=spawn.child_env())
    assert r.returncode == 1 and "neither a migration report nor a bench" in r.stderr and "Traceback" not in r.stderr
