"""Network namespaces and the veth pair between them, through `ip`, `tc` and `nft`.

Every device, qdisc and nftables rule of a lab lives *inside* its two
namespaces (the veth is created directly in them), so deleting the
namespaces removes all of it: teardown is "kill what runs in them, delete
them", and is safe to repeat.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time

from migrate.lab.link import LinkSpec, nft_ruleset, tbf_args

#: The veth end's name in each namespace (namespaces are private: every lab can use the same name).
DEV = "lab0"
SOURCE_ADDR, DEST_ADDR = "10.77.0.1", "10.77.0.2"
PREFIX = 24
_CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """A lab could not be built or found; the message is one line for a user."""


def require_tools(spec: LinkSpec) -> None:
    """Fail early, in one line, when a tool the profile needs is missing."""
    for tool in ("ip", "tc") + (("nft",) if spec.needs_nft else ()):
        if not shutil.which(tool):
            package = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables"}[tool]
            what = " (loss and delay need nftables)" if tool == "nft" else ""
            raise LabError(f"`{tool}` is not installed{what}: apt-get install {package}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, tc, nftables)")


def run(*argv: str, input: str | None = None) -> str:
    """Run a command; raise LabError with its stderr in one line on failure."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True)
    if proc.returncode:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv[:4])}...: {msg[0] if msg else f'exit {proc.returncode}'}")
    return proc.stdout


def exists(ns: str) -> bool:
    return os.path.exists(f"/run/netns/{ns}")


def create(src_ns: str, dst_ns: str) -> None:
    """Two namespaces joined by a veth pair with SOURCE_ADDR / DEST_ADDR, all links up."""
    for ns in (src_ns, dst_ns):
        if exists(ns):
            raise LabError(f"network namespace {ns} already exists (another lab with this name?)")
    run("ip", "netns", "add", src_ns)
    run("ip", "netns", "add", dst_ns)
    run("ip", "link", "add", DEV, "netns", src_ns, "type", "veth", "peer", "name", DEV, "netns", dst_ns)
    for ns, addr in ((src_ns, SOURCE_ADDR), (dst_ns, DEST_ADDR)):
        run("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", DEV)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "set", DEV, "up")


def shape(ns: str, spec: LinkSpec, relay_port: int | None = None) -> None:
    """Rate (tbf on this end's egress), loss and the relay redirect (nftables) in one namespace."""
    if tbf := tbf_args(spec):
        run("tc", "-n", ns, "qdisc", "replace", "dev", DEV, "root", *tbf)
    if rules := nft_ruleset(spec, DEV, relay_port):
        run("ip", "netns", "exec", ns, "nft", "-f", "-", input=rules)


def pids(ns: str) -> list[int]:
    """PIDs of the processes running in namespace `ns`."""
    if not exists(ns):
        return []
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def teardown(namespaces: list[str], grace: float = 5.0) -> None:
    """Stop every process in the namespaces (SIGTERM, then SIGKILL), then delete them."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        live = [p for ns in namespaces for p in pids(ns)]
        for pid in live:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            live = [p for ns in namespaces for p in pids(ns)]
            time.sleep(0.05)
        if not live:
            break
    for ns in namespaces:
        if exists(ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def enter(ns: str) -> None:
    """Move the calling *thread* into namespace `ns`: its new sockets live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)
