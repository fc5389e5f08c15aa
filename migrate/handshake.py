"""Firecracker-compatible userfaultfd handshake.

A process that owns guest memory (Firecracker, or our guest runner) hands its
userfaultfd to a page-fault handler over a unix stream socket: ONE message
whose body is a JSON array of regions ::

    [{"base_host_virt_addr": int, "size": int, "offset": int, "page_size": int}, ...]

with the userfaultfd attached as SCM_RIGHTS ancillary data.  Older Firecracker
versions send ``page_size_kib`` instead of ``page_size``; both are accepted
and regions are always returned with ``page_size`` in bytes.

Framing: the body has no length prefix nor terminator (as Firecracker sends
it).  The kernel never merges the fd-carrying segment with data sent after
it in one read, and a sender (our runner) sends nothing else until the
handler speaks, so the first JSON value on the socket is the whole
handshake; anything after it (other than whitespace) is an error.
"""
from __future__ import annotations

import array
import json
import os
import select
import socket
import time
from collections.abc import Iterable
from typing import Any

from migrate.uffd.region import Region

#: Largest handshake body accepted (Firecracker's own handler reads 1 KiB).
MAX_BODY = 1 << 20
_MIN_PAGE = 4096


def _validate_int(i: int, region: dict, key: str) -> int:
    v = region[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"handshake region {i}: {key} must be an integer, got {v!r}")
    if v < 0 or v >= 1 << 64:
        raise ValueError(f"handshake region {i}: {key}={v} is out of range")
    return v


def validate_regions(regions: Any) -> list[Region]:
    """Strictly check decoded handshake regions; return them as Regions
    (``page_size`` in bytes).  ValueError with a clear message otherwise."""
    if not isinstance(regions, list):
        raise ValueError(f"handshake body must be a JSON array of regions, got {type(regions).__name__}")
    if not regions:
        raise ValueError("handshake has no regions")
    out = []
    for i, r in enumerate(regions):
        if not isinstance(r, dict):
            raise ValueError(f"handshake region {i} must be a JSON object, got {type(r).__name__}")
        for key in ("base_host_virt_addr", "size", "offset"):
            if key not in r:
                raise ValueError(f"handshake region {i} lacks {key!r}")
        base, size, offset = (_validate_int(i, r, k) for k in ("base_host_virt_addr", "size", "offset"))
        if "page_size" in r:
            page = _validate_int(i, r, "page_size")
            if "page_size_kib" in r and _validate_int(i, r, "page_size_kib") * 1024 != page:
                raise ValueError(f"handshake region {i}: page_size and page_size_kib disagree")
        elif "page_size_kib" in r:
            page = _validate_int(i, r, "page_size_kib") * 1024
        else:
            raise ValueError(f"handshake region {i} lacks 'page_size' (or 'page_size_kib')")
        if page < _MIN_PAGE or page & (page - 1):
            raise ValueError(f"handshake region {i}: page size {page} is not a power of two >= {_MIN_PAGE}")
        if size == 0:
            raise ValueError(f"handshake region {i}: size must be > 0")
        for key, v in (("base_host_virt_addr", base), ("size", size), ("offset", offset)):
            if v % page:
                raise ValueError(f"handshake region {i}: {key}={v:#x} is not aligned to its page size {page}")
        out.append(Region(base, size, offset, page))
    spans = sorted((r.base, r.size) for r in out)
    for (b0, s0), (b1, _) in zip(spans, spans[1:]):
        if b0 + s0 > b1:
            raise ValueError(f"handshake regions overlap at {b1:#x}")
    return out


def send_handshake(sock: socket.socket, uffd_fd: int, regions: Iterable[Region]) -> None:
    """Send the regions (JSON array) with `uffd_fd` attached, as Firecracker does."""
    rows = validate_regions([r.to_wire() for r in regions])
    body = json.dumps([r.to_wire() for r in rows]).encode()
    fds = array.array("i", [uffd_fd])
    sent = sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    if sent < len(body):
        sock.sendall(body[sent:])


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_handshake(sock: socket.socket, timeout: float | None = 10.0) -> tuple[int, list[Region]]:
    """Receive one handshake: (uffd fd, validated regions).

    The fd is received close-on-exec and belongs to the caller.  ValueError
    for a malformed body, a missing fd or extra fds (every received fd is
    closed first); TimeoutError when nothing complete arrives in `timeout`
    seconds; ConnectionError when the peer closes first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    fds: list[int] = []
    data = b""
    try:
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([sock], [], [], remaining)
            if not ready:
                raise TimeoutError(f"no userfaultfd handshake within {timeout} s")
            msg, anc, flags, _ = sock.recvmsg(64 * 1024, socket.CMSG_SPACE(16 * _fd_size()),
                                              socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise ValueError("handshake carried too many file descriptors (control data truncated)")
            if not msg:
                if data:
                    raise ValueError(f"peer closed in the middle of the handshake after {len(data)} bytes")
                raise ConnectionError("peer closed the socket before the userfaultfd handshake")
            data += msg
            if len(data) > MAX_BODY:
                raise ValueError(f"handshake body exceeds {MAX_BODY} bytes")
            text = data.decode("utf-8", errors="strict") if _utf8_complete(data) else None
            if text is None:
                continue
            end = _value_end(text)
            if end is None:
                continue                     # an array or object still open: more to come
            try:
                value = json.loads(text[:end])
            except json.JSONDecodeError as e:
                raise ValueError(f"handshake body is not valid JSON: {e}") from None
            if text[end:].strip():
                raise ValueError("unexpected data after the handshake body")
            break
        if not fds:
            raise ValueError("handshake carried no userfaultfd (no SCM_RIGHTS file descriptor)")
        if len(fds) != 1:
            raise ValueError(f"handshake carried {len(fds)} file descriptors, expected exactly one")
        regions = validate_regions(value)
    except BaseException:
        _close_all(fds)
        raise
    return fds[0], regions


def _fd_size() -> int:
    return array.array("i").itemsize


def _utf8_complete(data: bytes) -> bool:
    """False while `data` ends inside a multi-byte UTF-8 sequence."""
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        if e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            return False
        raise ValueError(f"handshake body is not UTF-8: {e}") from None


def _value_end(text: str) -> int | None:
    """End index of the first JSON array/object in `text`, None while it is
    still open; for anything else (not JSON we accept) the whole text."""
    i = len(text) - len(text.lstrip())
    if i == len(text):
        return None
    if text[i] not in "[{":
        return len(text)
    depth, in_str, esc = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return j + 1
    return None
