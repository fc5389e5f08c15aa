"""Restoring a memory image into a foreign process over --uffd-socket."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from migrate.client import AgentClient
from migrate.local import LocalAgent, wait_for
from migrate.policies import workingset
from migrate.proto import migrate_pb2 as pb

HERE = Path(__file__).resolve().parent


def make_image(path: Path, pages: int, page: int = 4096) -> None:
    rng = random.Random(3)
    chunks = []
    for i in range(pages):
        kind = rng.random()
        if kind < 0.2:
            chunks.append(bytes(page))
        elif kind < 0.6:
            chunks.append((f"page {i} " * page).encode()[:page])
        else:
            chunks.append(rng.randbytes(page))
    path.write_bytes(b"".join(chunks))


@contextmanager
def restoring(tmp_path: Path, image: Path, sock: Path, plane: str, *dest_args: str) -> Iterator[LocalAgent]:
    """A source agent serving `image` and a destination agent (yielded) restoring it into whoever connects
    to `sock`."""
    with LocalAgent("source", "--image", f"snap={image}", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--uffd-socket", str(sock), "--restore-from", src.address, "--image", "snap",
                       "--data-plane", plane, *dest_args, log_path=str(tmp_path / "dst.log")) as dst:
        yield dst


def test_foreign_process_restored_from_image(tmp_path, plane):
    image = tmp_path / "mem.img"
    make_image(image, 2048)
    sock = tmp_path / "uffd.sock"
    with restoring(tmp_path, image, sock, plane):
        out = subprocess.run([sys.executable, str(HERE / "uffd_client.py"), str(sock), str(image), "11"],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr, (tmp_path / "dst.log").read_text())
    assert json.loads(out.stdout) == {"pages": 2048, "bad": 0}
    assert not os.path.exists(sock)  # the agent removed its socket on exit


def test_a_client_that_hangs_up_before_the_ready_byte_is_restored(tmp_path, plane):
    """A client need not read the ready byte: one that closed its socket before it was sent (its faults
    served meanwhile) is restored all the same (the agent aborted the run on EPIPE and left it hanging)."""
    image = tmp_path / "mem.img"
    make_image(image, 2048)
    sock = tmp_path / "uffd.sock"
    with restoring(tmp_path, image, sock, plane):
        out = subprocess.run([sys.executable, str(HERE / "uffd_client.py"), str(sock), str(image), "5", "hangup"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (out.stdout, out.stderr, (tmp_path / "dst.log").read_text())
        assert json.loads(out.stdout) == {"pages": 2048, "bad": 0}
        assert wait_for(lambda: " complete " in (tmp_path / "dst.log").read_text(), timeout=60)


def c_client(tmp_path: Path, name: str) -> Path:
    """tests/c/NAME.c built into tmp_path."""
    exe = tmp_path / name
    if not exe.exists():
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(HERE / "c" / f"{name}.c")],
                       check=True, capture_output=True, timeout=120)
    return exe


def restore_touching_working_set(tmp_path, src, image: Path, *dest_args: str, max_bandwidth: str = "64M") -> dict:
    """One restore into a C client that touches 10 % of the image (its top) in random order, waits for the
    restore to end, then checks every page; returns what it printed (ws_pages, ws_ms, touch_ms) and the
    restore's remote faults (from the agent's log). The push is capped (by default) so that it comes to the
    top of the image long after the client touched it, on any machine. A --data-plane in dest_args wins."""
    sock = tmp_path / "uffd.sock"
    log = tmp_path / f"dst-{len(list(tmp_path.glob('dst-*.log')))}.log"
    done = re.compile(r"complete \(every page arrived\): (\d+) faults")
    with LocalAgent("dest", "--uffd-socket", str(sock), "--restore-from", src.address, "--image", "snap",
                    "--data-plane", "native", "--max-bandwidth", max_bandwidth, *dest_args, log_path=str(log)):
        client = subprocess.Popen([str(c_client(tmp_path, "uffd_ws_client")), str(sock), str(image), "11", "10"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            touched = json.loads(client.stdout.readline())
            assert wait_for(lambda: done.search(log.read_text()), timeout=120), log.read_text()
            out, _ = client.communicate("done\n", timeout=120)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    assert client.returncode == 0 and json.loads(out)["bad"] == 0, out
    return {**touched, "faults": int(done.search(log.read_text()).group(1))}


def test_recording_restore_records_every_page_touched(tmp_path, plane):
    """REAP records in a first run without a push: --record-ws holds the push until the client is quiet, so
    the recording holds every page the client touched (a push ahead of it would hide most of them)."""
    image = tmp_path / "mem.img"
    npages = 32768
    make_image(image, npages)
    ws = str(tmp_path / "first.ws")
    with LocalAgent("source", "--image", f"snap={image}", log_path=str(tmp_path / "src.log")) as src:
        touched = restore_touching_working_set(tmp_path, src, image, "--data-plane", plane, "--record-ws", ws,
                                               max_bandwidth="0")
    recorded = workingset.load(ws)
    missing = set(range(npages - touched["ws_pages"], npages))
    for first, count in recorded.ranges:
        missing -= set(range(first, first + count))
    assert not missing, f"{len(missing)} pages touched and not recorded"
    assert recorded.pages < 2 * touched["ws_pages"], recorded.pages  # and not the pushed image


def test_replayed_restore_faults_half_as_often(tmp_path):
    """REAP's case: a snapshot restored twice; the second restore fetches before its ready byte the pages the
    first one's client touched (--record-ws, then --policy replay:ws=): its client faults on none of them."""
    image = tmp_path / "mem.img"
    make_image(image, 32768)
    first = str(tmp_path / "first.ws")
    with LocalAgent("source", "--image", f"snap={image}", log_path=str(tmp_path / "src.log")) as src:
        cold = restore_touching_working_set(tmp_path, src, image, "--record-ws", first)
        warm = restore_touching_working_set(tmp_path, src, image, "--policy", f"replay:ws={first}")
    assert cold["faults"] >= 100, cold  # about one fault per 64 KiB block of its working set
    assert warm["faults"] * 2 <= cold["faults"], (warm, cold)


def test_foreign_process_changing_its_memory_during_the_restore(tmp_path, plane):
    """A C program with EVENT_REMOVE and EVENT_REMAP (Firecracker with a balloon) discards
    ranges before and after they arrive and moves one with mremap while it is restored:
    every discarded page reads zero, every other page the image, and the run ends."""
    exe = c_client(tmp_path, "uffd_events_client")
    image = tmp_path / "mem.img"
    make_image(image, 2048)
    sock = tmp_path / "uffd.sock"
    with restoring(tmp_path, image, sock, plane):
        out = subprocess.run([str(exe), str(sock), str(image)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (out.stdout, out.stderr, (tmp_path / "dst.log").read_text())
        assert json.loads(out.stdout) == {"pages": 2048, "bad": 0}
        # every page arrived or was given back: the run ends
        assert wait_for(lambda: " complete " in (tmp_path / "dst.log").read_text(), timeout=60)


def leave(tmp_path: Path, plane: str, after_the_run: bool) -> dict:
    """Run the events client in "leave" mode (discard, move, then on our word fork and unmap
    everything): during the restore (the link slowed so the run cannot end first), or once the
    run is complete. Returns the run's event counts."""
    exe = c_client(tmp_path, "uffd_events_client")
    image = tmp_path / "mem.img"
    make_image(image, 2048)
    sock = tmp_path / "uffd.sock"
    log = tmp_path / "dst.log"
    slow = () if after_the_run else ("--max-bandwidth", "256K")
    with restoring(tmp_path, image, sock, plane, *slow) as dst:
        client = subprocess.Popen([str(exe), str(sock), str(image), "leave"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if after_the_run:
                assert wait_for(lambda: " complete " in log.read_text(), timeout=60), log.read_text()
            out, err = client.communicate("go\n", timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        assert client.returncode == 0, (out, err, log.read_text())
        # unmapping everything gives every page back: the run ends, however slow its link
        assert wait_for(lambda: " complete " in log.read_text(), timeout=60), log.read_text()
        run_id = log.read_text().split("handshake client (run ", 1)[1].split(";", 1)[0].split(")", 1)[0]
        with AgentClient(dst.address) as client:
            return json.loads(client.call("IncomingStatus", pb.RunRef(run_id=run_id)).detail_json)["faults"]["events"]


def test_foreign_process_that_forks_and_unmaps_everything_ends_its_run(tmp_path, plane):
    """The events client with EVENT_UNMAP and EVENT_FORK too: during the restore it forks (the
    child's userfaultfd is refused, with a WARNING) and unmaps all its memory; the run ends,
    and IncomingStatus counts each kind of event."""
    events = leave(tmp_path, plane, after_the_run=False)
    assert "forked 1 time(s)" in (tmp_path / "dst.log").read_text()
    assert (events["remove"], events["removed_pages"], events["remap"], events["remapped_pages"]) == \
        (2, 600, 1, 300), events
    assert events["fork"] == 1 and events["unmap"] >= 1 and events["unmapped_pages"] == 2048, events


def test_foreign_process_changing_its_memory_after_the_restore_is_let_go(tmp_path):
    """Once the run is complete nobody reads the process's userfaultfd, which it keeps open:
    every range must be unregistered, the moved one at its new address too, or its munmap
    (an UNMAP event no one reads) would wait forever."""
    events = leave(tmp_path, "native", after_the_run=True)
    assert events["remap"] == 1 and events["fork"] == 0, events  # the fork came after: nothing registered
