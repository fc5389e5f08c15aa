"""How many calls of each kind a server runs at once: in all, and per peer.

gRPC's synchronous server runs each call on a worker thread for the call's
whole life, so a stream holds its worker even while it is idle, and calls
that wait (a prepare towards a silent source) hold theirs too. With one
shared pool, eight idle streams were enough to leave `Hello` waiting.

So each class of calls (quick control calls, slow control calls, page
streams) gets a thread pool of its own, as large as the class's bound: a
call the class has room for always finds a worker at once, whatever the
other classes are doing. Past the bound, and past a smaller bound per
peer host, a call is refused at once with RESOURCE_EXHAUSTED and a line
that says which bound it hit. Refusals run on the server's small default
pool and never wait for a request message, so they cannot be held either.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)

#: Seconds between two log lines about refused calls of one class.
_LOG_EVERY_S = 10.0
#: Slow control calls (prepare, switchover, start, pre-copy rounds) an agent serves one peer at once:
#: a client running many migrations (migrate drain) keeps at most this many going between two agents.
SLOW_CALLS_PER_PEER = 4


@dataclass(frozen=True)
class CallClass:
    """Calls served from one pool: `methods` are full names ("/pkg.Service/Method")
    or service prefixes ending in "/"; `name` is what a refusal calls them."""

    name: str
    methods: tuple[str, ...]
    per_peer: int
    total: int

    def covers(self, method: str) -> bool:
        return any(method == m or (m.endswith("/") and method.startswith(m)) for m in self.methods)


def peer_host(peer: str) -> str:
    """The host of a gRPC peer ("ipv4:10.0.0.2:5000" -> "10.0.0.2", "ipv6:[::1]:5000" -> "::1")."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return kind or peer
    return urllib.parse.unquote(rest.rsplit(":", 1)[0]).strip("[]")


def refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses a call of any shape at once.

    Stream-shaped, so it runs without waiting for a request message: a
    client that never sends one cannot hold the worker of its refusal.
    """

    def refuse(request_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


class _ClassPool(ThreadPoolExecutor):
    """One class's workers; counts the calls handed to it and not yet finished."""

    def __init__(self, cls: CallClass) -> None:
        super().__init__(max_workers=cls.total, thread_name_prefix=f"grpc-{cls.name.replace(' ', '-')}")
        self.cls = cls
        self._lock = threading.Lock()
        self.running = 0
        self._peers: collections.Counter[str] = collections.Counter()
        self._refused = 0
        self._logged_at = 0.0

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            self.running += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future | None) -> None:
        with self._lock:
            self.running -= 1

    def full(self) -> bool:
        """No worker is free (the caller is gRPC's one serving thread, so this stays true until submit)."""
        with self._lock:
            return self.running >= self.cls.total

    def refused(self, why: str) -> None:
        """Log refusals: the first, then at most one line per _LOG_EVERY_S (a flood must not flood the log)."""
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            if now - self._logged_at < _LOG_EVERY_S:
                return
            count, self._refused, self._logged_at = self._refused, 0, now
        log.warning("refused %d call(s): %s", count, why)

    def take_peer_slot(self, context: grpc.ServicerContext) -> None:
        """Count this call against its peer's bound until it ends, or refuse it."""
        peer = peer_host(context.peer())
        with self._lock:
            full = self._peers[peer] >= self.cls.per_peer
            if not full:
                self._peers[peer] += 1
        if full:
            why = (f"too many {self.cls.name} from {peer}: {self.cls.per_peer} in progress, the most one peer "
                   "may have; end some or retry later")
            self.refused(why)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._peers[peer] -= 1
                if not self._peers[peer]:
                    del self._peers[peer]

        if not context.add_callback(release):  # the call has ended already
            release()


def _bounded(behavior: Callable, pool: _ClassPool, streaming: bool) -> Callable:
    """`behavior` run on `pool`, counted against its peer's bound."""
    if streaming:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            pool.take_peer_slot(context)
            yield from behavior(request, context)
    else:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            pool.take_peer_slot(context)
            return behavior(request, context)
    # grpc's per-method pool (as its health service uses); an attribute grpc reads off the handler function.
    run.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return run


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class Admission(grpc.ServerInterceptor):
    """Routes each call to its class's pool, or refuses it when the class or its peer is at the bound.

    Calls of no class run on the server's default pool, unbounded but for
    gRPC's maximum_concurrent_rpcs.
    """

    def __init__(self, classes: Sequence[CallClass]) -> None:
        self._pools = [_ClassPool(cls) for cls in classes]

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        pool = next((p for p in self._pools if p.cls.covers(details.method)), None)
        if pool is None:
            return handler
        if pool.full():
            why = f"server busy: {pool.cls.total} {pool.cls.name} in progress, the most it serves at once; retry later"
            pool.refused(why)
            return refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        kind = next(k for k in _KINDS if getattr(handler, k) is not None)
        return handler._replace(**{kind: _bounded(getattr(handler, kind), pool, handler.response_streaming)})
