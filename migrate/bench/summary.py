"""Per-cell statistics of a bench: min/median/max of every metric, as CSV and as a table."""
from __future__ import annotations

import csv
import statistics
from collections.abc import Callable

from migrate.units import MiB

#: metric name -> how to read it from a run record (report + the cell's baseline).
METRICS: dict[str, Callable[[dict, dict | None], float]] = {
    "total_s": lambda r, b: r["total_s"],
    "downtime_ms": lambda r, b: r["downtime_ms"],
    "faults": lambda r, b: r["faults"]["count"],
    "fault_p50_us": lambda r, b: r["faults"]["latency_us"]["p50"],
    "fault_p99_us": lambda r, b: r["faults"]["latency_us"]["p99"],
    "fault_max_us": lambda r, b: r["faults"]["latency_us"]["max"],
    "pages_pushed": lambda r, b: r["pages"]["pushed"],
    "pages_faulted": lambda r, b: r["pages"]["faulted"],
    "wire_mib": lambda r, b: r["bytes"]["wire"] / MiB,
    "compression_ratio": lambda r, b: r["compression_ratio"],
    "blocked_ms": lambda r, b: r["guest"]["blocked_ms"],
    "guest_ops_per_s": lambda r, b: r["guest"]["ops_per_s_during"],
    "vs_baseline": lambda r, b: r["guest"]["ops_per_s_during"] / b["ops_per_s"] if b and b["ops_per_s"] else 0.0,
}
CELL_COLUMNS = ("link", "level", "size", "workload", "mode", "plane")


def cells(records: list[dict]) -> list[dict]:
    """One row per cell: its axes, run counts, baseline, and min/median/max per metric."""
    order: list[str] = []
    by_key: dict[str, dict] = {}
    for r in records:
        if r["key"] not in by_key:
            order.append(r["key"])
            by_key[r["key"]] = {"cell": r["cell"], "baseline": None, "runs": [], "failed": 0}
        entry = by_key[r["key"]]
        if r["kind"] == "baseline":
            entry["baseline"] = r.get("baseline")
        elif "error" in r:
            entry["failed"] += 1
        else:
            entry["runs"].append(r["report"])
    rows = []
    for key in order:
        e = by_key[key]
        row = {c: e["cell"].get(c, "grpc" if c == "plane" else None) for c in CELL_COLUMNS}  # before planes: grpc
        row["size_mib"] = row.pop("size") // MiB
        row.update(runs=len(e["runs"]), failed=e["failed"],
                   verified=all(run.get("verified") for run in e["runs"]) if e["runs"] else "",
                   baseline_s=e["baseline"]["wall_s"] if e["baseline"] else "",
                   baseline_ops_per_s=e["baseline"]["ops_per_s"] if e["baseline"] else "")
        for name, read in METRICS.items():
            xs = [read(run, e["baseline"]) for run in e["runs"]]
            for stat, fn in (("min", min), ("median", statistics.median), ("max", max)):
                row[f"{name}_{stat}"] = round(fn(xs), 4) if xs else ""
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def table(rows: list[dict]) -> str:
    """Medians per cell, for a terminal (and issue notes: it is valid Markdown)."""
    head = ["link", "mode", "plane", "workload", "MiB", "zstd", "runs", "total s", "downtime ms", "faults",
            "fault p50 µs", "fault p99 µs", "faulted", "pushed", "wire MiB", "ratio", "guest vs baseline",
            "verified"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def med(name: str, fmt: str) -> str:
            v = r[f"{name}_median"]  # noqa: B023 (called within this iteration only)
            return "-" if v == "" else format(v, fmt)
        lines.append("| " + " | ".join([
            r["link"], r["mode"], r["plane"], r["workload"], str(r["size_mib"]), str(r["level"]),
            f"{r['runs']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
            med("total_s", ".2f"), med("downtime_ms", ".1f"), med("faults", ".0f"), med("fault_p50_us", ".0f"),
            med("fault_p99_us", ".0f"), med("pages_faulted", ".0f"), med("pages_pushed", ".0f"),
            med("wire_mib", ".1f"), med("compression_ratio", ".2f"),
            "-" if r["vs_baseline_median"] == "" else f"{r['vs_baseline_median']:.0%}",
            {True: "yes", False: "NO", "": "-"}[r["verified"]]]) + " |")
    return "\n".join(lines)
