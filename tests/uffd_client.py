"""A foreign process speaking Firecracker's UFFD handshake (not our runner).

usage: python uffd_client.py SOCKET IMAGE SEED [hangup]

Maps anonymous memory the size of IMAGE, creates and registers a
userfaultfd with raw syscalls and ioctls (none of migrate's code), sends it
with its region list to SOCKET, then reads every page in a random order and
exits 0 only if each equals the image's bytes. With "hangup" it closes the
socket right after the handshake, before the agent's ready byte (as a VMM
that never reads it may).
(REAP's case, a working set touched first, is tests/c/uffd_ws_client.c.)
"""
import ctypes
import fcntl
import json
import mmap
import os
import random
import socket
import struct
import sys

SYS_USERFAULTFD = 323  # x86_64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F        # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00   # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_REGISTER_MODE_MISSING = 1


def main(sock_path: str, image_path: str, seed: int, hangup: bool = False) -> int:
    with open(image_path, "rb") as f:
        image = f.read()
    size, page = len(image), mmap.PAGESIZE
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("QQQ", UFFD_API, 0, 0)))
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", addr, size, UFFDIO_REGISTER_MODE_MISSING, 0)))
    regions = [{"base_host_virt_addr": addr, "size": size, "offset": 0, "page_size": page}]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        socket.send_fds(s, [json.dumps(regions).encode()], [fd])
        if hangup:
            s.close()
        order = list(range(size // page))
        random.Random(seed).shuffle(order)
        bad = [p for p in order if mem[p * page:(p + 1) * page] != image[p * page:(p + 1) * page]]
    print(json.dumps({"pages": len(order), "bad": len(bad)}))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["hangup"]))
