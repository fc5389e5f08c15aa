"""Firecracker-style userfaultfd handshake: framing, validation, no fd leaks."""
from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Iterator

import pytest

from migrate.handshake import recv_handshake, send_handshake, validate_regions
from migrate.uffd.region import WIRE_KEYS, Region

PAGE = 4096
GOOD = [{"base_host_virt_addr": 0x7F0000000000, "size": 16 * PAGE, "offset": 0, "page_size": PAGE},
        {"base_host_virt_addr": 0x7F0000100000, "size": 2 * PAGE, "offset": 16 * PAGE, "page_size": PAGE}]


def open_fds() -> set[int]:
    """Our open fds (not the one listdir used for /proc/self/fd itself)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        out.add(int(fd))
    return out


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


@pytest.fixture
def payload_fd() -> Iterator[int]:
    """Any fd will do as the "userfaultfd" for framing tests: a memfd."""
    fd = os.memfd_create("handshake-test", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def raw_send(sock: socket.socket, body: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([body], anc)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_roundtrip(pair, payload_fd) -> None:
    a, b = pair
    send_handshake(a, payload_fd, [Region.from_wire(r) for r in GOOD])
    fd, regions = recv_handshake(b, timeout=10)
    try:
        assert fd != payload_fd and same_file(fd, payload_fd)
        assert not os.get_inheritable(fd)
        assert regions == [Region.from_wire(r) for r in GOOD]
    finally:
        os.close(fd)


def test_region_objects_and_wire_format(pair, payload_fd) -> None:
    """The body is exactly Firecracker's: a bare JSON array, no framing."""
    a, b = pair
    send_handshake(a, payload_fd, [Region(0x10000, PAGE, 0, PAGE)])
    msg, anc, _, _ = b.recvmsg(4096, socket.CMSG_SPACE(4))
    fds = array.array("i")
    fds.frombytes(anc[0][2])
    for fd in fds:
        os.close(fd)
    assert json.loads(msg) == [{"base_host_virt_addr": 0x10000, "size": PAGE, "offset": 0, "page_size": PAGE}]


def test_page_size_kib_variant(pair, payload_fd) -> None:
    a, b = pair
    body = [{"base_host_virt_addr": 0x200000, "size": 0x400000, "offset": 0x200000, "page_size_kib": 2048}]
    raw_send(a, json.dumps(body).encode(), [payload_fd])
    fd, regions = recv_handshake(b, timeout=10)
    os.close(fd)
    assert regions == [Region(0x200000, 0x400000, 0x200000, 2 << 20)]


def test_body_split_over_several_segments(pair, payload_fd) -> None:
    a, b = pair
    body = json.dumps(GOOD).encode()
    raw_send(a, body[:10], [payload_fd])
    a.sendall(body[10:])
    fd, regions = recv_handshake(b, timeout=10)
    os.close(fd)
    assert regions == [Region.from_wire(r) for r in GOOD]


@pytest.mark.parametrize("body, match", [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe[]", "not UTF-8"),
    (b'{"base_host_virt_addr": 0}', "JSON array"),
    (b"[]", "no regions"),
    (b"[1]", "must be a JSON object"),
    (json.dumps(GOOD).encode() + b" [", "unexpected data"),
])
def test_malformed_body_is_rejected_without_fd_leak(pair, payload_fd, body, match) -> None:
    a, b = pair
    before = open_fds()
    raw_send(a, body, [payload_fd])
    with pytest.raises(ValueError, match=match):
        recv_handshake(b, timeout=10)
    assert open_fds() == before


def bad(**changes: object) -> list[dict]:
    region = dict(GOOD[0])
    for k, v in changes.items():
        if v is None:
            region.pop(k)
        else:
            region[k] = v
    return [region]


@pytest.mark.parametrize("regions, match", [
    (bad(size=None), "lacks 'size'"),
    (bad(base_host_virt_addr=None), "lacks 'base_host_virt_addr'"),
    (bad(offset=None), "lacks 'offset'"),
    (bad(page_size=None), "lacks 'page_size'"),
    (bad(size="4096"), "size must be an integer"),
    (bad(size=4096.0), "size must be an integer"),
    (bad(offset=True), "offset must be an integer"),
    (bad(offset=-PAGE), "out of range"),
    (bad(size=0), "size must be > 0"),
    (bad(size=PAGE + 1), "not aligned"),
    (bad(base_host_virt_addr=0x7F0000000800), "not aligned"),
    (bad(offset=100), "not aligned"),
    (bad(page_size=3000), "power of two"),
    (bad(page_size=PAGE, page_size_kib=2048), "disagree"),
    ([GOOD[0], dict(GOOD[0], offset=PAGE)], "overlap"),
])
def test_bad_fields_are_rejected_without_fd_leak(pair, payload_fd, regions, match) -> None:
    with pytest.raises(ValueError, match=match):
        validate_regions(regions)
    if all(set(r) == set(WIRE_KEYS) for r in regions):  # what a sender can hold as Regions
        with pytest.raises(ValueError):
            send_handshake(pair[0], payload_fd, [Region.from_wire(r) for r in regions])  # it refuses too
    a, b = pair
    before = open_fds()
    raw_send(a, json.dumps(regions).encode(), [payload_fd])
    with pytest.raises(ValueError, match=match):
        recv_handshake(b, timeout=10)
    assert open_fds() == before


def test_missing_fd(pair) -> None:
    a, b = pair
    a.sendall(json.dumps(GOOD).encode())
    with pytest.raises(ValueError, match="no userfaultfd"):
        recv_handshake(b, timeout=10)


def test_two_fds_are_rejected_and_closed(pair, payload_fd) -> None:
    a, b = pair
    before = open_fds()
    raw_send(a, json.dumps(GOOD).encode(), [payload_fd, payload_fd])
    with pytest.raises(ValueError, match="2 file descriptors"):
        recv_handshake(b, timeout=10)
    assert open_fds() == before


def test_peer_closes(pair, payload_fd) -> None:
    a, b = pair
    a.close()
    with pytest.raises(ConnectionError):
        recv_handshake(b, timeout=10)


def test_peer_closes_mid_body(payload_fd) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with b:
        before = open_fds() - {a.fileno()}
        raw_send(a, b'[{"base_host_virt_addr": 0, ', [payload_fd])
        a.close()
        with pytest.raises(ValueError, match="closed in the middle"):
            recv_handshake(b, timeout=10)
        assert open_fds() == before


def test_timeout(pair) -> None:
    with pytest.raises(TimeoutError):
        recv_handshake(pair[1], timeout=0.1)
