"""Prometheus metrics of an agent (`--metrics HOST:PORT`), read from its runs when scraped.

Nothing is counted per page for this: at each scrape the collector asks
the agent's runs for the counters they keep anyway (the same ones
IncomingStatus and CompleteOutgoing report) and adds them up. An agent
forgets runs (a destination keeps its last 64 completed ones, a source
drops a run once it completes), so the collector keeps what each run
last showed and adds it to a retired total when the run goes: counters
never go down while the agent lives. See docs/api.md, "Metrics".
"""
from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from migrate import validate
from migrate.report import link_summary

if TYPE_CHECKING:
    from migrate.agent import ControlService

log = logging.getLogger(__name__)

#: Upper bounds (µs) of the fault-latency buckets: the runs' log2 buckets, 1 µs to 2^24 µs (16.8 s).
_BUCKETS_US = tuple(1 << k for k in range(1, 25))

#: One sample of a run's counters: (metric, label value) -> value.
Sample = dict[tuple[str, str], float]


def _incoming(status_detail: str, pushed: int, faulted: int, faults: int, wire: int) -> Sample:
    """An incoming run's counters: pages by path, faults, bytes, outages and its latency buckets."""
    detail = json.loads(status_detail or "{}")
    sample: Sample = {("pages", "pushed"): pushed, ("pages", "faulted"): faulted, ("faults", ""): faults,
                      ("wire", ""): wire, ("outages", ""): link_summary(detail)["outages"]}
    latency = (detail.get("faults") or {}).get("latency_us") or {}
    for low, count in (latency.get("hist_log2_us") or {}).items():
        sample[("latency", low)] = count
    if latency.get("count"):
        sample[("latency_sum", "")] = latency["mean"] * latency["count"]
    return sample


class AgentCollector(Collector):
    """The metrics of one agent's ControlService."""

    def __init__(self, control: ControlService) -> None:
        self._control = control
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], Sample] = {}  # (side, run_id) -> its counters at the last scrape
        self._retired: collections.Counter[tuple[str, str]] = collections.Counter()  # last counts of forgotten runs

    def _samples(self) -> tuple[dict[tuple[str, str], Sample], collections.Counter[tuple[str, str]]]:
        """Each run's counters now, and how many runs are in each (side, phase)."""
        runs: dict[tuple[str, str], Sample] = {}
        phases: collections.Counter[tuple[str, str]] = collections.Counter()
        with self._control.lock:
            incoming = list(self._control.incoming.values())
        for run in incoming:
            st = run.status()
            phases[("incoming", st.phase)] += 1
            runs[("in", st.run_id)] = _incoming(st.detail_json, st.pages_pushed, st.pages_faulted, st.faults,
                                                st.bytes_wire)
        for out in self._control.outgoing.all():  # by phase only: a gRPC-plane source counts bytes elsewhere
            phases[("outgoing", "switched" if out.switched else "prepared")] += 1
        return runs, phases

    def collect(self) -> Iterator[Metric]:
        runs, phases = self._samples()
        with self._lock:
            for gone in self._last.keys() - runs.keys():
                self._retired.update(self._last.pop(gone))
            self._last.update(runs)
            totals = collections.Counter(self._retired)
            for sample in runs.values():
                totals.update(sample)
        yield from self._families(totals, phases)

    def _families(self, totals: collections.Counter[tuple[str, str]],
                  phases: collections.Counter[tuple[str, str]]) -> Iterator[Metric]:
        runs = GaugeMetricFamily("migrate_runs", "Migration runs this agent holds, by side and phase",
                                 labels=["side", "phase"])
        for (side, phase), n in sorted(phases.items()):
            runs.add_metric([side, phase], n)
        yield runs
        yield GaugeMetricFamily("migrate_guests", "Guests this agent hosts", value=len(self._control.guests.all()))
        pages = CounterMetricFamily("migrate_pages_installed", "Pages installed on this destination after the "
                                    "resume, by path", labels=["path"])
        for path in ("pushed", "faulted"):
            pages.add_metric([path], totals[("pages", path)])
        yield pages
        yield CounterMetricFamily("migrate_faults", "Guest page faults served after the resume",
                                  value=totals[("faults", "")])
        yield CounterMetricFamily("migrate_wire_bytes", "Bytes of pages this destination received on the wire "
                                  "after the resume (compressed)", value=totals[("wire", "")])
        yield CounterMetricFamily("migrate_link_outages", "Outages of the link to the source that the destination "
                                  "rode out", value=totals[("outages", "")])
        yield self._latency(totals)

    @staticmethod
    def _latency(totals: collections.Counter[tuple[str, str]]) -> HistogramMetricFamily:
        """The fault latencies of the runs whose fault path finished (its summary holds them)."""
        counts = {int(low): n for (kind, low), n in totals.items() if kind == "latency"}
        # a run's bucket "2^k" holds [2^k, 2^(k+1)) µs ("1": below 2 µs): it lies under every bound >= 2^(k+1)
        buckets = [(str(le), float(sum(n for low, n in counts.items() if 2 * low <= le))) for le in _BUCKETS_US]
        buckets.append(("+Inf", float(sum(counts.values()))))
        return HistogramMetricFamily("migrate_fault_latency_microseconds", "Guest page fault latency (µs), from the "
                                     "runs' log2 buckets", buckets=buckets, sum_value=totals[("latency_sum", "")])


class MetricsServer:
    """An HTTP server of an agent's metrics at http://HOST:PORT/metrics, until close()."""

    def __init__(self, address: str, control: ControlService) -> None:
        host, port = validate.split_endpoint(address, "metrics address", listen=True)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AgentCollector(control))
        try:
            self._server, self._thread = start_http_server(port, host.strip("[]"), registry)
        except OSError as err:
            raise OSError(err.errno, f"cannot serve metrics on {address}: {err.strerror}") from None
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
