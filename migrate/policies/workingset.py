"""Working-set files: the pages a guest faulted on (and wrote during pre-copy), in order.

`migrate run --record-ws FILE` and `migrate dest serve --record-ws FILE`
write one; `--policy replay:ws=FILE` pushes its pages first. JSON:
{"version": 1, "npages": N, "page_size": P, "ranges": [[first, count], ...]},
ranges in the order first touched. On the wire (PrepareIncoming.working_set,
MigrationStatus.working_set) the ranges travel as little-endian u64 pairs.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from migrate.policies.base import PolicyError

VERSION = 1
#: Most ranges a working set may hold (4 MiB on the wire).
MAX_RANGES = 1 << 18


@dataclass(frozen=True)
class WorkingSet:
    npages: int
    page_size: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def pages(self) -> int:
        return sum(count for _, count in self.ranges)

    def check_fits(self, npages: int, page_size: int) -> None:
        if (npages, page_size) != (self.npages, self.page_size):
            raise PolicyError(f"the working set is of a guest of {self.npages} pages of {self.page_size} bytes, "
                              f"not {npages} of {page_size}")


def ranges_of(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Pages in order as ranges: consecutive pages merged."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def blocks_of(ranges: Sequence[tuple[int, int]], block: int, npages: int) -> list[tuple[int, int]]:
    """The aligned blocks of `block` pages the ranges touch, each once, in the ranges' order, merged."""
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for first, count in ranges:
        for b in range(first - first % block, first + count, block):
            if b in seen or b >= npages:
                continue
            seen.add(b)
            n = min(block, npages - b)
            if out and out[-1][0] + out[-1][1] == b:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((b, n))
    return out


def pack(ranges: Sequence[tuple[int, int]]) -> bytes:
    if len(ranges) > MAX_RANGES:
        raise PolicyError(f"a working set holds at most {MAX_RANGES} ranges, not {len(ranges)}")
    return b"".join(struct.pack("<QQ", first, count) for first, count in ranges)


def unpack(data: bytes, npages: int) -> list[tuple[int, int]]:
    """Ranges from the wire; PolicyError (a BadRequest) for a malformed or out-of-range set."""
    if len(data) % 16 or len(data) > 16 * MAX_RANGES:
        raise PolicyError(f"a working set is u64 pairs, at most {MAX_RANGES}: {len(data)} bytes")
    out = [struct.unpack_from("<QQ", data, i) for i in range(0, len(data), 16)]
    for first, count in out:
        if not count or first + count > npages:
            raise PolicyError(f"working set range [{first}, +{count}) is outside the guest's {npages} pages")
    return out


def save(path: str, npages: int, page_size: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Write FILE (replaced atomically)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": VERSION, "npages": npages, "page_size": page_size,
                   "ranges": [list(r) for r in ranges]}, f, separators=(",", ":"))
    os.replace(tmp, path)


def load(path: str) -> WorkingSet:
    """Read FILE; PolicyError with one line when it cannot be used."""
    try:
        with open(path) as f:
            doc = json.load(f)
        npages, page_size = int(doc["npages"]), int(doc["page_size"])
        ranges = tuple((int(a), int(b)) for a, b in doc["ranges"])
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r}, not {VERSION}")
    except OSError as err:
        raise PolicyError(f"cannot read working set {path}: {err.strerror}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise PolicyError(f"{path} is not a working-set file: {err}") from None
    if len(ranges) > MAX_RANGES or any(c < 1 or a < 0 or a + c > npages for a, c in ranges):
        raise PolicyError(f"{path}: ranges outside the guest's {npages} pages (or more than {MAX_RANGES})")
    return WorkingSet(npages, page_size, ranges)
