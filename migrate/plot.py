"""`migrate plot`: pictures of one migration report or of a whole bench.

A report (or one run of a bench) gets three panels: pages arrived over
time, pushed vs faulted, with the switchover marked; the fault latency CDF;
the guest's throughput over time against its unmigrated baseline. A bench
gets grouped bars per mode (median, whiskers min..max) of total time,
downtime, bytes on the wire and guest throughput against the baseline.
matplotlib is imported only here, and only when a plot is drawn.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any

from migrate.bench import driver, results
from migrate.names import Mode
from migrate.units import MiB

SOURCE_COLOR, DEST_COLOR, PUSH_COLOR, FAULT_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"


def load(path: str) -> tuple[str, Any]:
    """("report", dict) for a `migrate run --report` file, ("bench", records) for a bench file or directory."""
    if os.path.isdir(path):
        path = os.path.join(path, driver.RESULTS)
    if not os.path.isfile(path):
        raise ValueError(f"no such report or bench: {path}")
    try:
        with open(path) as f:
            doc = json.load(f)
        if isinstance(doc, dict) and "pages" in doc:
            return "report", doc
    except ValueError:
        pass
    records = results.load(path)
    if not records or "kind" not in records[0]:
        raise ValueError(f"{path} is neither a migration report nor a bench results file")
    return "bench", records


def bench_run(records: list[dict], index: int) -> tuple[dict, dict | None]:
    """The index-th successful run of a bench and its cell's baseline."""
    ok = [r for r in records if r["kind"] == "run" and "report" in r]
    if not 0 <= index < len(ok):
        raise ValueError(f"run {index} does not exist: the bench has {len(ok)} successful runs (0..{len(ok) - 1})")
    run = ok[index]
    base = next((r.get("baseline") for r in records if r["kind"] == "baseline" and r["key"] == run["key"]), None)
    return run["report"], base


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed: plotting is an extra of the package."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'migrate[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _switchover(doc: dict) -> float | None:
    """When the guest resumed on the destination, in report time (s)."""
    if doc.get("switchover_s") is not None:
        return doc["switchover_s"]
    dest = [p["t_s"] for p in doc["guest"]["progress"] if p["host"] == "dest"]
    return min(dest) if dest else None


def _mark_switchover(ax, t: float | None) -> None:
    if t is not None:
        ax.axvline(t, color="black", linestyle=":", linewidth=1.2, label=f"switchover ({t:.2f} s)")


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _pages_panel(ax, doc: dict) -> None:
    ax.set_title("Pages arrived at the destination")
    tl = doc.get("timeline")
    if not tl:
        _no_data(ax, "no page timeline in this report\n(`migrate bench` records one)")
        return
    page_mib = doc["pages"]["page_size"] / MiB
    t = [p["t_s"] for p in tl]
    for key, label, color in (("received", "all arrived", "gray"), ("pushed", "pushed (bulk stream)", PUSH_COLOR),
                              ("faulted", "pulled by faults", FAULT_COLOR)):
        ax.plot(t, [p[key] * page_mib for p in tl], label=label, color=color, linewidth=1.8)
    ax.axhline(doc["pages"]["total"] * page_mib, color="gray", linewidth=0.8, linestyle="--")
    _mark_switchover(ax, _switchover(doc))
    ax.set_xlabel("time since migration start (s)")
    ax.set_ylabel("guest memory (MiB)")
    ax.legend(loc="center right", fontsize=8)


def _cdf(hist: dict) -> tuple[list[float], list[float]]:
    """Points of a CDF from a log2-µs histogram: x = each bucket's upper edge (µs)."""
    buckets = sorted((int(k), n) for k, n in hist.items())
    total = sum(n for _, n in buckets) or 1
    xs: list[float] = [buckets[0][0] if buckets else 1]
    ys, acc = [0.0], 0
    for low, n in buckets:
        acc += n
        xs.append(low * 2)
        ys.append(acc / total)
    return xs, ys


def _latency_panel(ax, series: list[tuple[str, dict]]) -> None:
    """CDFs of fault latency, one line per (label, latency_us summary)."""
    ax.set_title("Fault latency (CDF)")
    drawn = False
    for label, lat in series:
        if lat.get("count"):
            xs, ys = _cdf(lat["hist_log2_us"])
            ax.step(xs, ys, where="post", linewidth=1.8,
                    label=f"{label}: p50 {lat['p50']:.0f} µs, p99 {lat['p99']:.0f} µs (n={lat['count']})")
            drawn = True
    if not drawn:
        _no_data(ax, "no remote faults")
        return
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fault latency (µs, log2 buckets)")
    ax.set_ylabel("fraction of faults ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _rates(points: list[dict], shift: float = 0.0) -> tuple[list[float], list[float]]:
    """Ops/s between consecutive progress points (at their midpoints), times shifted by `shift`."""
    xs, ys = [], []
    for a, b in zip(points, points[1:]):
        if b["t_s"] > a["t_s"]:
            xs.append((a["t_s"] + b["t_s"]) / 2 + shift)
            ys.append((b["ops"] - a["ops"]) / (b["t_s"] - a["t_s"]))
    return xs, ys


def _throughput_panel(ax, doc: dict, baseline: dict | None) -> None:
    ax.set_title("Guest throughput")
    prog = doc["guest"]["progress"]
    for host, color, label in (("source", SOURCE_COLOR, "on the source"), ("dest", DEST_COLOR,
                                                                               "on the destination")):
        xs, ys = _rates([p for p in prog if p["host"] == host])
        if xs:
            ax.plot(xs, [y / 1e6 for y in ys], color=color, linewidth=1.8, label=label)
    if baseline and baseline.get("progress"):
        # the baseline's clock starts at its launch; the migrated guest was launched launch_offset_s earlier
        xs, ys = _rates(baseline["progress"], shift=-doc.get("launch_offset_s", 0.0))
        end = max((p["t_s"] for p in prog), default=0.0)  # only the stretch the migrated run covers
        kept = [(x, y) for x, y in zip(xs, ys) if x <= end]
        xs, ys = [x for x, _ in kept], [y for _, y in kept]
        ax.plot(xs, [y / 1e6 for y in ys], color="gray", linestyle="--", linewidth=1.4,
                label="unmigrated baseline")
    elif doc["guest"].get("ops_per_s_before"):
        ax.axhline(doc["guest"]["ops_per_s_before"] / 1e6, color="gray", linestyle="--", linewidth=1.4,
                   label="rate before migrating")
    _mark_switchover(ax, _switchover(doc))
    ax.set_xlabel("time since migration start (s)")
    ax.set_ylabel("guest throughput (M ops/s)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize=8)


def plot_report(doc: dict, out: str, baseline: dict | None = None) -> None:
    plt = _pyplot()
    fig = plt.figure(figsize=(13, 9), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    _pages_panel(fig.add_subplot(grid[0, 0]), doc)
    _latency_panel(fig.add_subplot(grid[0, 1]), [(doc.get("mode", Mode.POSTCOPY), doc["faults"]["latency_us"])])
    _throughput_panel(fig.add_subplot(grid[1, :]), doc, baseline)
    g = doc["guest"]
    fig.suptitle(f"{g['name']}: {g['size'] // MiB} MiB {g['workload']}, {doc.get('mode', Mode.POSTCOPY)} — "
                 f"total {doc['total_s']:.2f} s, downtime {doc['downtime_ms']:.1f} ms, "
                 f"{doc['bytes']['wire'] / MiB:.0f} MiB on the wire", fontsize=13)
    fig.savefig(out, dpi=110)
    plt.close(fig)


#: Bench bar panels: (metric, y label, scale).
_BARS = (("total_s", "total time (s)", 1.0), ("downtime_ms", "downtime (ms)", 1.0),
         ("wire_mib", "bytes on the wire (MiB)", 1.0), ("vs_baseline", "guest throughput vs baseline (%)", 100.0))


def plot_bench(records: list[dict], out: str) -> None:
    from migrate.bench import summary

    plt = _pyplot()
    rows = [r for r in summary.cells(records) if r["runs"]]
    if not rows:
        raise ValueError("the bench has no successful runs to plot")
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    varying = [c for c in ("link", "workload", "size_mib", "level") if len({r[c] for r in rows}) > 1] or ["link"]
    group_of = {id(r): "\n".join(_axis_label(c, r[c]) for c in varying) for r in rows}
    groups = list(dict.fromkeys(group_of.values()))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), layout="constrained")
    width = 0.8 / len(modes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, ylabel, scale) in zip(axes.flat, _BARS):
        for i, mode in enumerate(modes):
            xs, meds, lo, hi = [], [], [], []
            for g_i, g in enumerate(groups):
                row = next((r for r in rows if r["mode"] == mode and group_of[id(r)] == g), None)
                if row is None:
                    continue
                med = row[f"{metric}_median"] * scale
                xs.append(g_i + (i - (len(modes) - 1) / 2) * width)
                meds.append(med)
                lo.append(med - row[f"{metric}_min"] * scale)
                hi.append(row[f"{metric}_max"] * scale - med)
            bars = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=mode, color=colors[i % len(colors)])
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
        ax.set_xticks(range(len(groups)), groups, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0].capitalize())
        ax.margins(y=0.15)
        ax.grid(True, axis="y", alpha=0.3)
    axes.flat[0].legend(title="mode", fontsize=9)
    reps = statistics.median(r["runs"] for r in rows)
    fig.suptitle(f"Bench: median of {reps:g} runs per cell (whiskers: min..max)", fontsize=13)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _axis_label(column: str, value: object) -> str:
    return {"size_mib": f"{value} MiB", "level": f"zstd {value}"}.get(column, str(value))


def plot(path: str, out: str, run: int | None = None) -> str:
    """Draw `path` (a report, or a bench: its bars, or with `run` one of its runs) to `out`; say what."""
    kind, data = load(path)
    if kind == "report":
        plot_report(data, out)
        return "report: pages over time, fault latency CDF, guest throughput"
    if run is not None:
        doc, base = bench_run(data, run)
        plot_report(doc, out, base)
        return f"bench run {run}: pages over time, fault latency CDF, guest throughput vs baseline"
    plot_bench(data, out)
    return "bench: total time, downtime, bytes and throughput per mode"
