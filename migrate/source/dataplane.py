"""The native data plane's source side: one run's pages served by C threads.

A DataServer listens on its own port; destinations holding the run's
one-time key connect, say hello and ask for many runs of pages per request;
C threads answer from a read-only mapping of the guest's memfd (zero pages
as runs, the others checksummed and sent from the mapping, raw or zstd).
Page bytes never enter Python: it starts the server, reads its counters and
stops it. Wire format and behaviour: docs/protocol.md, "Native data plane".
"""
from __future__ import annotations

import os

from migrate._native import ffi, lib
from migrate.errors import os_error

#: The compression policies: the link-aware default, always, never.
COMPRESS = {"never": lib.MIG_DP_COMPRESS_NEVER, "always": lib.MIG_DP_COMPRESS_ALWAYS,
            "auto": lib.MIG_DP_COMPRESS_AUTO}
KEY_LEN = lib.DP_KEY_LEN


def zstd_missing() -> str | None:
    """Why zstd cannot be used from C (the plane then runs uncompressed), or None when it can."""
    why = lib.dp_zstd_why_not()
    return None if why == ffi.NULL else ffi.string(why).decode(errors="replace")


class DataServer:
    """The source end of one run's native data plane.

    The key is the run's one-time secret: whoever connects must prove it
    holds it (the destination gets it over the authenticated control plane).
    Connections without it are dropped and counted (`rejected`).
    """

    def __init__(self, memfd: int, size: int, page_size: int, host: str, port: int = 0, key: bytes | None = None,
                 compress: str = "auto", level: int = 1) -> None:
        if compress not in COMPRESS:
            raise ValueError(f"compression policy {compress!r}: expected one of {', '.join(COMPRESS)}")
        self.key = os.urandom(KEY_LEN) if key is None else bytes(key)
        if len(self.key) != KEY_LEN:
            raise ValueError(f"a data plane key has {KEY_LEN} bytes, not {len(self.key)}")
        self.host = host
        err = ffi.new("int *")
        handle = lib.mig_dp_source_start(memfd, size, page_size, host.encode(), port, self.key, COMPRESS[compress],
                                         level, err)
        if handle == ffi.NULL:
            raise os_error(err[0], f"native data server for memfd {memfd} ({size} bytes) on {host}:{port}")
        self._handle = handle
        self._final = ffi.new("struct mig_dp_source_counters *")
        self.port: int = lib.mig_dp_source_port(handle)

    def freeze(self) -> None:
        """The guest stopped writing its memory here (switchover, or an image):
        send pages straight from the mapping instead of copying them first."""
        if self._handle is not None:
            lib.mig_dp_source_set_live(self._handle, 0)

    @property
    def endpoint(self) -> str:
        """host:port as a destination dials it (IPv6 literals bracketed)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def zstd_available(self) -> bool:
        return zstd_missing() is None

    def counters(self) -> dict[str, int]:
        """connections, rejected, bad_requests, requests, pages, fault_requests, fault_pages, zero_pages,
        bytes (on the wire), compressed_batches, sends (sendmsg calls carrying batches), hole_queries (asks of
        the memfd where its data is); once closed, their last values."""
        out = self._final
        if self._handle is not None:
            out = ffi.new("struct mig_dp_source_counters *")
            lib.mig_dp_source_counters(self._handle, out)
        return {name: int(getattr(out, name)) for name, _ in ffi.typeof(out[0]).fields}

    def close(self) -> None:
        """Stop serving: closes every connection, joins the threads, unmaps. Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            lib.mig_dp_source_stop(handle, self._final)

    def __enter__(self) -> DataServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
