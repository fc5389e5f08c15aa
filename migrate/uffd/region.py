"""Region: guest memory as one process maps it, the project's one shape of it."""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any

#: The keys of a region on the Firecracker handshake's wire (see migrate.handshake).
WIRE_KEYS = ("base_host_virt_addr", "size", "offset", "page_size")


@dataclass(frozen=True)
class Region:
    """`size` bytes at host virtual address `base` (in the process that maps
    them) hold the guest's RAM from byte `offset` on, in pages of `page_size`.

    The same four facts a Firecracker handshake carries, so one type serves
    the handshake, the fault reader (native struct mig_region, which keeps
    `first_page`) and the destination's bookkeeping.
    """

    base: int
    size: int
    offset: int = 0
    page_size: int = mmap.PAGESIZE

    @property
    def first_page(self) -> int:
        """The guest page index of the region's first byte."""
        return self.offset // self.page_size

    @property
    def pages(self) -> int:
        return self.size // self.page_size

    def to_wire(self) -> dict[str, int]:
        """The handshake's JSON object for this region."""
        return dict(zip(WIRE_KEYS, (self.base, self.size, self.offset, self.page_size)))

    @classmethod
    def from_wire(cls, row: dict[str, Any]) -> Region:
        """The region of a handshake row already checked (migrate.handshake.validate_regions)."""
        return cls(*(row[k] for k in WIRE_KEYS))
