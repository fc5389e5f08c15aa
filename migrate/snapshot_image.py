"""A snapshot on disk: guest RAM in FILE, the guest's execution state in FILE.state.json.

FILE is raw guest RAM, page i at offset i * page_size: exactly what
`migrate source serve --image NAME=FILE` serves, so any image server can
restore it. FILE.state.json says what runs on that memory:

    {"format": "migrate-snapshot", "version": 1, "guest": NAME,
     "spec": {size, workload, seed, ops, threads, ops_per_sec, page_size},
     "content": "realistic"|"random", "state": <the workload's exported state>,
     "ops": <ops done at the write-protect instant>, "taken_ns": <CLOCK_REALTIME>}

An image served with its state file is a guest that can be resumed: its
spec is the saved one and its Switchover hands over the saved state, so a
post-copy run to another agent (`migrate restore`) continues the workload.
The state file is written last, once every page is in FILE: an image
without one is incomplete (or a plain memory image).
"""
from __future__ import annotations

import json
import mmap
import os

from migrate import errors
from migrate.guest.process import GuestSpec
from migrate.guest.workloads import Workload, digest, fill_random, fill_realistic
from migrate.names import Content

STATE_SUFFIX = ".state.json"
FORMAT = "migrate-snapshot"
VERSION = 1
#: Bytes a state file may have (a 64-thread state is ~10 KB).
MAX_STATE_BYTES = 1 << 20


class BadSnapshot(errors.BadRequest):
    """A state file that is not a migrate snapshot's, or does not fit its image."""


def state_doc(guest: str, spec: GuestSpec, content: str, taken: dict) -> dict:
    """The state file's content for a snapshot the runner took (`taken`: its snapshot reply)."""
    return {"format": FORMAT, "version": VERSION, "guest": guest, "spec": spec.to_dict(), "content": content,
            "state": taken["state"], "ops": int(taken["ops"]), "taken_ns": int(taken["t_ns"])}


def read_state(image_path: str, image_size: int) -> dict | None:
    """The state saved next to image_path, checked against the image; None if there is none."""
    path = image_path + STATE_SUFFIX
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BadSnapshot(f"cannot open {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_STATE_BYTES + 1)
    try:
        doc = json.loads(raw) if len(raw) <= MAX_STATE_BYTES else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise BadSnapshot(f"{path} is not a {FORMAT} version {VERSION} state file")
    try:
        spec = GuestSpec.from_dict(doc["spec"])
    except (KeyError, TypeError, ValueError) as err:
        raise BadSnapshot(f"{path}: bad guest spec: {err}") from None
    if spec.size != image_size:
        raise BadSnapshot(f"{path} describes {spec.size} bytes of RAM, the image holds {image_size}")
    if doc.get("content", Content.REALISTIC) not in set(Content):
        raise BadSnapshot(f"{path}: unknown guest content {str(doc.get('content'))[:40]!r}")
    if not isinstance(doc.get("state"), dict) or not isinstance(doc["state"].get("threads"), list):
        raise BadSnapshot(f"{path} holds no execution state")
    doc["spec"] = spec
    return doc


def reference_digest(spec: GuestSpec, content: str, state: dict) -> str:
    """Digest of a guest that never was snapshotted, run to exactly the op counts of `state`.

    The workloads are deterministic: a fresh guest of the same spec and
    content, each thread stopped after the ops it had done at the
    write-protect instant, holds the memory the snapshot must hold.
    """
    counts = [int(t["ops_done"]) for t in state["threads"]]
    mem = mmap.mmap(-1, spec.size)
    try:
        if content == Content.RANDOM:
            fill_random(mem, spec.seed)
        elif content == Content.REALISTIC:
            fill_realistic(mem, spec.page_size, spec.seed)
        with Workload(mem, workload=spec.workload, seed=spec.seed, ops=spec.ops, threads=spec.threads,
                      page_size=spec.page_size) as wl:
            wl.limit(counts)
            wl.start()
            while not wl.wait_finished(1.0):
                pass
            wl.pause()
            got = digest(mem)
        return got
    finally:
        mem.close()
