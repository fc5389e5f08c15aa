"""Restoring a memory image into a foreign process over --uffd-socket."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from migrate.local import LocalAgent, wait_for
from migrate.policies import workingset

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
def restoring(tmp_path: Path, image: Path, sock: Path, plane: str) -> Iterator[None]:
    """A source agent serving `image` and a destination agent restoring it into whoever connects to `sock`."""
    with LocalAgent("source", "--image", f"snap={image}", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--uffd-socket", str(sock), "--restore-from", src.address, "--image", "snap",
                       "--data-plane", plane, log_path=str(tmp_path / "dst.log")):
        yield


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


def c_client(tmp_path: Path, name: str) -> Path:
    """tests/c/NAME.c built into tmp_path."""
    exe = tmp_path / name
    if not exe.exists():
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(HERE / "c" / f"{name}.c")],
                       check=True, capture_output=True, timeout=120)
    return exe


def restore_touching_working_set(tmp_path, src, image: Path, *dest_args: str, max_bandwidth: str = "64M") -> dict:
    """One restore into a C client that touches 10 % of the image (its top) in random order, waits for the
    restore to end (its working-set file written by --record-ws), then checks every page; returns what it
    printed (ws_pages, ws_ms, touch_ms). The push is capped (by default) so that it comes to the top of the
    image long after the client touched it, on any machine."""
    sock, ws = tmp_path / "uffd.sock", dest_args[dest_args.index("--record-ws") + 1]
    with LocalAgent("dest", "--uffd-socket", str(sock), "--restore-from", src.address, "--image", "snap",
                    "--data-plane", "native", "--max-bandwidth", max_bandwidth, *dest_args,
                    log_path=str(tmp_path / "dst.log")):
        client = subprocess.Popen([str(c_client(tmp_path, "uffd_ws_client")), str(sock), str(image), "11", "10"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            touched = json.loads(client.stdout.readline())
            assert wait_for(lambda: os.path.exists(ws), timeout=60), (tmp_path / "dst.log").read_text()
            out, _ = client.communicate("done\n", timeout=120)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    assert client.returncode == 0 and json.loads(out)["bad"] == 0, out
    return touched


def test_replayed_restore_faults_half_as_often(tmp_path):
    """REAP's case: a snapshot restored twice; the second restore pushes first the pages the first one's
    client faulted on (--record-ws, then --policy replay:ws=); the second's own recording counts its faults."""
    image = tmp_path / "mem.img"
    make_image(image, 32768)
    first, second = str(tmp_path / "first.ws"), str(tmp_path / "second.ws")
    with LocalAgent("source", "--image", f"snap={image}", log_path=str(tmp_path / "src.log")) as src:
        restore_touching_working_set(tmp_path, src, image, "--record-ws", first)
        restore_touching_working_set(tmp_path, src, image, "--policy", f"replay:ws={first}",
                                     "--record-ws", second)
    faulted_first, faulted_second = workingset.load(first).pages, workingset.load(second).pages
    assert faulted_first >= 100, faulted_first  # about one fault per 64 KiB block of its working set
    assert faulted_second * 2 <= faulted_first, (faulted_second, faulted_first)


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
