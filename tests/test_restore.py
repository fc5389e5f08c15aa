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
def restoring(tmp_path: Path, image: Path, sock: Path) -> Iterator[None]:
    """A source agent serving `image` and a destination agent restoring it into whoever connects to `sock`."""
    with LocalAgent("source", "--image", f"snap={image}", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--uffd-socket", str(sock), "--restore-from", src.address, "--image", "snap",
                       log_path=str(tmp_path / "dst.log")):
        yield


def test_foreign_process_restored_from_image(tmp_path):
    image = tmp_path / "mem.img"
    make_image(image, 2048)
    sock = tmp_path / "uffd.sock"
    with restoring(tmp_path, image, sock):
        out = subprocess.run([sys.executable, str(HERE / "uffd_client.py"), str(sock), str(image), "11"],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr, (tmp_path / "dst.log").read_text())
    assert json.loads(out.stdout) == {"pages": 2048, "bad": 0}
    assert not os.path.exists(sock)  # the agent removed its socket on exit


def test_foreign_process_changing_its_memory_during_the_restore(tmp_path):
    """A C program with EVENT_REMOVE and EVENT_REMAP (Firecracker with a balloon) discards
    ranges before and after they arrive and moves one with mremap while it is restored:
    every discarded page reads zero, every other page the image, and the run ends."""
    exe = tmp_path / "uffd_events_client"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(HERE / "c" / "uffd_events_client.c")],
                   check=True, capture_output=True, timeout=120)
    image = tmp_path / "mem.img"
    make_image(image, 2048)
    sock = tmp_path / "uffd.sock"
    with restoring(tmp_path, image, sock):
        out = subprocess.run([str(exe), str(sock), str(image)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (out.stdout, out.stderr, (tmp_path / "dst.log").read_text())
        assert json.loads(out.stdout) == {"pages": 2048, "bad": 0}
        # every page arrived or was given back: the run ends
        assert wait_for(lambda: " complete " in (tmp_path / "dst.log").read_text(), timeout=60)
