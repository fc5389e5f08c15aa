"""The migration report: one JSON document, and the table the CLI prints.

Field names are a contract (../shared/checks/report_fields.py checks them):
total_s, downtime_ms, pages.*, faults.*, bytes.*, compression_ratio,
guest.blocked_ms, guest.progress, verified; and for the modes (issue 3):
mode, precopy.rounds (pages sent and dirty pages per round), precopy.bytes,
downtime_parts; and for the data plane (issue 11): data_plane, fault_path,
tls, data_plane_encrypted. bytes.* and compression_ratio count pre-copy traffic too.

The pages add up: pages.before_resume + pushed + faulted + recovered ==
received (== total once complete). before_resume are the pages already here
when the guest resumed (pre-copied and not written again; precopied counts
every page the rounds sent, re-sent ones too); recovered, the pages a
restarted destination agent found in RAM beyond its journal's counters;
zero pages are among pushed and faulted; duplicates are pages that came
twice (both paths had asked for them), counted once in the sum.
guest.kind, and for a kvm guest guest.vcpu_blocked_ms (issue 13): per vCPU,
the ms its thread slept inside KVM_RUN on the destination, i.e. waited on
missing pages (native/kvm.c); empty for a synthetic guest.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from migrate.names import GuestKind, Mode
from migrate.proto import migrate_pb2 as pb
from migrate.stats import summarize
from migrate.units import MiB

_D = TypeVar("_D", bound="_Document")


@dataclass
class _Document:
    """A JSON object as typed attributes that writes back exactly as read.

    Keys no attribute names (added by a newer version) stay in `extra`; the
    order the keys came in is kept, so to_dict(from_dict(doc)) == doc and
    dumps of both are the same text.
    """

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    _keys: tuple[str, ...] = field(default=(), kw_only=True, repr=False, compare=False)

    @classmethod
    def from_dict(cls: type[_D], doc: dict[str, Any]) -> _D:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("extra", "_keys")}
        missing = [f.name for f in dataclasses.fields(cls) if f.name in names and f.name not in doc
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"not a migration report: {cls.__name__} lacks {', '.join(missing)}")
        values = {}
        for name in names & doc.keys():
            kind, value = hints[name], doc[name]
            values[name] = kind.from_dict(value) if isinstance(kind, type) and issubclass(kind, _Document) else value
        return cls(**values, extra={k: v for k, v in doc.items() if k not in names}, _keys=tuple(doc))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: keys in the order they were read; set attributes not read, after them."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("extra", "_keys")]
        order = list(self._keys) + [n for n in names + list(self.extra) if n not in self._keys]
        doc: dict[str, Any] = {}
        for key in order:
            if key in names:
                value = getattr(self, key)
                if value is None and key not in self._keys:
                    continue  # an optional field this report never had
                doc[key] = value.to_dict() if isinstance(value, _Document) else value
            elif key in self.extra:
                doc[key] = self.extra[key]
        return doc


@dataclass
class GuestSummary(_Document):
    """The migrated guest: its shape, its blocked time and its own progress samples."""

    name: str
    size: int
    workload: str
    threads: int
    blocked_ms: float
    progress: list[dict[str, Any]]
    ops_per_s_before: float
    ops_per_s_during: float
    kind: str | None = None
    vcpu_blocked_ms: list[float] | None = None


@dataclass
class Pages(_Document):
    """Where the pages came from: before_resume + pushed + faulted + recovered == received."""

    total: int
    received: int
    pushed: int
    faulted: int
    zero: int
    precopied: int
    before_resume: int
    recovered: int
    duplicates: int
    page_size: int
    prefetched: int | None = None
    zero_lazy: int | None = None  # of the zero pages, those left as holes on the destination (older reports: None)


@dataclass
class Faults(_Document):
    """Faults served after the resume; latency_us: p50, p99, max, mean, count, hist_log2_us."""

    count: int
    latency_us: dict[str, Any]
    # the native fault path's faults on a page deep in the bulk's window, asked at once (older reports: None)
    asked_in_flight: int | None = None


@dataclass
class Bytes(_Document):
    """Bytes on the wire (compressed) and of page data, pre-copy included."""

    wire: int
    pages: int


@dataclass
class Link(_Document):
    """Link outages the destination rode out, the time it waited, batches refused and asked again."""

    outages: int
    paused_s: float
    refused_batches: int


@dataclass
class Report(_Document):
    """One migration's report: the JSON document `migrate run --report` writes, as attributes.

    `Report.from_json(text).to_json() == text` for a report the CLI wrote.
    Optional fields are None when the run did not produce them (verified
    without --verify, resumed_run unless resumed).
    """

    guest: GuestSummary
    mode: str
    data_plane: str
    fault_path: str
    tls: bool
    data_plane_encrypted: bool
    total_s: float
    transfer_s: float
    downtime_ms: float
    downtime_parts: dict[str, float]
    timings_ms: dict[str, float]
    pages: Pages
    faults: Faults
    bytes: Bytes
    compression_ratio: float
    precopy: dict[str, Any]
    link: Link
    source: dict[str, int]
    verified: bool | None = None
    timeline: list[dict[str, Any]] | None = None
    switchover_s: float | None = None
    resumed_run: str | None = None
    policy: str | None = None
    prefetch: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        """The report as the CLI writes it (migrate.report.dumps)."""
        return dumps(self.to_dict())


def dumps(doc: dict[str, Any]) -> str:
    """A report as JSON text: what `--report FILE` holds."""
    return json.dumps(doc, indent=2) + "\n"


def _progress(info: pb.GuestInfo, host: str, t_start_ns: int) -> list[dict]:
    """The guest's own progress samples, in seconds since the run began.

    A sample without a timestamp (t_ns 0: a slot the guest never filled)
    says nothing about when: it is left out rather than placed at 1970."""
    return [{"t_s": round((p.t_ns - t_start_ns) / 1e9, 4), "ops": p.ops, "host": host}
            for p in info.progress if p.t_ns > 0]


def _rate(points: list[dict], lo: float, hi: float) -> float:
    """Guest ops/s between times lo and hi (seconds), from progress points."""
    inside = [p for p in points if lo <= p["t_s"] <= hi]
    if len(inside) < 2 or inside[-1]["t_s"] <= inside[0]["t_s"]:
        return 0.0
    return (inside[-1]["ops"] - inside[0]["ops"]) / (inside[-1]["t_s"] - inside[0]["t_s"])


class Timeline:
    """The destination's status polls: pages in over time, pushed vs faulted (for plots)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0  # time.monotonic() when the migration began
        self.points: list[dict] = []
        self._resumed: list[float] = []

    def __call__(self, st: pb.MigrationStatus) -> None:
        t = time.monotonic() - self.t0
        self.points.append({"t_s": round(t, 4), "received": st.pages_received, "pushed": st.pages_pushed,
                            "faulted": st.pages_faulted, "bytes_wire": st.bytes_wire})
        if st.elapsed_s > 0:
            self._resumed.append(t - st.elapsed_s)

    def switchover_s(self) -> float | None:
        """When the guest resumed on the destination (elapsed_s counts from there)."""
        return round(statistics.median(self._resumed), 4) if self._resumed else None


def link_summary(detail: dict) -> dict:
    """Link outages the destination's paths rode out, the time they waited, and the
    batches they refused (checksum or shape wrong) and asked for again."""
    paths = [p for p in detail.values() if isinstance(p, dict)]
    return {"outages": max((int(p.get("outages", 0)) for p in paths), default=0),
            "paused_s": round(max((float(p.get("paused_s", 0.0)) for p in paths), default=0.0), 3),
            "refused_batches": sum(int(p.get("refused", 0)) for p in paths)}


def build(*, name: str, spec: pb.GuestSpec, total_s: float, t_start_ns: int, switch: pb.SwitchoverReply,
          prepare_ms: float, resume_ms: float, status: pb.MigrationStatus, source_stats: pb.SourceStats,
          before: pb.GuestInfo, after: pb.GuestInfo, verified: bool | None, mode: str = Mode.POSTCOPY,
          precopy: dict | None = None, precopy_pages: int = 0, precopy_bytes: int = 0,
          downtime_parts: dict | None = None, tls: bool = False) -> dict:
    """Assemble the report from what the agents said (pre-copy rounds as the orchestrator logged them).

    `tls`: whether TLS protected the agents' links; page data was encrypted
    only if it also went over gRPC (the native plane has no TLS).
    """
    detail = json.loads(status.detail_json or "{}")
    faults = detail.get("faults", {})
    latency = faults.get("latency_us") or summarize([])
    if after.first_op_ns and switch.last_op_ns:
        downtime_ms = (after.first_op_ns - switch.last_op_ns) / 1e6
    elif downtime_parts:  # the guest did no work across the switch: its parts, as the agents timed them
        downtime_ms = sum(downtime_parts.values())
    else:  # a resumed run knows no parts: the control path it saw
        downtime_ms = switch.pause_ms + resume_ms
    progress = _progress(before, "source", t_start_ns) + _progress(after, "dest", t_start_ns)
    progress.sort(key=lambda p: p["t_s"])
    wire = status.bytes_wire + precopy_bytes
    page_bytes = status.bytes_pages + precopy_pages * spec.page_size
    doc = {
        "guest": {
            "name": name,
            "size": spec.size,
            "workload": spec.workload,
            "threads": spec.threads,
            "blocked_ms": float(faults.get("blocked_ms", 0.0)),
            "kind": spec.kind or GuestKind.SYNTHETIC,
            "vcpu_blocked_ms": list(after.vcpu_blocked_ms),
            "progress": progress,
            "ops_per_s_before": round(_rate(progress, -5.0, 0.0), 1),
            "ops_per_s_during": round(_rate(progress, 0.0, total_s), 1),
        },
        "mode": mode,
        "data_plane": status.data_plane or "grpc",
        "fault_path": status.fault_path or "grpc",
        "tls": tls,
        "data_plane_encrypted": tls and (status.data_plane or "grpc") == "grpc",
        "total_s": round(total_s, 4),
        "transfer_s": round(status.elapsed_s, 4),
        "downtime_ms": round(max(downtime_ms, 0.0), 3),
        "downtime_parts": downtime_parts or {},
        "timings_ms": {"prepare": round(prepare_ms, 3), "pause": round(switch.pause_ms, 3),
                       "resume": round(resume_ms, 3)},
        "warm_runner": bool((detail.get("runner") or {}).get("warm")),  # the destination's runner was pre-started
        "pages": {
            "total": status.pages_total,
            "received": status.pages_received,
            "pushed": status.pages_pushed,
            "faulted": status.pages_faulted,
            "zero": status.pages_zero,
            # of the zero pages, those left as holes on the destination (marked received, never allocated)
            "zero_lazy": sum(int(p.get("zero_lazy", 0)) for p in detail.values() if isinstance(p, dict)),
            "precopied": precopy_pages,
            "before_resume": status.pages_before_resume,
            "recovered": status.pages_recovered,
            "prefetched": status.pages_prefetched,
            "duplicates": sum(int(p.get("duplicates", 0)) for p in detail.values() if isinstance(p, dict)),
            "page_size": spec.page_size,
        },
        # asked_in_flight: faults on a page deep in the bulk's window, asked at once (that page came twice)
        "faults": {"count": status.faults, "latency_us": latency,
                   "asked_in_flight": int(faults.get("asked_in_flight", 0))},
        "policy": status.policy or "none",
        "prefetch": {"pages": status.pages_prefetched, "hits": status.prefetch_hits,
                     "hit_ratio": round(status.prefetch_hits / status.pages_prefetched, 3)
                     if status.pages_prefetched else 0.0,
                     # the policy's last neighbourhood (an adaptive one's size shows where it went); None without one
                     "neighbourhood": detail.get("policy", {}).get("neighbourhood"),
                     # pages found written by the destination's scans (migrate.dest.written); None without them
                     "written": detail.get("policy", {}).get("written_pages")},
        "events": faults.get("events", {}),  # what the guest did to its memory meanwhile (REMOVE, UNMAP, ...)
        "bytes": {"wire": wire, "pages": page_bytes},
        "compression_ratio": round(page_bytes / wire, 3) if wire else 1.0,
        "precopy": precopy or {"rounds": [], "pages": 0, "bytes": 0},
        "link": link_summary(detail),
        "source": {"urgent_requests": source_stats.urgent_requests, "urgent_pages": source_stats.urgent_pages,
                   "bulk_pages": source_stats.bulk_pages, "bulk_bytes": source_stats.bulk_bytes,
                   "compressed_batches": source_stats.bulk_compressed_batches},
    }
    if verified is not None:
        doc["verified"] = verified
    return doc


def transfer_mib_s(doc: dict) -> float:
    """MiB/s of guest memory installed after the switchover: the pages that came
    after the resume over the time from the resume to the last page in."""
    after = doc["bytes"]["pages"] - doc["pages"].get("precopied", 0) * doc["pages"]["page_size"]
    return after / MiB / doc["transfer_s"] if doc["transfer_s"] else 0.0


def _pages(p: dict) -> str:
    """The pages row: where they came from, adding up to the total once complete."""
    kept = f" ({p.get('before_resume', 0)} kept)" if p.get("precopied") else ""
    recovered = f", {p['recovered']} recovered at a restart" if p.get("recovered") else ""
    holes = f" ({p['zero_lazy']} left as holes)" if p.get("zero_lazy") else ""
    return (f"{p['total']} total: {p.get('precopied', 0)} pre-copied{kept}, {p['pushed']} pushed, "
            f"{p['faulted']} faulted{recovered}, {p['zero']} zero{holes}, {p.get('duplicates', 0)} came twice")


def table(doc: dict) -> str:
    """The report as a short table for a terminal."""
    p, f, b = doc["pages"], doc["faults"], doc["bytes"]
    lat = f["latency_us"]
    mb = b["pages"] / MiB
    pre = doc.get("precopy", {})
    parts = ", ".join(f"{k} {v:.2f}" for k, v in doc.get("downtime_parts", {}).items() if v)
    rows = [
        ("guest", f"{doc['guest']['name']}: {doc['guest']['size'] // MiB} MiB, {doc['guest']['workload']}"),
        ("mode", doc.get("mode", Mode.POSTCOPY) + (f" ({pre['fallback']})" if pre.get("fallback") else "")),
        ("data plane", f"{doc.get('data_plane', 'grpc')}, faults over {doc.get('fault_path', 'grpc')}"
                       + (" (page data went UNENCRYPTED: the native plane has no TLS)"
                          if doc.get("tls") and not doc.get("data_plane_encrypted") else "")),
        ("total time", f"{doc['total_s']:.3f} s" if doc["total_s"] else "-"),
        ("after resume", f"{doc['transfer_s']:.3f} s to the last page "
                         f"({transfer_mib_s(doc):.0f} MiB/s of guest memory)" if transfer_mib_s(doc) else "-"),
        ("downtime", f"{doc['downtime_ms']:.2f} ms" + (f" (ms: {parts})" if parts else "")),
        ("pages", _pages(p)),
        ("faults", f"{f['count']}: p50 {lat['p50']:.0f} µs, p99 {lat['p99']:.0f} µs, max {lat['max']:.0f} µs"),
        ("guest blocked", f"{doc['guest']['blocked_ms']:.1f} ms"
                          + (" (vCPUs asleep in KVM_RUN: " + ", ".join(f"{v:.1f}" for v in vcpus) + " ms)"
                             if (vcpus := doc["guest"].get("vcpu_blocked_ms")) else "")),
        ("on the wire", f"{b['wire'] / MiB:.1f} MiB for {mb:.1f} MiB of pages "
                        f"(compression {doc['compression_ratio']:.2f}x)"),
    ]
    for i, r in enumerate(pre.get("rounds", []), 1):
        rows.append((f"pre-copy {i}", f"{r['sent']} pages sent in {r['seconds']:.3f} s, {r['dirty']} dirtied "
                                      f"({r['dirty_rate']:.0f} pages/s)"))
    if any(doc.get("events", {}).values()):
        ev = doc["events"]
        rows.append(("guest events", ", ".join(f"{k} {v}" for k, v in ev.items() if v)))
    if doc.get("link", {}).get("outages"):
        rows.append(("link", f"{doc['link']['outages']} outage(s) ridden out, "
                             f"{doc['link']['paused_s']:.2f} s waiting for the source"))
    if pre.get("switch_reason"):
        rows.append(("switched", pre["switch_reason"]))
    if "verified" in doc:
        rows.append(("verified", "yes: digest equals the unmigrated run" if doc["verified"]
                     else "NO: digest differs from the unmigrated run"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
