#!/usr/bin/env python3
"""Core benchmark: fault latency, bulk throughput and agent memory, on both data planes, against raw baselines.

Measures in one run, on this machine, side by side, for each data plane
(gRPC, native) and each fault path (gRPC; native on the native plane):
  (a) urgent fault latency p50/p99 with the bulk stream off (--no-push),
  (b) the same while the bulk stream saturates (with the guest's blocked
      time in all and the transfer's: a faster bulk stream means fewer faults),
  (c) bulk throughput in MiB/s of guest memory installed, realistic and
      incompressible RAM, over the report's transfer_s (from the guest's
      resume on the destination to its last page in; the raw stream's
      figure likewise leaves out its process and channel start),
  (d) the baselines: a raw Python gRPC bidi 4 KiB round trip and raw server
      streaming MiB/s (1 MiB messages), and a raw C TCP stream (one 1 MiB
      buffer sent over and over, read and dropped), each between two
      processes, no migrate code;
and the peak resident memory of each agent's processes beyond the guest's
shared mapping (RssAnon + Pss_File; guest runners excluded), for 1 GiB and
4 GiB guests, against a budget of 64 MiB + 1 bit per page + batch buffers,
and the CPU both agents spent per guest MiB, against the raw stream's.
Targets are printed as ratios against the baseline, which is measured again
before every run (the host's speed drifts); every measurement runs
--repeat times and medians are printed. Also printed: the host's ceiling for
installing a guest into fresh memory (UFFDIO_COPY alone, one thread, no
network), on cold memory (as a migration's destination meets it: the
source guest's RAM held beside it) and on warm memory: on a virtual
machine whose kernel reports freed pages to the hypervisor, the first touch
of a page the host took back costs several times a warm one, and it bounds
(c) for large guests.

On loopback the two agents, their bulk paths and the guest share this
machine's cores, so (c) measures CPU per byte more than the transfer; with
--link (default 1gbit) (c) and its raw baseline are measured again across a
lab link (two network namespaces, tc-shaped veth; the raw server runs in the
source's namespace, its client in the destination's), where the wire is the
bottleneck, as between two hosts.

usage: python scripts/bench_core.py [--quick] [--repeat N] [--planes grpc,native] [--link PROFILE|none]
                                    [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc

from migrate import orchestrator, report, spawn
from migrate.batches import MAX_BULK_PAGES, MAX_URGENT_PAGES
from migrate.bench.procs import descendants
from migrate.client import AgentClient
from migrate.dest.bulk import WINDOW_PAGES
from migrate.lab import netns
from migrate.lab.lifecycle import Lab
from migrate.lab.link import LinkSpec
from migrate.local import LocalAgent
from migrate.proto import migrate_pb2 as pb
from migrate.source.bulk_server import ENCODERS

MiB = 1 << 20
GiB = 1 << 30
_RAW_MSG = 1 * MiB
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------ raw baseline
def raw_server(host: str) -> None:
    """A bare gRPC server on `host`: an echo bidi method and a 1 MiB server stream."""
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
    print(server.add_insecure_port(f"{host}:0"), flush=True)
    server.start()
    sys.stdin.read()
    server.stop(0)


def raw_client(address: str, stream_mib: int, server_pid: int) -> dict:
    """Stream `stream_mib` MiB from the raw server, then 3000 echo round trips of 4 KiB.

    Also: the CPU both processes spent per MiB streamed (the server's read
    from its /proc entry: same PID namespace, even across a lab's netns).
    """
    ch = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 8 * MiB)])
    ident = lambda b: b  # noqa: E731
    stream = ch.unary_stream("/raw/Stream", request_serializer=ident, response_deserializer=ident)
    cpu0 = cpu_seconds(os.getpid()) + cpu_seconds(server_pid)
    t = time.perf_counter()
    total = sum(len(m) for m in stream(str(stream_mib).encode()))
    stream_mibs = total / MiB / (time.perf_counter() - t)
    cpu_ms_per_mib = (cpu_seconds(os.getpid()) + cpu_seconds(server_pid) - cpu0) * 1000 / (total / MiB)
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
    return {"stream_mib_s": round(stream_mibs, 1), "cpu_ms_per_mib": round(cpu_ms_per_mib, 2),
            "rtt_p50_us": round(lat[len(lat) // 2], 1),
            "rtt_p99_us": round(lat[int(len(lat) * 0.99)], 1)}


def _in(ns: str | None, *args: str) -> list[str]:
    """argv running this script with `args`, inside network namespace `ns` if given."""
    return [*(("ip", "netns", "exec", ns) if ns else ()), sys.executable, os.path.abspath(__file__), *args]


def raw_baseline(stream_mib: int, lab: Lab | None = None) -> dict:
    """Raw gRPC between two fresh processes: on loopback, or across `lab`'s link
    (server in the source's namespace, client in the destination's)."""
    src_ns, dst_ns = lab.record["namespaces"] if lab else (None, None)
    host = netns.SOURCE_ADDR if lab else "127.0.0.1"
    proc = subprocess.Popen(_in(src_ns, "--raw-server", host), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=spawn.child_env())
    try:
        port = int(proc.stdout.readline())
        out = subprocess.run(_in(dst_ns, "--raw-client", f"{host}:{port}", "--stream-mib", str(stream_mib),
                                 "--server-pid", str(proc.pid)),
                             capture_output=True, text=True, env=spawn.child_env(), check=True, timeout=600)
        return json.loads(out.stdout)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def raw_c_receiver(total: int) -> None:
    """Listen on loopback, print the port, read and drop `total` bytes; print seconds and CPU seconds."""
    from migrate._native import lib

    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
        with conn:
            cpu0, t0 = _own_cpu(), time.perf_counter()
            got = lib.mig_dp_raw_recv(conn.fileno(), total)
            print(json.dumps({"bytes": got, "seconds": time.perf_counter() - t0, "cpu_s": _own_cpu() - cpu0}))


def raw_c_sender(port: int, total: int) -> None:
    """Send `total` bytes from one 1 MiB buffer to the receiver on `port`; print CPU seconds."""
    from migrate._native import lib

    buf = os.urandom(MiB)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        cpu0 = _own_cpu()
        if lib.mig_dp_raw_send(conn.fileno(), buf, len(buf), total) != total:
            raise OSError("raw C stream: short send")
        print(json.dumps({"cpu_s": _own_cpu() - cpu0}))


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raw_c_baseline(total_mib: int) -> dict:
    """A raw C TCP stream between two fresh processes on loopback: MiB/s and CPU ms per MiB (both ends)."""
    total = total_mib * MiB
    recv = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-c-recv", str(total)],
                            stdout=subprocess.PIPE, text=True, env=spawn.child_env())
    try:
        port = int(recv.stdout.readline())
        sent = subprocess.run([sys.executable, os.path.abspath(__file__), "--raw-c-send", f"{port}:{total}"],
                              capture_output=True, text=True, env=spawn.child_env(), check=True, timeout=600)
        got = json.loads(recv.stdout.readline())
    finally:
        recv.wait(timeout=60)
    cpu = got["cpu_s"] + json.loads(sent.stdout)["cpu_s"]
    return {"stream_mib_s": round(total_mib / got["seconds"], 1), "cpu_ms_per_mib": round(cpu * 1000 / total_mib, 3)}


# ------------------------------------------------------------- rss sampler
def _is_runner(pid: int) -> bool | None:
    """Is pid a guest runner (or a warm one waiting to become one: migrate.guest.warm)? None when its
    command line cannot tell (gone, or exiting: empty)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    return b"migrate.guest." in cmdline if cmdline else None


def _field_bytes(pid: int, path: str, field: str) -> int:
    """A "Field:  N kB" line of /proc/PID/<path>, in bytes (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _anon_bytes(pid: int) -> int:
    """RssAnon: the process's private memory (cheap to read, unlike smaps)."""
    return _field_bytes(pid, "status", "RssAnon")


def _pss_file_bytes(pid: int) -> int:
    """Pss_File: the process's share of the libraries it maps (shared ones count once across processes)."""
    return _field_bytes(pid, "smaps_rollup", "Pss_File")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class Usage:
    """What each agent's process tree uses during a migration, guest runners left out.

    Peak memory beyond the guest's shared mapping: every 50 ms, the sum of
    RssAnon (private memory; our processes are started fresh, not forked,
    so none of it is shared) plus the library share Pss_File, read once a
    second only: smaps_rollup walks every page table entry, and for
    processes that map a 4 GiB guest that walk would steal the CPU being
    measured.

    CPU seconds: per process, the last value seen minus the first (0 for
    workers started during the run). Whether a process is a guest runner is
    decided once, when first seen: an exiting runner's command line reads
    empty, and was taken for a worker started during the run (its whole
    life's CPU, the filling of its RAM included, charged to the agent). A worker's last < 50 ms before it
    exits go uncounted: its shutdown, after its pages have moved.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.peak = {name: 0 for name in pids}
        self._pids = pids
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._side: dict[int, str] = {}
        self._runner: dict[int, bool] = {}  # decided once per process, while its command line is readable
        self._stop = threading.Event()
        self._sample_cpu(self._trees(), started=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _told(self, pid: int) -> bool:
        """Whether pid is told apart (runner or not, decided now if not yet): the walk goes on into its children.
        An exiting guest runner's command line reads empty: taken for a worker, its whole CPU would count."""
        if pid not in self._runner:
            runner = _is_runner(pid)
            if runner is None:
                return False
            self._runner[pid] = runner
        return True

    def _trees(self) -> dict[str, list[int]]:
        """Each side's processes now, guest runners (and processes not told apart yet) left out."""
        trees: dict[str, list[int]] = {name: [] for name in self._pids}
        names = {root: name for name, root in self._pids.items()}
        for pid, root in descendants(self._pids.values(), self._told).items():
            if self._runner.get(pid) is False:
                trees[names[root]].append(pid)
        return trees

    def _sample_cpu(self, trees: dict[str, list[int]], started: bool = False) -> None:
        """`started`: the processes were there before the run (count from now, not from 0)."""
        for name, pids in trees.items():
            for pid in pids:
                seconds = cpu_seconds(pid)
                if seconds:
                    self._cpu_first.setdefault(pid, seconds if started else 0.0)
                    self._cpu_last[pid] = seconds
                    self._side[pid] = name

    def _run(self) -> None:
        pss_file: dict[int, int] = {}
        trees: dict[str, list[int]] = {}
        tick = 0
        while not self._stop.wait(0.05):
            if tick % 5 == 0:  # new workers appear during the run
                trees = self._trees()
            for pid in (p for pids in trees.values() for p in pids):
                if pid not in pss_file or tick % 20 == 0:
                    pss_file[pid] = _pss_file_bytes(pid)
            tick += 1
            for name, pids in trees.items():
                total = sum(_anon_bytes(pid) + pss_file.get(pid, 0) for pid in pids)
                self.peak[name] = max(self.peak[name], total)
            self._sample_cpu(trees)

    def stop(self) -> dict[str, dict[str, float]]:
        """{"rss": peak bytes per side, "cpu_s": CPU seconds per side}."""
        self._stop.set()
        self._thread.join()
        self._sample_cpu(self._trees())
        cpu = {name: 0.0 for name in self._pids}
        for pid, last in self._cpu_last.items():
            cpu[self._side[pid]] += last - self._cpu_first[pid]
        return {"rss": self.peak, "cpu_s": cpu}


# --------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Agents:
    """A source and a destination agent: addresses, PIDs (for memory), and the
    source's address as the destination reaches it (across a lab link)."""

    source: str
    dest: str
    source_pid: int
    dest_pid: int
    source_endpoint: str = ""

    @classmethod
    def local(cls, src: LocalAgent, dst: LocalAgent) -> Agents:
        return cls(src.address, dst.address, src.pid, dst.pid)

    @classmethod
    def across(cls, lab: Lab) -> Agents:
        r = lab.record
        return cls(lab.source, lab.dest, r["source_pid"], r["dest_pid"], lab.source_endpoint)


@dataclass(frozen=True)
class Path:
    """A data plane and a fault path, as `migrate run --data-plane/--fault-path` name them."""

    plane: str
    fault: str = "grpc"

    def __str__(self) -> str:
        return f"{self.plane} plane, {self.fault} faults"


def migrate_once(agents: Agents, name: str, spec: pb.GuestSpec, *, paused: bool, path: Path,
                 no_push: bool = False) -> tuple[dict, dict]:
    """Launch a guest, migrate it on `path`, stop it; return (report, Usage.stop()'s rss and CPU per side)."""
    with AgentClient(agents.source) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec, start_paused=paused), timeout=600)
    usage = Usage({"source": agents.source_pid, "dest": agents.dest_pid})
    try:
        doc = orchestrator.migrate(name, agents.source, agents.dest, orchestrator.RunOptions(
            mode="postcopy", no_push=no_push, source_endpoint=agents.source_endpoint, data_plane=path.plane,
            fault_path=path.fault))
    finally:
        used = usage.stop()
        with AgentClient(agents.dest) as c:
            c.stop_if_hosted(name)
    return doc, used


def guest(size: int, workload: str, ops: int, content: str = "realistic") -> pb.GuestSpec:
    return pb.GuestSpec(size=size, workload=workload, seed=11, ops=ops, threads=1, page_size=mmap.PAGESIZE,
                        content=content)


def install_ceiling(size: int) -> float:
    """MiB/s of UFFDIO_COPY into `size` bytes of fresh shmem, one thread, no network.

    What this host allows the destination at best: a guest arriving here
    lands in memory never touched before, and on a virtual machine that is
    also the hypervisor's first touch (see ceilings_in_child).
    """
    import ctypes

    from migrate.bitmap import SharedBitmap
    from migrate.uffd import FaultReader, Region, Uffd

    chunk = MAX_BULK_PAGES
    data = os.urandom(chunk * mmap.PAGESIZE)
    pages = size // mmap.PAGESIZE
    fd = os.memfd_create("ceiling")
    try:
        os.ftruncate(fd, size)
        ram = mmap.mmap(fd, size, mmap.MAP_SHARED)
        base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
        with Uffd.create() as uffd:
            uffd.register(base, size)
            bitmap = SharedBitmap.create(pages)
            io = FaultReader(uffd, [Region(base=base, size=size)])
            t = time.perf_counter()
            for first in range(0, pages, chunk):
                io.install(bitmap, first, chunk, [], data)
            seconds = time.perf_counter() - t
            bitmap.close()
            uffd.unregister(base, size)
        del io
        ram.close()
    finally:
        os.close(fd)
    return size / MiB / seconds


#: Seconds memory lies freed before the cold pass: longer than the guest kernel's free page
#: reporting delay (2 s), after which the hypervisor has taken the pages back.
COLD_WAIT_S = 3.0


def hold(size: int) -> int:
    """A memfd of `size` bytes, written: memory held as a source guest holds it (the caller closes it)."""
    fd = os.memfd_create("held")
    os.ftruncate(fd, size)
    chunk = os.urandom(MiB)
    for off in range(0, size, MiB):
        os.pwrite(fd, chunk, off)
    return fd


def ceilings_in_child(size: int) -> tuple[float, float]:
    """install_ceiling on cold memory, then on warm memory, in a fresh process: (cold, warm) MiB/s.

    Cold: after COLD_WAIT_S with nothing allocated, with `size` bytes
    written and held first, as a loopback migration's destination meets it
    (the source's guest holds as much on the same host). Warm: at once
    again, on the pages the cold pass just freed. This VM's kernel reports
    freed pages to the hypervisor, which takes them back: on the
    development VM a 4 GiB install ran at 3128 MiB/s with nothing held,
    then at 357 with 4 GiB held and at 1045 once more (a bare pwrite loop
    likewise, 370-860 MiB/s for the memory past what the host kept).
    """
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--install-ceiling", str(size)],
                         capture_output=True, text=True, env=spawn.child_env(), check=True)
    cold, warm = out.stdout.split()
    return float(cold), float(warm)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


#: The native destination's buffers: its window of pages asked for and its receive ring (native/dp_dest.c).
_NATIVE_DEST_BUFFERS = (8 << 20) + 8 * (512 << 10)


def budget_mib(side: str, size: int, plane: str) -> float:
    """64 MiB plus 1 bit per guest page plus the side's batch buffers.

    Batch buffers: on the source, the bulk batches encoded ahead of the
    sender plus the one being sent (the native source sends from the
    guest's mapping: none); on the destination, the bulk window (pages
    asked for and not yet installed) plus one urgent batch (native: the
    window and the receive ring).
    """
    page = mmap.PAGESIZE
    if side == "source":
        buffers = 0 if plane == "native" else (ENCODERS + 2) * MAX_BULK_PAGES * page
    else:
        buffers = _NATIVE_DEST_BUFFERS if plane == "native" else WINDOW_PAGES * page + MAX_URGENT_PAGES * page
    return round(64 + size / page / 8 / MiB + buffers / MiB, 1)


#: The (a)/(b) targets per path: (a)'s p50 against the raw gRPC round trip or in µs, (b)'s p99 against (a)'s.
FAULT_PATHS = (Path("grpc"), Path("native"), Path("native", "native"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller guests (256 MiB / 1 GiB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported")
    ap.add_argument("--planes", default="grpc,native", help="data planes to measure (comma-separated)")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--link", default="1gbit", metavar="PROFILE",
                    help="also measure (c) across a lab link shaped so (migrate lab profiles, e.g. 1gbit, "
                         "10gbit/100us); 'none' skips it")
    ap.add_argument("--raw-server", metavar="HOST", help=argparse.SUPPRESS)
    ap.add_argument("--raw-client", metavar="ADDRESS", help=argparse.SUPPRESS)
    ap.add_argument("--stream-mib", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--raw-c-recv", type=int, metavar="BYTES", help=argparse.SUPPRESS)
    ap.add_argument("--raw-c-send", metavar="PORT:BYTES", help=argparse.SUPPRESS)
    ap.add_argument("--install-ceiling", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--faults-only", action="store_true",
                    help="measure (a)/(b) only (no bulk rows, no lab link): to compare builds' fault latency")
    args = ap.parse_args()
    if args.raw_server:
        raw_server(args.raw_server)
        return 0
    if args.raw_client:
        print(json.dumps(raw_client(args.raw_client, args.stream_mib, args.server_pid)))
        return 0
    if args.raw_c_recv:
        raw_c_receiver(args.raw_c_recv)
        return 0
    if args.raw_c_send:
        port, total = args.raw_c_send.split(":")
        raw_c_sender(int(port), int(total))
        return 0
    if args.install_ceiling:
        time.sleep(COLD_WAIT_S)
        held = hold(args.install_ceiling)
        print(install_ceiling(args.install_ceiling), install_ceiling(args.install_ceiling))
        os.close(held)
        return 0
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    planes = [p for p in args.planes.split(",") if p]
    if not planes or any(p not in ("grpc", "native") for p in planes):
        ap.error("--planes: a comma-separated list of grpc and native")
    big, huge = (256 * MiB, 1 * GiB) if args.quick else (1 * GiB, 4 * GiB)
    runs = range(args.repeat)
    out: dict = {"repeat": args.repeat, "planes": planes, "paths": {}}
    raws: list[dict] = []
    raw_cs: list[dict] = []

    def baseline(lab: Lab | None = None) -> dict:
        """The raw gRPC numbers right now: each ratio is taken against the baseline
        measured just before, so a host that slows down mid-run skews no ratio."""
        raw = raw_baseline(256, lab)
        if lab is None:
            raws.append(raw)
        return raw

    def bulk(agents: Agents, size: int, content: str, plane: str, lab: Lab | None = None) -> dict:
        """(c): migrate an idle guest `runs` times, each against a fresh raw baseline."""
        rates, vs_raw, peaks, ratios, cpu, raw_cpu = [], [], [], [], [], []
        where = f" across {lab.spec.describe()}" if lab else ""
        for i in runs:
            print(f"(d) raw gRPC, (c) bulk on the {plane} plane{where}, {content} RAM, {size // MiB} MiB: "
                  f"run {i + 1} ...", file=sys.stderr)
            raw = baseline(lab)
            doc, used = migrate_once(agents, f"bulk-{plane}-{content}-{size // MiB}-{i}",
                                     guest(size, "idle", 0, content), paused=True, path=Path(plane))
            rates.append(report.transfer_mib_s(doc))
            vs_raw.append(rates[-1] / raw["stream_mib_s"])
            peaks.append(used["rss"])
            ratios.append(doc["compression_ratio"])
            cpu.append({side: seconds * 1000 / (size / MiB) for side, seconds in used["cpu_s"].items()})
            raw_cpu.append(raw["cpu_ms_per_mib"])
        return {"mib_s": median(rates), "mib_s_runs": [round(r, 1) for r in rates],
                "ratio": round(statistics.median(vs_raw), 2), "ratio_runs": [round(r, 2) for r in vs_raw],
                "compression_ratio": median(ratios),
                "cpu_ms_per_mib": {side: round(statistics.median(c[side] for c in cpu), 2) for side in cpu[0]},
                "raw_cpu_ms_per_mib": round(statistics.median(raw_cpu), 2),
                "rss_mib": {side: round(max(p[side] for p in peaks) / MiB, 1) for side in ("source", "dest")},
                "rss_budget_mib": {side: budget_mib(side, size, plane) for side in ("source", "dest")}}

    def faults(agents: Agents, path: Path) -> dict:
        """(a) and (b) on `path`, `runs` times each, (a)'s p50 against a fresh raw round trip."""
        lat: dict[str, list[dict]] = {"a": [], "b": []}
        vs = {"a": [], "b": []}
        guest_side: list[tuple[float, float]] = []  # (b): the guest's blocked seconds, the transfer's
        for i in runs:
            print(f"(d) raw gRPC, (a) faults with bulk off, (b) faults while bulk runs, {path}: run {i + 1} ...",
                  file=sys.stderr)
            raw = baseline()
            tag = f"{path.plane}-{path.fault}-{i}"
            a = migrate_once(agents, f"lat-a-{tag}", guest(128 * MiB, "random-read", 4000), paused=True,
                             no_push=True, path=path)[0]["faults"]["latency_us"]
            b_doc = migrate_once(agents, f"lat-b-{tag}", guest(big, "random-read", 1 << 40), paused=True,
                                 path=path)[0]
            b = b_doc["faults"]["latency_us"]
            guest_side.append((b_doc["guest"]["blocked_ms"] / 1000, b_doc["transfer_s"]))
            lat["a"].append(a)
            lat["b"].append(b)
            vs["a"].append(a["p50"] / raw["rtt_p50_us"])
            vs["b"].append(b["p99"] / max(a["p99"], 1))
        res: dict = {}
        for key in ("a", "b"):
            res[key] = {q: median([x[q] for x in lat[key]]) for q in ("p50", "p99", "max")}
            res[key]["ratio"] = round(statistics.median(vs[key]), 2)
            res[key]["ratio_runs"] = [round(r, 2) for r in vs[key]]
        res["b"]["blocked_s"] = median([g[0] for g in guest_side])
        res["b"]["transfer_s"] = median([g[1] for g in guest_side])
        return res

    with LocalAgent("source") as src, LocalAgent("dest") as dst:
        agents = Agents.local(src, dst)
        print("warm-up migration ...", file=sys.stderr)
        migrate_once(agents, "warm-up", guest(32 * MiB, "random-read", 2000), paused=True, path=Path(planes[0]))
        for path in (p for p in FAULT_PATHS if p.plane in planes):
            out["paths"][str(path)] = faults(agents, path)
        for size in (big, huge) if not args.faults_only else ():
            for content in ("realistic", "random"):
                for plane in planes:
                    out[f"c_{plane}_{content}_{size // MiB}"] = bulk(agents, size, content, plane)
                raw_cs.append(raw_c_baseline(1024))
            print(f"install ceiling, {size // MiB} MiB ...", file=sys.stderr)
            ceilings = [ceilings_in_child(size) for _ in runs]
            out[f"ceiling_{size // MiB}"] = median([cold for cold, _ in ceilings])
            out[f"ceiling_warm_{size // MiB}"] = median([warm for _, warm in ceilings])
    if args.link != "none" and not args.faults_only:
        with Lab(LinkSpec.parse(args.link)) as lab:
            out["link"] = {"profile": lab.spec.describe(), "size_mib": big // MiB}
            for plane in planes:
                for content in ("realistic", "random"):
                    out["link"][f"{plane}_{content}"] = bulk(Agents.across(lab), big, content, plane, lab)
    out["raw"] = {k: median([r[k] for r in raws]) for k in raws[0]}
    out["raw_c"] = {k: median([r[k] for r in raw_cs]) for k in raw_cs[0]} if raw_cs else None
    print_table(out, big, huge)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def print_table(out: dict, big: int, huge: int) -> None:
    raw, raw_c = out["raw"], out["raw_c"]
    print(f"\nmedians of {out['repeat']} runs, each ratio against the baseline measured just before its run;"
          " peak memory: the highest of the runs")
    print(f"{'metric':62} {'value':>12}  {'target':>24}")

    def row(name: str, value: str, target: str = "") -> None:
        print(f"{name:62} {value:>12}  {target:>24}")

    row("(d) raw gRPC bidi 4 KiB round trip p50", f"{raw['rtt_p50_us']:.0f} µs")
    row("(d) raw gRPC streaming, 1 MiB messages", f"{raw['stream_mib_s']:.0f} MiB/s",
        f"{raw['cpu_ms_per_mib']:.2f} CPU ms/MiB")
    if raw_c:
        row("(d) raw C TCP stream, 1 MiB buffer", f"{raw_c['stream_mib_s']:.0f} MiB/s",
            f"{raw_c['cpu_ms_per_mib']:.2f} CPU ms/MiB")
    for name, res in out["paths"].items():
        a, b = res["a"], res["b"]
        native_faults = name.endswith("native faults")
        a_target = "(<= 100 µs)" if native_faults else f"{a['ratio']:.2f}x raw (<= 1.2)"
        row(f"(a) fault latency p50, bulk off, {name}", f"{a['p50']:.0f} µs", a_target)
        row(f"(a) fault latency p99, bulk off, {name}", f"{a['p99']:.0f} µs")
        row(f"(b) fault latency p50, bulk on, {name}", f"{b['p50']:.0f} µs")
        row(f"(b) fault latency p99, bulk on, {name}", f"{b['p99']:.0f} µs", f"{b['ratio']:.2f}x (a) (<= 2)")
        row("    (b)'s guest: blocked in all / transfer", f"{b['blocked_s']:.1f} / {b['transfer_s']:.1f} s")
    for size in (s for s in (big, huge) if f"ceiling_{s // MiB}" in out):
        ceiling, warm = out[f"ceiling_{size // MiB}"], out[f"ceiling_warm_{size // MiB}"]
        row(f"    host install ceiling, cold {size // MiB} MiB", f"{ceiling:.0f} MiB/s",
            f"{1e3 / ceiling:.2f} CPU ms/MiB")
        row(f"    host install ceiling, warm {size // MiB} MiB", f"{warm:.0f} MiB/s",
            f"{1e3 / warm:.2f} CPU ms/MiB")
        for content, goal in (("realistic", 1.0), ("random", 0.8)):
            for plane in out["planes"]:
                c = out[f"c_{plane}_{content}_{size // MiB}"]
                target = (f"{c['ratio']:.2f}x raw (>= 1.5, >= 1000)" if plane == "native"
                          else f"{c['ratio']:.2f}x raw (>= {goal})")
                row(f"(c) bulk {content}, {size // MiB} MiB, {plane} plane", f"{c['mib_s']:.0f} MiB/s", target)
                row("    against the cold install ceiling", f"{c['mib_s'] / ceiling:.2f}x")
                cpu_row(row, c, plane)
                memory_row(row, c)
    if "link" in out:
        link = out["link"]
        print(f"\nacross a lab link ({link['profile']}): the wire, not the two shared cores, is the bottleneck")
        for plane in out["planes"]:
            for content, goal in (("realistic", 1.0), ("random", 0.8)):
                c = link[f"{plane}_{content}"]
                row(f"(c) bulk {content}, {link['size_mib']} MiB, {plane} (compression {c['compression_ratio']:.2f}x)",
                    f"{c['mib_s']:.0f} MiB/s", f"{c['ratio']:.2f}x raw (>= {goal})")
                cpu_row(row, c, plane)
                memory_row(row, c)


def cpu_row(row: Callable[[str, str, str], None], c: dict, plane: str) -> None:
    """CPU per guest MiB, each agent's processes over the whole migration
    (worker starts and switchover included), against the raw stream's per
    MiB streamed (server and client): on loopback, where both ends share
    this machine's cores, their sum bounds (c)."""
    cpu = c["cpu_ms_per_mib"]
    target = "(<= 1.2 in all)" if plane == "native" else ""
    row(f"    CPU ms per MiB, source + dest (raw gRPC {c['raw_cpu_ms_per_mib']:.2f})",
        f"{cpu['source']:.2f} + {cpu['dest']:.2f}", target)


def memory_row(row: Callable[[str, str, str], None], c: dict) -> None:
    rss, budget = c["rss_mib"], c["rss_budget_mib"]
    row(f"    peak memory source / dest (budget {budget['source']:.0f} / {budget['dest']:.0f})",
        f"{rss['source']:.0f} / {rss['dest']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
