#!/usr/bin/env python3
"""Core benchmark: fault latency, bulk throughput and agent memory, against raw gRPC.

Measures in one run, on this machine, side by side:
  (a) urgent fault latency p50/p99 with the bulk stream off (--no-push),
  (b) the same while the bulk stream saturates,
  (c) bulk throughput in MiB/s of guest memory installed, realistic and
      incompressible RAM,
  (d) the baseline: a raw Python gRPC bidi 4 KiB round trip and raw server
      streaming MiB/s (1 MiB messages), between two processes, no migrate code;
and the peak resident memory of each agent's processes beyond the guest's
shared mapping (proportional: Pss_Anon + Pss_File; guest runners
excluded), for 1 GiB and 4 GiB guests. Targets are printed as ratios against the baseline.

usage: python scripts/bench_core.py [--quick] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc

from migrate import orchestrator, spawn
from migrate.client import AgentClient
from migrate.local import LocalAgent
from migrate.proto import migrate_pb2 as pb

MiB = 1 << 20
GiB = 1 << 30
_RAW_MSG = 1 * MiB


# ------------------------------------------------------------ raw baseline
def raw_server() -> None:
    """A bare gRPC server: an echo bidi method and a 1 MiB server stream."""
    payload = os.urandom(_RAW_MSG)

    def stream(req: bytes, ctx: grpc.ServicerContext):
        for _ in range(int(req)):
            yield payload

    def echo(it, ctx: grpc.ServicerContext):
        yield from it

    ident = lambda b: b  # noqa: E731 - raw bytes in and out
    handler = grpc.method_handlers_generic_handler("raw", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream, request_deserializer=ident, response_serializer=ident),
        "Echo": grpc.stream_stream_rpc_method_handler(echo, request_deserializer=ident, response_serializer=ident),
    })
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", 8 * MiB)])
    server.add_generic_rpc_handlers((handler,))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    sys.stdin.read()
    server.stop(0)


def raw_baseline(stream_mib: int) -> dict:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-server"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=spawn.child_env())
    try:
        port = int(proc.stdout.readline())
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 8 * MiB)])
        ident = lambda b: b  # noqa: E731
        stream = ch.unary_stream("/raw/Stream", request_serializer=ident, response_deserializer=ident)
        t = time.perf_counter()
        total = sum(len(m) for m in stream(str(stream_mib).encode()))
        stream_mibs = total / MiB / (time.perf_counter() - t)
        requests: queue.SimpleQueue = queue.SimpleQueue()
        replies = ch.stream_stream("/raw/Echo", request_serializer=ident, response_deserializer=ident)(
            iter(requests.get, None))
        msg = os.urandom(4096)
        lat = []
        for _ in range(3000):
            t = time.perf_counter()
            requests.put(msg)
            next(replies)
            lat.append((time.perf_counter() - t) * 1e6)
        requests.put(None)
        ch.close()
        lat.sort()
        return {"stream_mib_s": round(stream_mibs, 1), "rtt_p50_us": round(lat[len(lat) // 2], 1),
                "rtt_p99_us": round(lat[int(len(lat) * 0.99)], 1)}
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


# ------------------------------------------------------------- rss sampler
def _parents() -> dict[int, int]:
    """pid -> parent pid for every process (children of any thread count)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _own_rss(pid: int) -> tuple[int, bool]:
    """(Pss_Anon + Pss_File in bytes, is_guest_runner).

    Proportional set size: a library page shared by the agent's processes
    counts once across them; guest RAM (shmem) is left out.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            runner = b"migrate.guest.runner" in f.read()
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0, False
    kib = sum(int(fields.get(k, "0 kB").split()[0]) for k in ("Pss_Anon", "Pss_File"))
    return kib * 1024, runner


class RssPeak:
    """Samples an agent's process tree (guest runners excluded) every 50 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.peak = {name: 0 for name in pids}
        self._pids = pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            parents = _parents()
            for name, root in self._pids.items():
                total, todo = 0, [root]
                while todo:
                    pid = todo.pop()
                    rss, runner = _own_rss(pid)
                    if not runner:
                        total += rss
                    todo.extend(c for c, p in parents.items() if p == pid)
                self.peak[name] = max(self.peak[name], total)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


# --------------------------------------------------------------- scenarios
def migrate_once(src: LocalAgent, dst: LocalAgent, name: str, spec: pb.GuestSpec, *, paused: bool,
                 no_push: bool = False) -> tuple[dict, dict]:
    """Launch a guest, migrate it, stop it; return (report, peak rss per side)."""
    with AgentClient(src.address) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec, start_paused=paused), timeout=600)
    rss = RssPeak({"source": src.pid, "dest": dst.pid})
    try:
        doc = orchestrator.migrate(name, src.address, dst.address,
                                   orchestrator.RunOptions(mode="postcopy", no_push=no_push))
    finally:
        peak = rss.stop()
        with AgentClient(dst.address) as c:
            if any(g.name == name for g in c.call("ListGuests", pb.ListGuestsRequest()).guests):
                c.call("StopGuest", pb.GuestRef(name=name))
    return doc, peak


def guest(size: int, workload: str, ops: int, content: str = "realistic") -> pb.GuestSpec:
    return pb.GuestSpec(size=size, workload=workload, seed=11, ops=ops, threads=1, page_size=mmap.PAGESIZE,
                        content=content)


def transfer_mib_s(doc: dict) -> float:
    """MiB/s of guest memory installed, from resume to the last page."""
    seconds = doc["total_s"] - doc["timings_ms"]["prepare"] / 1000.0
    return doc["bytes"]["pages"] / MiB / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller guests (256 MiB / 1 GiB)")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_server:
        raw_server()
        return 0
    big, huge = (256 * MiB, 1 * GiB) if args.quick else (1 * GiB, 4 * GiB)
    out: dict = {}
    print("(d) raw gRPC baseline ...", file=sys.stderr)
    out["raw"] = raw_baseline(stream_mib=512)
    with LocalAgent("source") as src, LocalAgent("dest") as dst:
        print("(a) faults, bulk off ...", file=sys.stderr)
        doc, _ = migrate_once(src, dst, "lat-a", guest(128 * MiB, "random-read", 4000), paused=True, no_push=True)
        out["a"] = doc["faults"]["latency_us"]
        print("(b) faults while bulk runs ...", file=sys.stderr)
        doc, _ = migrate_once(src, dst, "lat-b", guest(big, "random-read", 1 << 40), paused=True)
        out["b"] = doc["faults"]["latency_us"]
        for content in ("realistic", "random"):
            for size in (big, huge):
                print(f"(c) bulk, {content} RAM, {size // MiB} MiB ...", file=sys.stderr)
                doc, peak = migrate_once(src, dst, f"bulk-{content}-{size // MiB}", guest(size, "idle", 0, content),
                                         paused=True)
                out[f"c_{content}_{size // MiB}"] = {
                    "mib_s": round(transfer_mib_s(doc), 1), "compression_ratio": doc["compression_ratio"],
                    "total_s": doc["total_s"], "rss_mib": {k: round(v / MiB, 1) for k, v in peak.items()},
                    "rss_budget_mib": round(64 + size // mmap.PAGESIZE / 8 / MiB + 16, 1)}
    report(out, big, huge)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def report(out: dict, big: int, huge: int) -> None:
    raw, a, b = out["raw"], out["a"], out["b"]
    print(f"\n{'metric':46} {'value':>12}  {'target':>20}")

    def row(name: str, value: str, target: str = "") -> None:
        print(f"{name:46} {value:>12}  {target:>20}")

    row("(d) raw gRPC bidi 4 KiB round trip p50", f"{raw['rtt_p50_us']:.0f} µs")
    row("(d) raw gRPC streaming", f"{raw['stream_mib_s']:.0f} MiB/s")
    row("(a) fault latency p50, bulk off", f"{a['p50']:.0f} µs",
        f"{a['p50'] / raw['rtt_p50_us']:.2f}x raw (<= 1.2)")
    row("(a) fault latency p99, bulk off", f"{a['p99']:.0f} µs")
    row("(b) fault latency p50, bulk on", f"{b['p50']:.0f} µs")
    row("(b) fault latency p99, bulk on", f"{b['p99']:.0f} µs", f"{b['p99'] / max(a['p99'], 1):.2f}x (a) (<= 2)")
    for content, goal in (("realistic", 1.0), ("random", 0.8)):
        for size in (big, huge):
            c = out[f"c_{content}_{size // MiB}"]
            row(f"(c) bulk {content}, {size // MiB} MiB", f"{c['mib_s']:.0f} MiB/s",
                f"{c['mib_s'] / raw['stream_mib_s']:.2f}x raw (>= {goal})")
            row(f"    peak RSS source / dest (budget {c['rss_budget_mib']:.0f})",
                f"{c['rss_mib']['source']:.0f} / {c['rss_mib']['dest']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
