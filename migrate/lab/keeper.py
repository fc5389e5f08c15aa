"""The lab process: builds a lab, keeps it running, and takes it down on SIGTERM.

    python -m migrate.lab.keeper NAME [--rate BYTES/S] [--delay S] ...

Prints one line when done building: "ready {json}" (what `migrate lab up`
shows) or "error: why". Before creating anything it starts the janitor
(migrate/lab/janitor.py) with a pipe only the keeper holds: when the keeper
ends, however it ends, the pipe closes and the janitor deletes whatever the
state file lists. Agents and the relay get SIGTERM from the kernel if the
keeper dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

from migrate import spawn
from migrate.lab import netns, state
from migrate.lab.link import LinkSpec
from migrate.lab.procs import in_namespace, same_process, start_time
from migrate.lab.proxy import Forwarder
from migrate.local import ServiceProcess
from migrate.validate import split_endpoint

SOURCE_PORT, DEST_PORT = 7070, 7071


def _start_janitor(name: str, log: str) -> subprocess.Popen:
    with open(log, "ab") as err:
        return subprocess.Popen(spawn.module_argv("migrate.lab.janitor", name), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=err, env=spawn.child_env(),
                                start_new_session=True)


def build(record: dict, spec: LinkSpec, zstd_level: int, log: str) -> list[ServiceProcess]:
    """Namespaces, link, relay, agents; returns the processes started (relay first)."""
    src_ns, dst_ns = record["namespaces"]
    netns.create(src_ns, dst_ns)
    procs: list[ServiceProcess] = []
    relay_port = None
    if spec.needs_relay:
        relay = in_namespace(src_ns, "migrate.lab.relay", "--listen", "0.0.0.0:0", "--delay", str(spec.delay),
                             "--jitter", str(spec.jitter), "--buffer", str(spec.relay_buffer()), log_path=log)
        procs.append(relay)
        relay_port = split_endpoint(relay.address)[1]
        record["relay_pid"] = relay.pid
    netns.shape(src_ns, spec, relay_port)
    netns.shape(dst_ns, spec)
    # Inside private namespaces: plaintext beyond loopback is what the lab is for.
    procs.append(in_namespace(src_ns, "migrate", "source", "serve", "--insecure-listen",
                              "--listen", f"{netns.SOURCE_ADDR}:{SOURCE_PORT}", "--zstd-level", str(zstd_level),
                              log_path=log))
    procs.append(in_namespace(dst_ns, "migrate", "dest", "serve", "--insecure-listen",
                              "--listen", f"{netns.DEST_ADDR}:{DEST_PORT}", log_path=log))
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--rate", type=int, default=0, help="bytes/s, 0: unlimited")
    ap.add_argument("--delay", type=float, default=0.0, help="one-way seconds")
    ap.add_argument("--jitter", type=float, default=0.0, help="+- seconds")
    ap.add_argument("--loss", type=float, default=0.0, help="percent")
    ap.add_argument("--zstd-level", type=int, default=1)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    spec = LinkSpec(rate=args.rate, delay=args.delay, jitter=args.jitter, loss=args.loss)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    old = state.load(args.name)
    if old and same_process(old["keeper_pid"], old["keeper_start"]):
        print(f"error: lab {args.name} is already up (keeper pid {old['keeper_pid']})", flush=True)
        sys.exit(1)
    if old:  # its keeper and janitor both died: clear what they left
        netns.teardown(old["namespaces"])
    janitor = _start_janitor(args.name, args.log)
    record = {"name": args.name, "namespaces": state.namespaces(args.name), "link": dataclasses.asdict(spec),
              "link_text": spec.describe(), "zstd_level": args.zstd_level, "log": args.log,
              "keeper_pid": os.getpid(), "keeper_start": start_time(os.getpid()),
              "janitor_pid": janitor.pid, "janitor_start": start_time(janitor.pid)}
    state.save(record)
    procs: list[ServiceProcess] = []
    forwarders: list[Forwarder] = []
    try:
        procs = build(record, spec, args.zstd_level, args.log)
        source, dest = procs[-2:]
        forwarders = [Forwarder(record["namespaces"][0], source.address),
                      Forwarder(record["namespaces"][1], dest.address)]
        record.update(source=forwarders[0].address, dest=forwarders[1].address, source_endpoint=source.address,
                      dest_inside=dest.address, source_pid=source.pid, dest_pid=dest.pid)
        state.save(record)
        print("ready " + json.dumps(record), flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # whoever read the ready line may be gone
        stop.wait()
    except (netns.LabError, RuntimeError, OSError) as err:
        print(f"error: {err}", flush=True)
        sys.exit(1)
    finally:
        for f in forwarders:
            f.close()
        for p in reversed(procs):  # agents first: they stop their guests
            p.stop()
        assert janitor.stdin is not None
        janitor.stdin.close()  # the janitor now deletes the namespaces and the state file
        janitor.wait()


if __name__ == "__main__":
    main()
