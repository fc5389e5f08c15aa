"""Latency summaries: percentiles and log2-microsecond histograms."""
from __future__ import annotations

import math
from collections.abc import Iterable


def log2_bucket(us: float) -> int:
    """Bucket k holds latencies in [2^k, 2^(k+1)) µs; bucket 0 also holds < 1 µs."""
    return max(0, int(math.floor(math.log2(us)))) if us >= 1 else 0


def summarize(latencies_us: Iterable[float]) -> dict:
    """p50/p99/max/mean and a log2-µs histogram ({"2^k": count}) of samples."""
    xs = sorted(latencies_us)
    if not xs:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0, "hist_log2_us": {}}
    hist: dict[str, int] = {}
    for x in xs:
        key = str(1 << log2_bucket(x))
        hist[key] = hist.get(key, 0) + 1
    return {
        "count": len(xs),
        "p50": round(percentile(xs, 50), 1),
        "p99": round(percentile(xs, 99), 1),
        "max": round(xs[-1], 1),
        "mean": round(sum(xs) / len(xs), 1),
        "hist_log2_us": hist,
    }


def percentile(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_xs:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_xs)))
    return sorted_xs[rank - 1]
