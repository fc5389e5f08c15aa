"""The kvm guest kind (issue 13): a VM whose vCPUs fault through userfaultfd.

Migrated guests end with the digest of an unmigrated run; a saved and
restored guest continues exactly; QEMU boots the same image to the same
digest; bad images, vCPU counts and a missing /dev/kvm are one clear line.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import socket
import struct
import subprocess
import time

import pytest
from test_cli import assert_clean_error, run_cli

from migrate import demo, orchestrator, spawn
from migrate.client import AgentClient
from migrate.guest.kvm import IMAGE, KvmError, check_spec, kvm_problem, parse_image, qemu_argv
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guests import create_memfd
from migrate.local import wait_for
from migrate.proto import migrate_pb2 as pb

needs_kvm = pytest.mark.skipif(kvm_problem() is not None, reason=str(kvm_problem()))
needs_image = pytest.mark.skipif(not IMAGE.exists(), reason=f"{IMAGE} not built (python native/build_native.py)")
SIZE = 64 << 20
OPS = 20_000_000


def kvm_spec(vcpus: int, workload: str = "random-write", ops: int = OPS, seed: int = 3) -> GuestSpec:
    return GuestSpec(size=SIZE, workload=workload, seed=seed, ops=ops, threads=vcpus, kind="kvm")


def run_unmigrated(spec: GuestSpec) -> tuple[str, str]:
    """(host digest of RAM, the guest's own digest) of a run left alone."""
    fd = create_memfd("kvm-ref", spec.size)
    try:
        with GuestProcess.launch(spec, fd) as gp:
            assert gp.wait_finished(600)
            return gp.digest(), gp.stats()["guest_digest"]
    finally:
        os.close(fd)


def wait_ops(gp_or_client: object, ops: int, name: str = "") -> None:
    """Until the guest has done `ops` ops (no time limit beyond the test's own)."""
    while True:
        if isinstance(gp_or_client, GuestProcess):
            done = gp_or_client.stats()["ops_done"]
        else:
            done = gp_or_client.call("InspectGuest", pb.GuestRef(name=name)).ops_done
        if done >= ops:
            return
        time.sleep(0.005)


# ------------------------------------------------------------------ migration
@needs_kvm
@needs_image
@pytest.mark.parametrize(("vcpus", "mode", "moment"),
                         [(v, m, t) for v in (1, 2) for m in ("postcopy", "hybrid") for t in (0.0, 0.5)]
                         + [(v, "precopy", 0.5) for v in (1, 2)])
def test_migrated_kvm_guest_ends_like_an_unmigrated_one(agents, vcpus, mode, moment):
    """Moment 0: right after launch, often while the guest still boots (CPL0, APs not woken yet)."""
    src, dst = agents
    spec = pb.GuestSpec(size=SIZE, workload="seq-write" if vcpus == 2 else "random-write", seed=3, ops=OPS,
                        threads=vcpus, page_size=mmap.PAGESIZE, kind="kvm")
    with AgentClient(src.address) as client:
        client.call("LaunchGuest", pb.LaunchGuestRequest(name="vm", spec=spec), timeout=600)
        wait_ops(client, int(OPS * moment), "vm")
    try:
        doc = orchestrator.migrate("vm", src.address, dst.address, orchestrator.RunOptions(mode=mode, verify=True))
    finally:
        with AgentClient(dst.address) as client:
            # the guest reports its own digest after its last op, once it has hashed its memory: wait for it
            wait_for(lambda: client.call("InspectGuest", pb.GuestRef(name="vm")).guest_digest, timeout=120)
            info = client.call("InspectGuest", pb.GuestRef(name="vm"))
            client.stop_if_hosted("vm")
    assert doc["verified"] is True
    assert doc["guest"]["kind"] == "kvm"
    assert len(doc["guest"]["vcpu_blocked_ms"]) == vcpus
    expected = run_unmigrated(GuestSpec(size=SIZE, workload=spec.workload, seed=3, ops=OPS, threads=vcpus,
                                        kind="kvm"))
    assert info.guest_digest == expected[1]


@needs_kvm
@needs_image
def test_demo_migrates_a_kvm_guest_and_reports_its_vcpus(tmp_path):
    """`migrate demo --kind kvm`: verified, and the report carries per-vCPU blocked time and the guest's progress."""
    report = tmp_path / "demo.json"
    out = subprocess.run(spawn.module_argv("migrate", "demo", "--kind", "kvm", "--vcpus", "2", "--size", "32M",
                                           "--report", str(report)),
                         capture_output=True, text=True, timeout=600, env=spawn.child_env(), stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "yes: digest equals the unmigrated run" in out.stdout
    guest = json.loads(report.read_text())["guest"]
    assert guest["kind"] == "kvm" and len(guest["vcpu_blocked_ms"]) == 2
    hosts = {p["host"] for p in guest["progress"]}
    assert hosts == {"source", "dest"}, hosts
    last = {h: max(p["ops"] for p in guest["progress"] if p["host"] == h) for h in hosts}
    assert last["source"] < last["dest"] <= demo.KVM_OPS, last  # it went on working where it landed


# --------------------------------------------------------------- save/restore
@needs_kvm
@needs_image
@pytest.mark.parametrize("vcpus", [1, 2])
def test_save_and_restore_on_the_same_host_continues_exactly(vcpus):
    """Pause, export the state, copy RAM into a new runner, resume there: same end as never stopped."""
    spec = kvm_spec(vcpus, "hotset")
    expected = run_unmigrated(spec)
    fd, fd2 = create_memfd("kvm-a", SIZE), create_memfd("kvm-b", SIZE)
    try:
        with GuestProcess.launch(spec, fd) as gp:
            wait_ops(gp, OPS // 3)
            gp.pause()                      # a pause and resume in place changes nothing either
            gp.resume()
            wait_ops(gp, OPS // 2)
            state = gp.pause()
            assert state["kind"] == "kvm" and all(v["active"] for v in state["vcpus"][:1])
            ram = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
            os.pwrite(fd2, ram[:], 0)
            ram.close()
        with GuestProcess.launch(spec, fd2, start_paused=True, fill=False) as gp2:
            gp2.resume(state)
            assert gp2.wait_finished(600)
            assert (gp2.digest(), gp2.stats()["guest_digest"]) == expected
    finally:
        os.close(fd)
        os.close(fd2)


@needs_kvm
@needs_image
def test_vcpus_fault_through_the_handed_over_userfaultfd():
    """A restore-mode kvm runner's vCPUs wait in the uffd we serve (by hand here), and that wait is counted."""
    import select
    import threading

    from migrate.uffd import Uffd

    spec = kvm_spec(1, ops=2_000_000)
    expected = run_unmigrated(spec)
    fd, fd2 = create_memfd("kvm-a", SIZE), create_memfd("kvm-b", SIZE)
    stop = threading.Event()
    try:
        with GuestProcess.launch(spec, fd) as gp:
            wait_ops(gp, 1_000_000)
            state = gp.pause()
            src = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
            gp2 = GuestProcess.launch(spec, fd2, restore=True)
            uffd = Uffd(gp2.uffd)
            base = gp2.regions[0].base
            faults = []

            def serve() -> None:
                while not stop.is_set():
                    if not select.select([gp2.uffd], [], [], 0.05)[0]:
                        continue
                    try:
                        data = os.read(gp2.uffd, 32 * 64)
                    except BlockingIOError:
                        continue
                    for k in range(0, len(data), 32):
                        off = (struct.unpack_from("<Q", data, k + 16)[0] - base) & ~4095
                        if len(faults) < 50:
                            time.sleep(0.002)   # a slow first few pages: blocked time to see
                        uffd.copy(base + off, src[off:off + 4096])
                        faults.append(off)

            server = threading.Thread(target=serve, daemon=True)
            server.start()
            try:
                gp2.resume(state)
                assert gp2.wait_finished(600)
                got = (gp2.digest(), gp2.stats())
            finally:
                stop.set()
                server.join()
                gp2.stop()
                os.close(gp2.uffd)
                src.close()
        assert (got[0], got[1]["guest_digest"]) == expected
        assert len(faults) > 50
        assert got[1]["vcpu_blocked_ms"][0] >= 50 * 2.0 * 0.5  # at least half the 100 ms we made it wait
    finally:
        os.close(fd)
        os.close(fd2)


# ---------------------------------------------------------------------- QEMU
@needs_kvm
@needs_image
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("vcpus", [1, 2])
def test_qemu_boots_the_image_to_the_same_digest(tmp_path, vcpus):
    spec = kvm_spec(vcpus, "zipf", ops=2_000_000)
    out = tmp_path / "debugcon.txt"
    proc = subprocess.Popen(qemu_argv(spec, str(out)), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while "digest " not in (text := out.read_text() if out.exists() else ""):
            assert proc.poll() is None, f"QEMU exited: {text!r}"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    qemu_digest = text.split("digest ", 1)[1].split()[0]
    assert qemu_digest == run_unmigrated(spec)[1]


@pytest.fixture
def compare_qemu(monkeypatch):
    """scripts/compare_qemu.py as a module (scripts/ is not a package)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    return importlib.import_module("compare_qemu")


@pytest.mark.parametrize("ours", ["629a3e67c8786e99", "0000000000000000"])
def test_compare_qemu_prints_the_digests_and_fails_when_they_differ(compare_qemu, monkeypatch, capsys, ours):
    """The table's `| final digest |` row has each column's digest; differing digests exit 1, saying which."""
    row = {"total_s": 1.0, "downtime_ms": 1.0, "remote_faults": 1, "blocked_ms": 1.0, "ops_during": 1,
           "wire_mib": 1.0, "fault_p50_us": None, "digest": "629a3e67c8786e99"}
    monkeypatch.setattr(compare_qemu, "missing", lambda: None)
    monkeypatch.setattr(compare_qemu, "run_qemu", lambda *a, **kw: dict(row))
    monkeypatch.setattr(compare_qemu, "run_ours", lambda *a, **kw: dict(row, digest=ours))
    monkeypatch.setattr("sys.argv", ["compare_qemu.py", "--guest", "kvm", "--size", "64M", "--vcpus", "2"])
    status = compare_qemu.main()
    out = capsys.readouterr()
    assert f"| final digest | 629a3e67c8786e99 | 629a3e67c8786e99 | {ours} |" in out.out
    if ours == row["digest"]:
        assert status == 0 and not out.err
    else:
        assert status == 1 and "the guests' final digests differ" in out.err


def test_compare_qemu_reads_the_guest_lines_only_once_complete(compare_qemu, tmp_path):
    """QEMU's debugcon file fills a character at a time: a line seen half-written is waited out."""
    import threading

    out = tmp_path / "source.out"
    out.write_text("start pages 3ff00 ops_do")
    guest = compare_qemu.KvmImageGuest(64 << 20, "random-write", 1, 1000, 1)
    writer = threading.Timer(0.2, lambda: out.write_text("start pages 3ff00 ops_done 10a040\ndigest 0123"))
    writer.start()
    try:
        guest.wait_booted(str(tmp_path), None)
    finally:
        writer.join()
    assert guest._ops_addr == 0x10A040
    assert compare_qemu.said(out.read_text(), "digest ") is None
    assert compare_qemu.said(out.read_text() + "456789abcdef\n", "digest ") == "0123456789abcdef"


# -------------------------------------------------------------------- errors
def test_image_checks():
    good = IMAGE.read_bytes() if IMAGE.exists() else None
    with pytest.raises(KvmError, match="not a multiboot image"):
        parse_image(b"\0" * 4096, SIZE)
    if good is not None:
        load, entry, body = parse_image(good, SIZE)
        assert load == 1 << 20 and load <= entry < load + len(body)
        with pytest.raises(KvmError, match="holds .* bytes, its header loads"):
            parse_image(good[:64], SIZE)
    magic, flags = 0x1BADB002, 0x00010002
    big = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, 1 << 20, 1 << 20,
                      (1 << 20) + 64, 8 << 20, (1 << 20) + 32) + b"\x90" * 32
    with pytest.raises(KvmError, match="must fit in"):
        parse_image(big, SIZE)


def test_spec_checks():
    with pytest.raises(ValueError, match="1 to 16 vCPUs"):
        kvm_spec(17).validate()
    with pytest.raises(ValueError, match="1 to 16 vCPUs"):
        check_spec(kvm_spec(0))
    with pytest.raises(ValueError, match="unthrottled"):
        GuestSpec(size=SIZE, ops_per_sec=10.0, kind="kvm").validate()
    with pytest.raises(ValueError, match="unknown guest kind"):
        GuestSpec(size=SIZE, kind="xen").validate()


def _runner(spec: GuestSpec, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The kvm runner started by hand (source mode), as an agent would."""
    fd = create_memfd("kvm-cli", spec.size)
    parent, child = socket.socketpair()
    try:
        argv = spawn.module_argv("migrate.guest.kvm", "--memfd", str(fd), "--control-fd", str(child.fileno()),
                                 "--size", str(spec.size), "--threads", str(spec.threads), "--ops", "1000",
                                 *extra)
        return subprocess.run(argv, pass_fds=(fd, child.fileno()), capture_output=True, text=True, timeout=60,
                              env=spawn.child_env(env), stdin=subprocess.DEVNULL)
    finally:
        parent.close()
        child.close()
        os.close(fd)


@needs_kvm
def test_malformed_and_oversized_images_are_one_line(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a kernel" * 100)
    out = _runner(kvm_spec(1), "--image", str(bad))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "not a multiboot image" in out.stderr
    huge = tmp_path / "huge.bin"
    magic, flags = 0x1BADB002, 0x00010002
    huge.write_bytes(struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, 1 << 20, 1 << 20, 0,
                                 64 << 20, (1 << 20) + 32) + b"\x90" * (6 << 20))
    out = _runner(kvm_spec(1), "--image", str(huge))
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "must fit in" in out.stderr


def test_missing_kvm_device_is_one_line():
    env = {"MIGRATE_KVM_DEVICE": "/nonexistent/kvm"}
    out = _runner(kvm_spec(1), env=env)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0
    assert "/nonexistent/kvm is not usable" in out.stderr
    cli = subprocess.run(spawn.module_argv("migrate", "demo", "--kind", "kvm", "--size", "64M"), capture_output=True,
                         text=True, timeout=60, env=spawn.child_env(env), stdin=subprocess.DEVNULL)
    assert_clean_error(cli, "/nonexistent/kvm is not usable")
    assert cli.stderr.strip().count("\n") == 0


def test_an_agent_without_kvm_says_so_in_one_line(tmp_path):
    from migrate.local import LocalAgent

    with LocalAgent("source", log_path=str(tmp_path / "source.log"),
                    env={"MIGRATE_KVM_DEVICE": "/nonexistent/kvm"}) as src:
        out = run_cli("guest", "start", "vm", "--agent", src.address, "--size", "64M", "--kind", "kvm")
    assert_clean_error(out, "cannot run a kvm guest on this agent: /nonexistent/kvm is not usable")
    assert out.stderr.strip().count("\n") == 0, out.stderr


def test_bad_vcpu_count_is_one_line():
    for args in (["--kind", "kvm", "--vcpus", "17"], ["--kind", "kvm", "--vcpus", "0"], ["--vcpus", "2"]):
        out = run_cli("guest", "start", "vm", "--agent", "127.0.0.1:1", *args)
        assert_clean_error(out, "--vcpus")
        assert out.stderr.strip().count("\n") == 0, out.stderr
    out = _runner(kvm_spec(1), "--threads", "40")
    assert out.returncode != 0 and "1 to 16 vCPUs" in out.stderr and out.stderr.strip().count("\n") == 0


@needs_kvm
def test_a_guest_that_crashes_is_reported(tmp_path):
    """An image whose first instruction is ud2 (no IDT: a triple fault) stops its vCPU with a clear error."""
    magic, flags = 0x1BADB002, 0x00010002
    image = tmp_path / "ud2.bin"
    image.write_bytes(struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, 1 << 20, 1 << 20, 0, 0,
                                  (1 << 20) + 32) + b"\x0f\x0b" * 16)
    spec = kvm_spec(1, ops=1000)
    fd = create_memfd("kvm-ud2", SIZE)
    parent, child = socket.socketpair()
    argv = spawn.module_argv("migrate.guest.kvm", "--image", str(image), "--memfd", str(fd), "--control-fd",
                             str(child.fileno()), "--size", str(SIZE), "--ops", "1000", "--workload", spec.workload)
    proc = subprocess.Popen(argv, pass_fds=(fd, child.fileno()), env=spawn.child_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child.close()
    try:
        with parent.makefile("r") as events:
            errors = (line for line in events if '"guest-error"' in line)
            assert "vCPU 0 stopped: the guest triple-faulted" in next(errors, "")
    finally:
        parent.close()
        proc.wait(30)
        os.close(fd)
