"""A destination path's connection to the source, which outlives the link going down.

When a stream to the source breaks with a transport error, the path does
not give up: faulting guest threads simply stay blocked (a missing page is
never invented) while `recover` reconnects with backoff. The destination
asks only for what its received bitmap lacks, so nothing needs replaying
beyond the requests that were in flight. Past the recovery deadline the
path fails with a clear error; the guest stays paused, never corrupted.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc

from migrate import errors, rpc
from migrate.batches import PagesClient
from migrate.proto import migrate_pb2 as pb

#: Transport failures worth reconnecting for; anything else is a real refusal.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_MAX_BACKOFF = 1.0
#: Seconds to wait for the source to accept a connection.
CONNECT_TIMEOUT = 5.0


def _reached(channel: grpc.Channel, endpoint: str) -> grpc.Channel:
    """`channel` once connected: a ready channel to the source.

    Closes it and raises AgentUnreachable if the source cannot be reached:
    the agent fails the prepare step and the guest stays on the source.
    """
    try:
        rpc.wait_ready(channel, endpoint, CONNECT_TIMEOUT)
    except rpc.AgentError:
        channel.close()
        raise errors.AgentUnreachable(f"destination cannot reach the source at {endpoint}") from None
    return channel


class LinkLost(Exception):
    """The source stayed unreachable past the recovery deadline."""


class _Outages:
    """What a link to the source counts about going down, and its recovery's deadline and backoff."""

    client: PagesClient

    def __init__(self, endpoint: str, purpose: str, recovery_timeout: float) -> None:
        self.endpoint = endpoint
        self._purpose = purpose
        self._timeout = recovery_timeout
        self.down = False
        self._down_since = 0.0
        self.outages = 0
        self.paused_s = 0.0

    def counters(self) -> dict:
        paused = self.paused_s + (time.monotonic() - self._down_since if self.down else 0.0)
        return {"bytes_wire": self.client.bytes_wire, "link_down": self.down, "outages": self.outages,
                "paused_s": round(paused, 3)}

    def _outage_start(self) -> float:
        """When the link went down: at the last reply received, or, for a path that
        was idle, no earlier than the keepalive allows (pings kept proving it up)."""
        now = time.monotonic()
        return min(now, max(self.client.heard, now - rpc.LINK_SILENCE_S))

    def _went_down(self, err: grpc.RpcError) -> float:
        """Count the outage `err` says began (re-raise a non-transport error); returns its start.

        The outage counts from the last byte received, not from its
        detection (a blackhole is noticed only by the keepalive), and so
        does the recovery deadline.
        """
        code = err.code() if hasattr(err, "code") else None
        if code not in _RETRYABLE:
            raise err
        t0 = self._down_since = self._outage_start()
        self.down = True
        self.outages += 1
        return t0

    def _backoffs(self, t0: float) -> Iterator[float]:
        """How long each connection attempt may take; raises LinkLost once the deadline is past."""
        backoff = 0.05
        while True:
            yield backoff
            if time.monotonic() - t0 > self._timeout:
                self.paused_s += time.monotonic() - t0
                raise LinkLost(f"source at {self.endpoint} unreachable for {self._timeout:g} s "
                               f"(gave up; the guest stays paused)") from None
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _back_up(self, t0: float) -> None:
        self.paused_s += time.monotonic() - t0
        self.down = False


class SourceLink(_Outages):
    """Channel + counting Pages client to one source endpoint, reconnectable (blocking), until `stop`
    (if given) is set."""

    def __init__(self, endpoint: str, purpose: str, recovery_timeout: float,
                 stop: threading.Event | None = None) -> None:
        super().__init__(endpoint, purpose, recovery_timeout)
        self._stop = stop
        self.channel = _reached(self._new_channel(), endpoint)
        self.client = PagesClient()

    def _new_channel(self) -> grpc.Channel:
        return rpc.channel(self.endpoint, purpose=self._purpose)

    def bulk(self, requests: Iterator[pb.BulkRequest]) -> Iterator[bytes]:
        """A Pages.Bulk call on the channel in use: its replies, serialized PageBatches messages."""
        return self.client.bulk(self.channel)(requests, metadata=rpc.METADATA)

    def recover(self, err: grpc.RpcError) -> bool:
        """Reconnect after `err` (False: stopped meanwhile), or raise LinkLost (or re-raise a non-transport error)."""
        t0 = self._went_down(err)
        for backoff in self._backoffs(t0):
            if self._stop is not None and self._stop.is_set():
                return False
            self.channel.close()
            self.channel = self._new_channel()
            try:
                rpc.wait_ready(self.channel, self.endpoint, backoff)
                break
            except rpc.AgentError:
                pass
        self._back_up(t0)
        return True

    def close(self) -> None:
        self.channel.close()


class UrgentLink(SourceLink):
    """The urgent path's link: a channel whose calls are made on gRPC's call objects (dest/faults.py
    says why), each carrying `metadata` (no interceptor sees them)."""

    metadata: tuple[tuple[str, str], ...]

    def __init__(self, endpoint: str, recovery_timeout: float, stop: threading.Event) -> None:
        super().__init__(endpoint, "urgent", recovery_timeout, stop)

    def _new_channel(self) -> grpc.Channel:
        channel, self.metadata = rpc.call_channel(self.endpoint, purpose=self._purpose)
        return channel
